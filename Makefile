# Two commands a user needs: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with; pip takes
# them from a local wheel cache when one is configured, PyPI otherwise.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv system-packages demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,postgres,timm,spark]'
	touch $@

demo: venv
	$(VENV)/bin/zoo demo

# Debian packages the suite uses for real (Fashion-MNIST, PostgreSQL, Chromium, Java for Spark): installed when
# missing, or the exact command to run is printed when this user cannot install them.
system-packages:
	bash scripts/system-packages.sh

test: venv system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit-test loop: every test but those marked slow (CI and `make test` run them all).
test-fast: venv system-packages
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info demo-out
