"""docs/scaleout.md's recipe, locked, run from its own commands: the server's secrets and config
(steps 2), ``mlflow server --app-name basic-auth`` as written (its user database, SQLite, in the test's
folder) over a PostgreSQL that asks for a password (scram-sha-256), on loopback; the admin's user and
grants (step 3), the workers (step 4) and the admin's clean-up (step 5). Step 1 (``sudo -u postgres``) is
the fixture's PostgreSQL; the TLS proxy is left out and its name is sent as a Host header.

What a user expects: workers given the recipe's grants (EDIT, no MANAGE) run a study to exactly --trials
trials under one parent; their login can grant nothing and write no model it was not granted; a worker
refused at the start is refused in seconds and leaves nothing that makes the next one wait; a client
without credentials, with a wrong password or without the permission is refused and creates nothing, and
zoo says in one line what to set; no password shows up in any run's params, tags, description, logged
files, zoo's output, the server's config file or its environment.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from servers import SERVER_START_S, _answers, free_port, postgres_bin, postgres_server
from test_study import REPO, assert_all_children_of, started, study_runs

# Recognizable, so that a leak anywhere is found by a plain substring search.
ADMIN_PASSWORD = "admin-pw-Q7x2Lk9v"
WORKER_PASSWORD = "worker-pw-M4n8Rt3z"
DB_PASSWORD = "db-pw-H6c1Wp5y"
SECRETS = (ADMIN_PASSWORD, WORKER_PASSWORD, DB_PASSWORD)
WORKER_USER = "zoo-worker"  # the recipe's names
MODEL = "fmnist-best"
PROXY_NAME = "mlflow.example.org"  # MLFLOWHOST: the name the TLS proxy forwards as the Host header
TRIALS = 4
WORKER = [sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--study-name", "locked",
          "--trials", str(TRIALS), "--train-size", "500", "--val-size", "200", "--test-size", "200",
          "--log-models", "best", "--heartbeat", "5", "--no-progress", "--format", "json", "--jobs", "1"]
REFUSED_IN_S = 60  # whole command, interpreter start included, on a busy 2-core machine; MLflow's retries take minutes
RECIPE = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "scaleout.md").read_text(), flags=re.S)

pytestmark = pytest.mark.slow


def recipe_step(marker: str, folder: Path, url: str, database: str) -> str:
    """The recipe's bash block holding ``marker``, its placeholders pointed at this test's servers and folders."""
    [block] = [b for b in RECIPE if marker in b]
    port = url.rpartition(":")[2]
    for placeholder, value in (("/etc/mlflow", f"{folder}/etc"), ("/var/lib/mlflow", f"{folder}/lib"),
                               ("/srv/mlflow-artifacts", f"{folder}/served-artifacts"),
                               ("postgresql://zoo@DBHOST:5432", database), ("https://MLFLOWHOST", url),
                               ("MLFLOWHOST", PROXY_NAME), ("5000", port)):
        block = block.replace(placeholder, value)
    return "\n".join(line for line in block.splitlines() if not line.startswith("caddy "))


def run_step(script: str, stdin: str = "", **env: str) -> None:
    """A recipe step in bash without a terminal (a session of its own), passwords piped in."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PGPASSWORD"))}
    result = subprocess.run(["bash", "-euc", script], input=stdin, capture_output=True, text=True, timeout=300,
                            start_new_session=True, env={**clean, "PATH": f"{Path(sys.executable).parent}:"
                                                         f"{os.environ['PATH']}", **env})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The recipe's servers and grants; besides, the admin made experiment ``private`` and registered model
    ``other-team``, on which the workers' user has nothing."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not found; install them with `apt-get install -y postgresql`")
    folder = tmp_path_factory.mktemp("locked")
    url = f"http://127.0.0.1:{free_port()}"
    with postgres_server("optuna", "mlflow", password=DB_PASSWORD) as database:
        step = lambda marker: recipe_step(marker, folder, url, database)  # noqa: E731
        run_step(step("basic_auth.ini <<EOF"), ADMIN_PASSWORD + "\n")
        # The server machine's ~/.pgpass holds the database password: its store URL carries none.
        home = credential_files(folder / "server-home", database.removeprefix("postgresql://zoo@"), mlflow_login=False)
        log = open(folder / "mlflow-server.log", "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PGPASSWORD"))}
        server = subprocess.Popen(["bash", "-euc", step("mlflow server")], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**env, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"})
        try:
            deadline = time.monotonic() + SERVER_START_S
            while not _answers(f"{url}/health"):
                assert server.poll() is None and time.monotonic() < deadline, (folder / "mlflow-server.log").read_text()[-3000:]
                time.sleep(0.5)
            run_step(step("sed -i"))
            run_step(step("create_user"), f"{ADMIN_PASSWORD}\n{WORKER_PASSWORD}\n")
            with pytest.MonkeyPatch.context() as mp:
                as_user(mp, url, "admin", ADMIN_PASSWORD)
                private_id = MlflowClient().create_experiment("private")
                MlflowClient().create_registered_model("other-team")
                zoo_id = MlflowClient().get_experiment_by_name("zoo").experiment_id
                mlflow.set_tracking_uri(None)
            yield {"url": url, "database": database, "folder": folder, "zoo_id": zoo_id, "private_id": private_id,
                   "server": server}
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
            log.close()


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


def credential_files(home: Path, database_host: str, mlflow_login: bool = True) -> Path:
    """A home folder holding the worker's MLflow login and the database password, readable by its owner only."""
    (home / ".mlflow").mkdir(parents=True)
    files = [home / ".pgpass"]
    files[0].write_text(f"{database_host}:*:zoo:{DB_PASSWORD}\n")
    if mlflow_login:
        files.append(home / ".mlflow" / "credentials")
        files[1].write_text(f"[mlflow]\nmlflow_tracking_username = {WORKER_USER}\n"
                            f"mlflow_tracking_password = {WORKER_PASSWORD}\n")
    for f in files:
        f.chmod(0o600)  # libpq ignores a .pgpass that others can read
    return home


def logged_checkpoints(locked: dict) -> list[Path]:
    return list((locked["folder"] / "served-artifacts" / locked["zoo_id"]).rglob("last.pt"))


def test_the_server_is_installed_and_started_as_written_and_keeps_no_admin_password(admin: dict, tmp_path: Path):
    [install] = [b.strip() for b in RECIPE if "pip install '.[server]'" in b]
    assert install == "pip install '.[server]'"
    extras = configparser.ConfigParser()
    extras.read(REPO / "setup.cfg")
    server_extra = extras["options.extras_require"]["server"].split()
    assert "mlflow[auth]" in server_extra and any(r.startswith("psycopg[binary]") for r in server_extra)

    folder = admin["folder"]
    assert ADMIN_PASSWORD not in (folder / "etc" / "basic_auth.ini").read_text()
    assert (folder / "etc" / "secret_key").stat().st_mode & 0o077 == 0
    session = [pid for pid in os.listdir("/proc") if pid.isdigit() and _session(pid) == admin["server"].pid]
    assert session
    for pid in session:
        assert ADMIN_PASSWORD.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), f"process {pid}'s environment"

    # --allowed-hosts: the proxy's name and the loopback port pass (401: the login is what is missing) ...
    health = f"{admin['url']}/api/2.0/mlflow/experiments/search"
    assert requests.post(health, json={}, headers={"Host": PROXY_NAME}, timeout=30).status_code == 401
    assert requests.post(health, json={}, timeout=30).status_code == 401
    # ... and zoo names a name the server was not told for what it is.
    other = admin["url"].replace("127.0.0.1", "[::ffff:127.0.0.1]")
    res, seconds = zoo("train", "--dry-run", "--epochs", "1", env=env_of(other, tmp_path, WORKER_USER, WORKER_PASSWORD),
                       cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, "Invalid Host header", "--allowed-hosts")


def _session(pid: str) -> int | None:
    try:
        return os.getsid(int(pid))
    except OSError:
        return None


def test_the_workers_login_can_neither_grant_nor_write_what_it_was_not_granted(admin: dict, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):
    as_user(monkeypatch, admin["url"], WORKER_USER, WORKER_PASSWORD)
    worker = AuthServiceClient(admin["url"])
    for grant in (lambda: worker.grant_user_permission("admin", "experiment", admin["zoo_id"], "READ"),
                  lambda: worker.grant_user_permission(WORKER_USER, "experiment", admin["zoo_id"], "MANAGE"),
                  lambda: worker.grant_user_permission(WORKER_USER, "registered_model", MODEL, "MANAGE"),
                  lambda: worker.create_user("stranger", "stranger-pw-1234567"),
                  lambda: MlflowClient().update_registered_model("other-team", description="mine"),
                  lambda: MlflowClient().delete_registered_model(MODEL)):
        with pytest.raises(MlflowException) as refused:
            grant()
        assert refused.value.get_http_status_code() == 403


def test_two_locked_workers_finish_exactly_the_trials_and_leak_no_password(admin: dict, tmp_path: Path):
    url, database = admin["url"], admin["database"]
    host = database.removeprefix("postgresql://zoo@")
    storage = f"postgresql://zoo:{DB_PASSWORD}@{host}/optuna"
    # One worker takes its login from MLflow's variables and names the database password in the storage
    # URL (masked wherever zoo shows it); the other takes both from files, as docs/scaleout.md recommends.
    envs = [env_of(url, tmp_path / "home1", WORKER_USER, WORKER_PASSWORD, ZOO_OPTUNA_STORAGE=storage),
            env_of(url, credential_files(tmp_path / "home2", host), ZOO_OPTUNA_STORAGE=f"{database}/optuna")]
    command = [*WORKER, "--register", MODEL]

    # A worker that may not write the model it registers is refused in seconds, before the study exists.
    res, seconds = zoo(*command[3:-2], "--register", "other-team", env=envs[0], cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, "registered model 'other-team'", "EDIT")
    assert "locked" not in optuna.get_all_study_names(storage)

    procs_out = []
    with started(command, env=envs[0], cwd=tmp_path) as first, started(command, env=envs[1], cwd=tmp_path) as second:
        for p in (*first, *second):
            procs_out.append((p, *p.communicate(timeout=900)))
    for p, out, err in procs_out:
        assert p.returncode == 0, err[-3000:]
        assert_no_secret(out + err, "a worker's output")
    assert any("the same command run with the admin's login deletes them" in err for _, _, err in procs_out)
    assert all(err.count("could not delete a trial's checkpoints") <= 1 for _, _, err in procs_out)  # tried once

    study = optuna.load_study(study_name="locked", storage=storage)
    assert Counter(t.state for t in study.get_trials()) == {TrialState.COMPLETE: TRIALS}
    parents, children = (in_experiment(admin["zoo_id"], runs) for runs in study_runs())
    assert len(parents) == 1 and len(children) == TRIALS
    parent_id = parents[0].info.run_id
    assert {json.loads(out)["parent_run_id"] for _, out, _ in procs_out} == {parent_id}
    assert_all_children_of(parent_id, children)
    assert {r.data.tags["mlflow.user"] for r in children} == {WORKER_USER}  # the server names who wrote them
    assert parents[0].data.params["optuna_storage"] in (f"{database}/optuna", f"postgresql://zoo:***@{host}/optuna")
    assert [v.version for v in MlflowClient().search_model_versions(f"name = '{MODEL}'")] == ["1"]
    assert len(logged_checkpoints(admin)) == TRIALS  # EDIT cannot delete artifacts: step 5 does

    # Step 5: the admin runs the same command once: nothing trains, only the best trial keeps its checkpoints.
    with started(command, env=env_of(url, tmp_path / "admin", "admin", ADMIN_PASSWORD, ZOO_OPTUNA_STORAGE=storage),
                 cwd=tmp_path) as (cleanup,):
        out, err = cleanup.communicate(timeout=900)
    assert cleanup.returncode == 0, err[-3000:]
    assert json.loads(out)["parent_run_id"] == parent_id
    assert len(optuna.load_study(study_name="locked", storage=storage).trials) == TRIALS
    assert len(logged_checkpoints(admin)) == 1
    assert MlflowClient().get_run(parent_id).info.status == "FINISHED"

    # The study belongs to its experiment: another team's command naming another one is refused, naming both.
    res, _ = zoo(*command[3:], "--experiment", "private", env=env_of(url, tmp_path / "admin", "admin", ADMIN_PASSWORD,
                                                                    ZOO_OPTUNA_STORAGE=storage), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "experiment: study has zoo, command has private" in res.stderr.strip().splitlines()[-1]

    for run in (*parents, *children):
        run = MlflowClient().get_run(run.info.run_id)
        assert_no_secret(json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_id}'s params or tags")
    logged = [f for f in (admin["folder"] / "served-artifacts" / admin["zoo_id"]).rglob("*") if f.is_file()]
    assert any(f.name == "summary.json" for f in logged)
    for f in logged:
        assert_no_secret(f.read_bytes().decode("latin-1"), f"logged file {f}")


def in_experiment(experiment_id: str, runs: list) -> list:
    return [r for r in runs if r.info.experiment_id == experiment_id]


def test_a_study_left_without_its_parent_run_does_not_hold_up_the_next_worker(admin: dict, tmp_path: Path):
    """A process that created the study and stopped before creating its parent run (its login refused, a
    crash) leaves the study without one: the next worker says so and creates it, without waiting."""
    host = admin["database"].removeprefix("postgresql://zoo@")
    storage = f"postgresql://zoo:{DB_PASSWORD}@{host}/optuna"
    optuna.create_study(study_name="orphan", storage=storage, direction="maximize")
    command = [*WORKER, "--study-name", "orphan", "--trials", "1", "--log-models", "none"]
    with started(command, env=env_of(admin["url"], tmp_path, WORKER_USER, WORKER_PASSWORD, ZOO_OPTUNA_STORAGE=storage),
                 cwd=tmp_path) as (worker,):
        out, err = worker.communicate(timeout=900)
    assert worker.returncode == 0, err[-3000:]
    assert "stopped before creating its MLflow parent run" in err
    assert json.loads(out)["trials_complete"] == 1


def test_a_client_without_valid_credentials_is_refused_and_creates_nothing(admin: dict, tmp_path: Path):
    url = admin["url"]
    before = everything_on_the_server()

    res, seconds = zoo("train", "--dry-run", "--epochs", "1", env=env_of(url, tmp_path), cwd=tmp_path)
    line = assert_refused_in_one_line(res, seconds, "asks for a login (401)", "MLFLOW_TRACKING_USERNAME")
    assert url in line
    res, seconds = zoo("train", "--dry-run", "--epochs", "1", env=env_of(url, tmp_path, WORKER_USER, "wrong"), cwd=tmp_path)
    assert_refused_in_one_line(res, seconds, f"refused the login of user '{WORKER_USER}' (401", "MLFLOW_TRACKING_PASSWORD")
    res, seconds = zoo("study", "--trials", "1", env=env_of(url, tmp_path, WORKER_USER, "wrong"), cwd=tmp_path)
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
    assert requests.post(f"{api}/runs/create", json=private, auth=(WORKER_USER, "wrong"), timeout=30).status_code == 401
    assert requests.post(f"{api}/runs/create", json=private, auth=(WORKER_USER, WORKER_PASSWORD), timeout=30).status_code == 403
    assert requests.post(f"{api}/experiments/delete", json=private, auth=(WORKER_USER, WORKER_PASSWORD),
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
