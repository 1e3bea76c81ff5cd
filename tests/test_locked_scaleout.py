"""docs/scaleout.md's recipe, locked: an ``mlflow server --app-name basic-auth`` (its user database,
SQLite, in the test's folder) over a PostgreSQL that asks for a password (scram-sha-256), on loopback.

What a user expects: workers given a user's credentials through MLflow's variables run a study to
exactly --trials trials under one parent; a client without credentials, with a wrong password or
without the permission is refused and creates nothing, and zoo says in one line which variable to
set; no password shows up in any run's params, tags, description, logged files or zoo's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
import requests
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from servers import mlflow_server, postgres_bin, postgres_server, write_auth_config
from test_study import REPO, assert_all_children_of, started, study_runs

# Recognizable, so that a leak anywhere is found by a plain substring search.
ADMIN_PASSWORD = "admin-pw-Q7x2Lk9v"
WORKER_PASSWORD = "worker-pw-M4n8Rt3z"
DB_PASSWORD = "db-pw-H6c1Wp5y"
SECRETS = (ADMIN_PASSWORD, WORKER_PASSWORD, DB_PASSWORD)
TRIALS = 4
WORKER = [sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--study-name", "locked",
          "--trials", str(TRIALS), "--train-size", "500", "--val-size", "200", "--test-size", "200",
          "--log-models", "none", "--heartbeat", "5", "--no-progress", "--format", "json", "--jobs", "1"]
REFUSED_IN_S = 60  # whole command, interpreter start included, on a busy 2-core machine; MLflow's retries take minutes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The locked servers: user ``worker`` may MANAGE experiment ``zoo`` (a study deletes the checkpoints of
    trials that are not the best, which MLflow counts as managing), EDIT ``edit-only`` and nothing in ``private``."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not found; install them with `apt-get install -y postgresql`")
    folder = tmp_path_factory.mktemp("locked")
    with postgres_server("optuna", "mlflow", password=DB_PASSWORD) as database:
        auth = write_auth_config(folder / "auth", ADMIN_PASSWORD)
        # The server's own store URL carries no password either: libpq reads PGPASSWORD.
        with mlflow_server(f"{database}/mlflow", folder / "served-artifacts", auth_config=auth,
                           env={"PGPASSWORD": DB_PASSWORD}) as url:
            with pytest.MonkeyPatch.context() as mp:
                as_user(mp, url, "admin", ADMIN_PASSWORD)
                from mlflow.server.auth.client import AuthServiceClient

                admin = AuthServiceClient(url)
                admin.create_user("worker", WORKER_PASSWORD)
                experiment_id = MlflowClient().create_experiment("zoo")
                admin.grant_user_permission("worker", "experiment", experiment_id, "MANAGE")
                edit_only_id = MlflowClient().create_experiment("edit-only")
                admin.grant_user_permission("worker", "experiment", edit_only_id, "EDIT")
                private_id = MlflowClient().create_experiment("private")
                mlflow.set_tracking_uri(None)
            yield {"url": url, "database": database, "folder": folder, "zoo_id": experiment_id,
                   "edit_only_id": edit_only_id, "private_id": private_id}


def as_user(mp: pytest.MonkeyPatch, url: str, username: str | None, password: str | None) -> None:
    """This process talks to ``url`` as ``username`` (no credentials at all for None)."""
    mp.setenv("MLFLOW_TRACKING_URI", url)
    for name, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            mp.delenv(name, raising=False)
        else:
            mp.setenv(name, value)
    mlflow.set_tracking_uri(url)


@pytest.fixture
def admin(locked: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """This test reads the locked server as its admin (who sees every run)."""
    as_user(monkeypatch, locked["url"], "admin", ADMIN_PASSWORD)
    yield locked
    mlflow.set_tracking_uri(None)


def env_of(url: str, home: Path, username: str | None = None, password: str | None = None, **more: str) -> dict[str, str]:
    """A subprocess environment with only the credentials given (``home`` holds the files a user may keep
    them in, ~/.mlflow/credentials and ~/.pgpass) and without ZOO_DEBUG: errors as users see them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "ZOO_DEBUG")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=url, HOME=str(home), **more)
    if username is not None:
        env.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password or "")
    return env


def everything_on_the_server() -> tuple[list[str], list[str]]:
    """(experiment names, run ids) over the whole server, as its admin sees them."""
    client = MlflowClient()
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    return sorted(e.name for e in experiments), sorted(r.info.run_id for r in runs)


def zoo(*args: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=300)
    return result, time.monotonic() - start


def assert_refused_in_one_line(result: subprocess.CompletedProcess, seconds: float, *names: str) -> str:
    """Exit 1 within REFUSED_IN_S, no traceback, a last line naming ``names``, no password anywhere."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert seconds < REFUSED_IN_S, f"took {seconds:.0f} s"
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), line
    for name in names:
        assert name in line, line
    assert_no_secret(result.stdout + result.stderr, "zoo's output")
    return line


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"password {leaked} in {where}"


def credential_files(home: Path, database_host: str) -> Path:
    """A home folder holding the worker's MLflow login and the database password, readable by its owner only."""
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = worker\nmlflow_tracking_password = {WORKER_PASSWORD}\n")
    (home / ".pgpass").write_text(f"{database_host}:*:zoo:{DB_PASSWORD}\n")
    for f in (home / ".mlflow" / "credentials", home / ".pgpass"):
        f.chmod(0o600)  # libpq ignores a .pgpass that others can read
    return home


def test_two_locked_workers_finish_exactly_the_trials_and_leak_no_password(admin: dict, tmp_path: Path):
    url, database = admin["url"], admin["database"]
    host = database.removeprefix("postgresql://zoo@")
    # One worker takes its login from MLflow's variables and names the database password in the storage
    # URL (masked wherever zoo shows it); the other takes both from files, as docs/scaleout.md recommends.
    envs = [env_of(url, tmp_path / "home1", "worker", WORKER_PASSWORD,
                   ZOO_OPTUNA_STORAGE=f"postgresql://zoo:{DB_PASSWORD}@{host}/optuna"),
            env_of(url, credential_files(tmp_path / "home2", host), ZOO_OPTUNA_STORAGE=f"{database}/optuna")]
    procs_out = []
    with started(WORKER, env=envs[0], cwd=tmp_path) as first, started(WORKER, env=envs[1], cwd=tmp_path) as second:
        for p in (*first, *second):
            procs_out.append((p, *p.communicate(timeout=900)))
    for p, out, err in procs_out:
        assert p.returncode == 0, err[-3000:]
        assert_no_secret(out + err, "a worker's output")

    study = optuna.load_study(study_name="locked", storage=f"postgresql://zoo:{DB_PASSWORD}@{host}/optuna")
    assert Counter(t.state for t in study.get_trials()) == {TrialState.COMPLETE: TRIALS}
    parents, children = (in_experiment(admin["zoo_id"], runs) for runs in study_runs())
    assert len(parents) == 1 and len(children) == TRIALS
    parent_id = parents[0].info.run_id
    assert {json.loads(out)["parent_run_id"] for _, out, _ in procs_out} == {parent_id}
    assert_all_children_of(parent_id, children)
    assert {r.data.tags["mlflow.user"] for r in children} == {"worker"}  # the server names who wrote them
    assert parents[0].data.params["optuna_storage"] in (f"{database}/optuna", f"postgresql://zoo:***@{host}/optuna")

    for run in (*parents, *children):
        assert_no_secret(json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_id}'s params or tags")
    logged = [f for f in (admin["folder"] / "served-artifacts" / admin["zoo_id"]).rglob("*") if f.is_file()]
    assert any(f.name == "summary.json" for f in logged)
    assert len([f for f in logged if f.name == "last.pt"]) == 1  # MANAGE let the workers delete all but the best's
    for f in logged:
        assert_no_secret(f.read_bytes().decode("latin-1"), f"logged file {f}")


def in_experiment(experiment_id: str, runs: list) -> list:
    return [r for r in runs if r.info.experiment_id == experiment_id]


def test_a_study_whose_user_may_only_edit_finishes_and_keeps_the_checkpoints(admin: dict, tmp_path: Path):
    """Deleting artifacts needs MANAGE: with EDIT the study still records every trial, and says what it kept."""
    command = [*WORKER, "--trials", "2", "--study-name", "edit-only", "--experiment", "edit-only",
               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    with started(command, env=env_of(admin["url"], tmp_path, "worker", WORKER_PASSWORD), cwd=tmp_path) as (worker,):
        out, err = worker.communicate(timeout=900)
    assert worker.returncode == 0, err[-3000:]
    assert json.loads(out)["trials_complete"] == 2
    assert "study: kept the checkpoints of trials that are not the best (1): 403" in err
    assert "grant the workers' user MANAGE on the experiment" in err
    kept = list((admin["folder"] / "served-artifacts" / admin["edit_only_id"]).rglob("last.pt"))
    assert len(kept) == 2


def test_a_client_without_valid_credentials_is_refused_and_creates_nothing(admin: dict, tmp_path: Path):
    url = admin["url"]
    before = everything_on_the_server()

    res, seconds = zoo("train", "--dry-run", "--epochs", "1", env=env_of(url, tmp_path), cwd=tmp_path)
    line = assert_refused_in_one_line(res, seconds, "asks for a login (401)", "MLFLOW_TRACKING_USERNAME")
    assert url in line
    res, seconds = zoo("train", "--dry-run", "--epochs", "1", env=env_of(url, tmp_path, "worker", "wrong"), cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, "refused the login of user 'worker' (401", "MLFLOW_TRACKING_PASSWORD")
    res, seconds = zoo("study", "--trials", "1", env=env_of(url, tmp_path, "worker", "wrong"), cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, "(401", "MLFLOW_TRACKING_PASSWORD")
    assert not (tmp_path / "optuna.db").exists()  # refused before it opened its default study storage
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    res, seconds = zoo("classify", "models:/digits@champion", str(image), env=env_of(url, tmp_path), cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, "asks for a login (401)", "MLFLOW_TRACKING_USERNAME")

    # The REST API itself: no login, a wrong one, and the worker reaching past its permissions.
    api = f"{url}/api/2.0/mlflow"
    private = {"experiment_id": admin["private_id"]}
    assert requests.post(f"{api}/experiments/create", json={"name": "stranger"}, timeout=30).status_code == 401
    assert requests.post(f"{api}/runs/create", json=private, auth=("worker", "wrong"), timeout=30).status_code == 401
    assert requests.post(f"{api}/runs/create", json=private, auth=("worker", WORKER_PASSWORD), timeout=30).status_code == 403
    assert requests.post(f"{api}/experiments/delete", json=private, auth=("worker", WORKER_PASSWORD),
                         timeout=30).status_code == 403
    assert everything_on_the_server() == before


def test_a_wrong_database_password_fails_with_one_line(locked: dict, tmp_path: Path):
    """The study storage refuses the login: zoo says where the password goes, and shows none."""
    host = locked["database"].removeprefix("postgresql://zoo@")
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the tracking side is not what this checks
    for storage, extra in ((f"postgresql://zoo:{ADMIN_PASSWORD}@{host}/optuna", {}),
                           (f"postgresql://zoo@{host}/optuna", {"PGPASSWORD": WORKER_PASSWORD}),
                           (f"postgresql://zoo@{host}/optuna", {})):
        res, seconds = zoo("study", "--trials", "1", "--storage", storage, env=env_of(local, tmp_path, **extra), cwd=tmp_path)
        line = assert_refused_in_one_line(res, seconds, "refused the login", "PGPASSWORD", "~/.pgpass")
        assert f"postgresql://zoo{':***' if ':' + ADMIN_PASSWORD in storage else ''}@{host}/optuna" in line
