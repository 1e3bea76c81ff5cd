"""Two `zoo study` workers (PostgreSQL Optuna storage, a real `mlflow server`) while the MLflow server
is stopped mid-trial and started again on the same port and store about 25 s later.

What a user expects: the study still ends with exactly --trials finished trials, each one child run
of the one parent, every epoch logged once, no child left RUNNING, no trial failed or run twice.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import test_outage
from test_outage import AWAY, BACK, serve
from test_scaleout import training_run_of
from test_study import assert_all_children_of, study_runs, subprocess_env, wait_until
from servers import restart_postgres
from training.study.config import PARENT_ATTR, RUN_ATTR

TRIALS, EPOCHS = 4, 3
OUTAGE_S = 25  # a server restart, as a container restart or an upgrade takes
DB_DOWN_S = 6  # PostgreSQL stopped this long, then started again (pg_ctl restart, with a pause)
server_address = test_outage.server_address  # the fixture: one store, one port, servers started there in turn
GUARD_S = 600  # a worker that runs longer is hung (not a timing assertion)
WORKER = [sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--study-name", "outage",
          "--trials", str(TRIALS), "--epochs", str(EPOCHS), "--train-size", "1000", "--val-size", "200",
          "--test-size", "200", "--log-models", "best", "--heartbeat", "2", "--no-progress", "--format", "json",
          "--jobs", "1"]


@contextmanager
def workers(folder: Path, storage: str, count: int = 2, *extra: str) -> Iterator[list[tuple[subprocess.Popen, Path]]]:
    """``count`` study workers writing stderr to files (read while they run); killed if the test ends first."""
    env = {**subprocess_env(), "ZOO_OPTUNA_STORAGE": storage}
    procs = []
    for i in range(count):
        log = folder / f"worker{i}.err"
        procs.append((subprocess.Popen([*WORKER, *extra], stdout=open(folder / f"worker{i}.json", "w"),
                                       stderr=open(log, "w"), env=env, cwd=folder), log))
    try:
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def epoch_times(run_id: str) -> list[float]:
    return [m.timestamp / 1000 for m in MlflowClient().get_metric_history(run_id, "val_accuracy")]


def assert_the_study_whole(storage: str) -> list:
    """Exactly the requested trials, all complete: none failed by the outage, none run twice, each one
    FINISHED child run of the one FINISHED parent with every epoch logged once; returns the child runs."""
    study = optuna.load_study(study_name="outage", storage=storage)
    trials = study.get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: TRIALS}, Counter(t.state for t in trials)
    parents, children = study_runs()
    parent_id = study.user_attrs[PARENT_ATTR]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert MlflowClient().get_run(parent_id).info.status == "FINISHED"
    assert MlflowClient().get_run(parent_id).data.metrics["trials_complete"] == TRIALS
    assert_all_children_of(parent_id, children)
    assert sorted(t.user_attrs[RUN_ATTR] for t in trials) == sorted(r.info.run_id for r in children)
    assert {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), run.info.run_id
    return children


def assert_nothing_kept_locally() -> None:
    runs = Path(subprocess_env()["ZOO_CACHE_DIR"]) / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # every trial's epochs were sent, nothing kept


@pytest.mark.slow
def test_two_workers_ride_out_a_tracking_server_restart(server_address: dict, postgres: str, tmp_path: Path):
    storage = f"{postgres}/optuna"
    with ExitStack() as guard:
        with serve(server_address):
            procs = guard.enter_context(workers(tmp_path, storage))
            wait_until(lambda: any(training_run_of(p.pid) for p, _ in procs), GUARD_S, "a worker training a trial")
        stopped = time.time()  # the server is down mid-trial
        wait_until(lambda: any(AWAY in log.read_text() for _, log in procs), GUARD_S, "a worker noticing the outage")
        time.sleep(max(0.0, stopped + OUTAGE_S - time.time()))
        assert all(p.poll() is None for p, _ in procs), [log.read_text()[-2000:] for _, log in procs]
        restarted = time.time()
        with serve(server_address):
            for proc, log in procs:
                assert proc.wait(timeout=GUARD_S) == 0, log.read_text()[-3000:]
            stderr = "".join(log.read_text() for _, log in procs)
            assert AWAY in stderr and BACK in stderr, stderr[-3000:]

            children = assert_the_study_whole(storage)
            ended = [t for r in children for t in epoch_times(r.info.run_id)]
            assert any(stopped < t < restarted for t in ended), (stopped, sorted(ended), restarted)
    assert_nothing_kept_locally()


@pytest.mark.slow
def test_trials_trained_together_ride_out_a_tracking_server_restart(server_address: dict, tmp_path: Path):
    """`--batch-trials 2`: the two trials of a batch train on as one computation while the server is away, each
    keeping its own epochs for its own child run, sent once it is back; then the next batch."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with ExitStack() as guard:
        with serve(server_address):
            procs = guard.enter_context(workers(tmp_path, storage, 1, "--batch-trials", "2"))
            wait_until(lambda: training_run_of(procs[0][0].pid), GUARD_S, "the worker training a batch")
        stopped = time.time()
        wait_until(lambda: AWAY in procs[0][1].read_text(), GUARD_S, "the worker noticing the outage")
        time.sleep(max(0.0, stopped + OUTAGE_S - time.time()))
        assert procs[0][0].poll() is None, procs[0][1].read_text()[-2000:]
        restarted = time.time()
        with serve(server_address):
            assert procs[0][0].wait(timeout=GUARD_S) == 0, procs[0][1].read_text()[-3000:]
            assert BACK in procs[0][1].read_text()
            children = assert_the_study_whole(storage)
            assert {r.data.tags["zoo.trained_with_trials"] for r in children} == {"0,1", "2,3"}
            ended = [t for r in children for t in epoch_times(r.info.run_id)]
            assert any(stopped < t < restarted for t in ended), (stopped, sorted(ended), restarted)
    assert_nothing_kept_locally()


@pytest.mark.slow
def test_two_workers_ride_out_a_database_restart(server_address: dict, postgres: str, tmp_path: Path):
    """PostgreSQL (the Optuna storage) restarted mid-trial, down DB_DOWN_S: longer than two heartbeats,
    so a trial's heartbeat is late when it comes back, and the trial must not be taken for dead."""
    storage = f"{postgres}/optuna"
    with serve(server_address), workers(tmp_path, storage) as procs:
        wait_until(lambda: any(training_run_of(p.pid) for p, _ in procs), GUARD_S, "a worker training a trial")
        stopped = datetime.now()
        restart_postgres(postgres, down_s=DB_DOWN_S)
        restarted = datetime.now()
        for proc, log in procs:
            assert proc.wait(timeout=GUARD_S) == 0, log.read_text()[-3000:]
        stderr = "".join(log.read_text() for _, log in procs)
        lines = [line for line in stderr.splitlines() if line.startswith("zoo: the study's database at ")]
        assert any("stopped answering" in line for line in lines) and any("answers again" in line for line in lines), \
            stderr[-3000:]
        assert_the_study_whole(storage)
        trials = optuna.load_study(study_name="outage", storage=storage).get_trials()
        assert any(t.datetime_start < stopped and t.datetime_complete > restarted for t in trials), (stopped, restarted)
    assert_nothing_kept_locally()
