"""Scale-out: several `zoo study` workers on one study over a real PostgreSQL (Optuna storage) and a
real `mlflow server` (PostgreSQL backend store, served artifacts), one of them killed mid-trial.

What a user expects from N workers: the study ends with exactly --trials finished trials, each
trial one child run of the one parent run, and a worker that dies costs nothing but time: the
others fail its trial once its heartbeat stops, end its run KILLED, retry its point and finish
the study without it (restarting it is not needed).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections import Counter

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from test_study import assert_all_children_of, cli, small_config, started, study_runs, subprocess_env, wait_until
from training.study.config import PARENT_ATTR, RUN_ATTR, WORKER_TAG
from training.study.workers import run_study

TRIALS = 6
WORKERS = 3
# 1,000 training images = 16 batches: a few seconds per trial on a busy 2-core machine, long
# enough for the kill to land while the trial trains.
WORKER = [sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--study-name", "scale",
          "--trials", str(TRIALS), "--train-size", "1000", "--val-size", "200", "--test-size", "200",
          "--log-models", "none", "--heartbeat", "2", "--no-progress", "--format", "json",
          "--jobs", "1"]  # one trial per worker, so that the kill fails exactly one


def training_run_of(pid: int):
    """The RUNNING child run of worker ``pid`` once training has begun (fit logged its params), or None."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{WORKER_TAG}` = '{socket.gethostname()}:{pid}' "
                                           "and attributes.status = 'RUNNING'")
    return next((r for r in runs if "mean" in r.data.params), None)


@pytest.mark.slow
def test_three_workers_one_killed_end_with_exactly_the_requested_trials(tmp_path, postgres, mlflow_tracking_server):
    storage = f"{postgres}/optuna"
    env = {**subprocess_env(), "ZOO_OPTUNA_STORAGE": storage}  # the storage named by its variable, not --storage
    with started(*[WORKER] * WORKERS, env=env, cwd=tmp_path) as procs:
        victim, survivors = procs[0], procs[1:]
        wait_until(lambda: training_run_of(victim.pid) is not None, 600, "the first worker training a trial")
        killed_run_id = training_run_of(victim.pid).info.run_id
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        outputs = [p.communicate(timeout=900) for p in survivors]
    for p, (out, err) in zip(survivors, outputs):
        assert p.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="scale", storage=storage)
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    # Exactly the requested number finished, plus the one the kill failed; nothing left running or queued.
    assert states == {TrialState.COMPLETE: TRIALS, TrialState.FAIL: 1}, states
    parents, children = study_runs()
    parent_id = study.user_attrs[PARENT_ATTR]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert {json.loads(out)["parent_run_id"] for out, _ in outputs} == {parent_id}
    assert MlflowClient().get_run(parent_id).info.status == "FINISHED"
    assert_all_children_of(parent_id, children)
    # Each trial is one child run and each child run one trial: none duplicated, none lost.
    assert sorted(t.user_attrs[RUN_ATTR] for t in trials) == sorted(r.info.run_id for r in children)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.params["trial_number"]) for r in finished) == sorted(
        t.number for t in trials if t.state == TrialState.COMPLETE)

    killed = [r for r in children if r.info.status == "KILLED"]
    assert [r.info.run_id for r in killed] == [killed_run_id]
    assert "process died" in killed[0].data.tags["zoo.failure"]
    retry = [r for r in finished if r.data.tags.get("zoo.retry_of_run_id") == killed_run_id]
    assert len(retry) == 1
    assert (retry[0].data.params["mean"], retry[0].data.params["std"]) == (
        killed[0].data.params["mean"], killed[0].data.params["std"])
    assert retry[0].data.tags[WORKER_TAG] != killed[0].data.tags[WORKER_TAG]
    # Artifacts went through the server into its artifact folder (the workers never see that folder).
    assert children[0].info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((tmp_path / "served-artifacts").rglob("summary.json"))


def test_a_storage_the_workers_cannot_share_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("ZOO_OPTUNA_STORAGE", "redis://127.0.0.1:6379/0")
    result = CliRunner().invoke(cli, ["study", "--trials", "1", "--train-size", "64", "--val-size", "64",
                                      "--test-size", "64"])
    assert result.exit_code == 2
    assert "--storage must be a database URL such as sqlite:///optuna.db" in result.output
    assert "redis://127.0.0.1:6379/0" in result.output


def test_a_storage_url_with_a_password_is_shown_without_it():
    """A password written into the storage URL shows up as *** in the error, never in clear."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    result = CliRunner().invoke(cli, ["study", "--trials", "1", "--storage", f"postgresql://zoo:s3cret-pw@127.0.0.1:{port}/x"])
    assert result.exit_code == 1
    assert f"cannot reach the Optuna storage postgresql://zoo:***@127.0.0.1:{port}/x (" in result.output
    assert "s3cret-pw" not in result.output


@pytest.mark.slow
def test_a_password_in_the_storage_urls_query_stays_out_of_the_parent_run(tmp_path, postgres):
    """libpq takes the password as a query parameter too (``?password=``): the study's parent run
    records the storage it used (param ``optuna_storage``, tag ``optuna.storage``) without it."""
    storage = f"{postgres}/optuna?password=s3cret-pw"
    result = run_study(small_config(tmp_path, trials=1, epochs=1, max_batches=2, storage=storage))

    parent = MlflowClient().get_run(result.parent_run_id).data
    assert parent.params["optuna_storage"] == f"{postgres}/optuna?password=***"
    assert parent.tags["optuna.storage"] == f"{postgres}/optuna?password=***"
