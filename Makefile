# Two commands a user needs: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with; pip takes
# them from a local wheel cache when one is configured, PyPI otherwise.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	touch $@

demo: venv
	$(VENV)/bin/zoo demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info demo-out
