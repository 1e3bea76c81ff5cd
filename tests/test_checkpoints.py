"""Stopping and resuming training, the checkpoint policy, and unreachable servers, against real stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from servers import free_port
from servers import mlflow_server as served_mlflow
from zoo.cli.main import cli
from training import checkpoints, tracking
from training.train import train
from training.train_config import TrainConfig

TINY = ["--epochs", "3", "--max-batches", "15", "--seed", "7"]  # ~1,000 images per epoch
HANG_GUARD_S = 300  # a subprocess that runs longer is hung (not a timing assertion)


def zoo(*args: str, timeout: float = HANG_GUARD_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def steps(run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient().get_metric_history(run_id, key)]


def artifacts(run_id: str, folder: str = "checkpoints") -> list[str]:
    return [a.path for a in MlflowClient().list_artifacts(run_id, folder)]


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1]


def wait_for_first_checkpoint(proc: subprocess.Popen) -> str:
    """The run id of the training subprocess once its epoch-1 checkpoint is logged."""
    client, deadline = MlflowClient(), time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        if runs and "checkpoints/last.pt" in artifacts(runs[0].info.run_id):
            return runs[0].info.run_id
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no checkpoint appeared; training exited with {proc.poll()}: {proc.communicate()[1][-2000:]}")


@pytest.mark.slow
def test_resume_refuses_a_run_still_training_here_and_takes_over_one_whose_process_died(tmp_path: Path):
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "train", *TINY], stderr=err, stdout=subprocess.DEVNULL)
        try:
            run_id = wait_for_first_checkpoint(proc)
            proc.send_signal(signal.SIGSTOP)  # alive but held mid-training, however long the check below takes
            # Two processes training one run would interleave its metrics and overwrite its checkpoints.
            twice = zoo("train", "--resume", run_id)
            assert twice.returncode == 2, twice.stderr[-2000:]
            assert last_error_line(twice.stderr) == (
                f"Error: run {run_id} is still training in process {proc.pid} on this machine; stop it first (Ctrl-C "
                f"there, or kill {proc.pid}: the run ends KILLED with its last checkpoint), then resume it")
            assert proc.poll() is None  # the refused resume left the training alone
            proc.kill()  # SIGKILL (stopped or not): no handler runs, the run stays RUNNING with its last checkpoint
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    resumed = zoo("train", "--resume", run_id, "--format", "json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"run {run_id} is still marked RUNNING by " in resumed.stderr  # said, not silent
    run = MlflowClient().get_run(run_id)
    # (SIGKILL may land between an epoch's metrics and its checkpoint: that epoch is then trained again)
    assert run.info.status == "FINISHED" and sorted(set(steps(run_id, "val_accuracy"))) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_resume_matches_an_uninterrupted_run(tmp_path: Path):
    log = tmp_path / "stopped.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "train", *TINY], stderr=err, stdout=subprocess.DEVNULL)
        run_id = wait_for_first_checkpoint(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 1
    stderr = log.read_text()
    assert "Traceback" not in stderr
    assert last_error_line(stderr).startswith(f"Error: training stopped: run {run_id} ended KILLED after epoch ")
    assert f"zoo train --resume {run_id}" in stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["zoo.failure"] == "interrupted"
    done = steps(run_id, "val_accuracy")
    assert done in ([1], [1, 2]), done  # stopped mid-way, so the resume has epochs left to train
    assert "checkpoints/last.pt" in artifacts(run_id)

    # Agreeing options are accepted; the rest comes from the run.
    resumed = zoo("train", "--resume", run_id, "--epochs", "3", "--format", "json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    run = MlflowClient().get_run(run_id)
    assert summary["run_id"] == run_id and run.info.status == "FINISHED" and "zoo.failure" not in run.data.tags
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert steps(run_id, key) == [1, 2, 3], key
    assert summary["model_uri"] and mlflow.models.get_model_info(summary["model_uri"]).run_id == run_id

    fresh = zoo("train", *TINY, "--format", "json")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    fresh_run = json.loads(fresh.stdout)["run_id"]
    # Every RNG state restored: on CPU the resumed run is the uninterrupted one, bit for bit.
    assert summary["test_accuracy"] == json.loads(fresh.stdout)["test_accuracy"]
    history = MlflowClient().get_metric_history
    assert [m.value for m in history(run_id, "train_loss")] == [m.value for m in history(fresh_run, "train_loss")]


def default_sigint() -> None:
    """A shell that starts jobs in the background sets SIGINT to ignored and children inherit it; a
    terminal's Ctrl-C reaches a process that has Python's default handler (KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_stops_zoo_train_and_resume_takes_the_options_that_may_differ(tmp_path: Path):
    log = tmp_path / "stopped.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "train", *TINY, "--keep-checkpoints", "last"],
                                stderr=err, stdout=subprocess.DEVNULL, preexec_fn=default_sigint)
        run_id = wait_for_first_checkpoint(proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert proc.wait(timeout=HANG_GUARD_S) == 1
    stderr = log.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    # docs/training.md's line, whole: what stopped and what to run next, no "set ZOO_DEBUG=1" hint after it
    assert last_error_line(stderr) == (f"Error: training stopped: run {run_id} ended KILLED after epoch "
                                       f"{len(steps(run_id, 'val_accuracy'))}, its last checkpoint kept; "
                                       f"continue it with: zoo train --resume {run_id}")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["zoo.failure"] == "interrupted"
    assert artifacts(run_id) == ["checkpoints/last.pt"]

    # docs/training.md: --device, --precision, --data-dir and --keep-checkpoints may differ from the run's.
    resumed = zoo("train", "--resume", run_id, "--device", "cpu", "--keep-checkpoints", "all",
                  "--data-dir", str(tmp_path / "data"), "--format", "json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and steps(run_id, "val_accuracy") == [1, 2, 3]
    assert "checkpoints/epoch_003.pt" in artifacts(run_id)  # the resume's --keep-checkpoints all took effect
    assert "checkpoints/epoch_001.pt" not in artifacts(run_id)  # epoch 1 was trained under "last"


@pytest.fixture
def stopped_run(mnist_5k) -> str:
    """A 1-epoch run with its last checkpoint, marked KILLED as Ctrl-C leaves it."""
    result = train(TrainConfig(epochs=1, max_batches=2, seed=3, progress=False), dataset=mnist_5k, log_model=False)
    MlflowClient().set_terminated(result.run_id, "KILLED")
    return result.run_id


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "5"], "--epochs 5 (the run has 1)"),
    (["--lr", "0.5"], "--lr 0.5 (the run has 1.0)"),
    (["--mean", "0.5"], "--mean/--std"),
    (["--experiment", "other"], "leave out --experiment"),
])
def test_resume_refuses_options_that_contradict_the_run(stopped_run, args, expected):
    res = CliRunner().invoke(cli, ["train", "--resume", stopped_run, *args])
    assert res.exit_code == 2, res.output
    assert expected in last_error_line(res.stderr)
    assert MlflowClient().get_run(stopped_run).info.status == "KILLED"


def test_resume_tells_the_process_that_trained_a_run_from_a_later_one_given_its_pid(stopped_run):
    """PIDs are reused: a run left RUNNING by a process that died names a PID that may now belong to any
    other process. Resume refuses only while the process that trained the run lives."""
    import socket

    client = MlflowClient()
    client.update_run(stopped_run, status="RUNNING")  # its process died without ending it (SIGKILL)
    other = subprocess.Popen(["sleep", str(HANG_GUARD_S)])  # an unrelated process, started after the training
    try:
        client.set_tag(stopped_run, checkpoints.WORKER_TAG, f"{socket.gethostname()}:{other.pid}")  # the PID, reused
        res = CliRunner().invoke(cli, ["train", "--resume", stopped_run, "--format", "json"])
        assert res.exit_code == 0, res.output  # not "kill <pid>": that would kill the unrelated process
        assert f"run {stopped_run} is still marked RUNNING by " in res.stderr
        assert client.get_run(stopped_run).info.status == "FINISHED" and other.poll() is None

        # The process the tags name, started when they say: still training, refused.
        client.update_run(stopped_run, status="RUNNING")
        client.set_tag(stopped_run, checkpoints.WORKER_TAG, f"{socket.gethostname()}:{other.pid}")
        client.set_tag(stopped_run, checkpoints.WORKER_START_TAG, checkpoints.process_start(other.pid))
        res = CliRunner().invoke(cli, ["train", "--resume", stopped_run])
        assert res.exit_code == 2 and f"is still training in process {other.pid}" in res.stderr, res.output
    finally:
        other.kill()
        other.wait()


def test_resume_refuses_unknown_finished_and_checkpointless_runs(mnist_5k):
    finished = train(TrainConfig(epochs=1, max_batches=2, progress=False), dataset=mnist_5k, log_model=False).run_id
    no_last = train(TrainConfig(epochs=1, max_batches=2, keep_checkpoints="best", progress=False), dataset=mnist_5k,
                    log_model=False).run_id
    MlflowClient().set_terminated(no_last, "KILLED")
    for run_id, expected in (("0123456789abcdef", "no MLflow run '0123456789abcdef'"),
                             (finished, f"run {finished} is FINISHED: there is nothing to resume"),
                             (no_last, f"run {no_last} has no checkpoints/last.pt to resume from")):
        res = CliRunner().invoke(cli, ["train", "--resume", run_id])
        assert res.exit_code == 2, res.output
        assert last_error_line(res.stderr).startswith("Error: ") and expected in res.stderr


@pytest.mark.parametrize("keep, expected", [
    ("last,best", ["checkpoints/best.pt", "checkpoints/last.pt"]),
    ("all", ["checkpoints/best.pt", "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt", "checkpoints/epoch_003.pt",
             "checkpoints/last.pt"]),
    ("best", ["checkpoints/best.pt"]),
    ("none", []),
])
def test_keep_checkpoints_keeps_what_it_says(mnist_5k, keep, expected):
    result = train(TrainConfig(epochs=3, max_batches=3, lr=0.3, keep_checkpoints=keep, progress=False), dataset=mnist_5k,
                   log_model=False)
    assert artifacts(result.run_id) == expected
    if "checkpoints/last.pt" in expected:  # overwritten each epoch: it holds the last one, with what resume needs
        last = tracking.load_checkpoint(result.run_id, "checkpoints/last.pt")
        assert last["epoch"] == 3 and {"optimizer", "lr_scheduler", "rng", "history"} <= set(last)
    if "checkpoints/best.pt" in expected:  # weights only, of the best validation epoch
        best = tracking.load_checkpoint(result.run_id, "checkpoints/best.pt")
        assert set(best) == {"model", "epoch", "args", "normalization", "val_accuracy"}
        val = [r.val_accuracy for r in result.history]
        assert best["epoch"] == val.index(max(val)) + 1 and best["val_accuracy"] == max(val)


def test_bad_keep_checkpoints_exits_2_naming_the_valid_values():
    res = CliRunner().invoke(cli, ["train", "--dry-run", "--keep-checkpoints", "last,some"])
    assert res.exit_code == 2
    assert "give last, best, all or none, or a comma-separated list such as last,best" in res.stderr


@pytest.fixture
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real `mlflow server` serving artifacts over HTTP (mlflow-artifacts:/), the tests' store pointed at it."""
    with served_mlflow(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "served") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield tmp_path / "served"


@pytest.mark.slow
def test_served_artifacts_overwrite_last_and_delete_checkpoints(mnist_5k, mlflow_server: Path):
    result = train(TrainConfig(epochs=2, max_batches=2, progress=False), dataset=mnist_5k, log_model=False)
    assert MlflowClient().get_run(result.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert artifacts(result.run_id) == ["checkpoints/best.pt", "checkpoints/last.pt"]
    assert tracking.load_checkpoint(result.run_id, "checkpoints/last.pt")["epoch"] == 2
    tracking.delete_checkpoints(result.run_id)  # how a study drops the checkpoints of trials that are not its best
    assert artifacts(result.run_id) == []
    assert not any(p.suffix == ".pt" for p in mlflow_server.rglob("*"))


@pytest.mark.slow
def test_a_study_keeps_checkpoints_of_its_best_trial_only(tmp_path: Path):
    from training.study.config import RUN_ATTR, StudyConfig
    from training.study.workers import run_study

    config = StudyConfig(trials=3, epochs=1, max_batches=3, train_size=256, val_size=200, test_size=200, sampler="random",
                         storage=f"sqlite:///{tmp_path / 'optuna.db'}", progress=False)
    result = run_study(config)
    import optuna

    study = optuna.load_study(study_name=config.name, storage=config.storage)
    best = study.best_trial.user_attrs[RUN_ATTR]
    kept = {t.number: artifacts(t.user_attrs[RUN_ATTR]) for t in study.trials}
    assert kept[study.best_trial.number] == ["checkpoints/best.pt", "checkpoints/last.pt"]
    assert all(paths == [] for number, paths in kept.items() if number != study.best_trial.number), kept
    assert result.best_model_uri and mlflow.models.get_model_info(result.best_model_uri).run_id == best


def test_unreachable_tracking_server_fails_with_one_line():
    res = zoo("train", "--dry-run", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    line = last_error_line(res.stderr)
    assert line.startswith("Error: cannot reach the MLflow tracking server at http://127.0.0.1:")
    assert "MLFLOW_TRACKING_URI" in line


def test_unreachable_postgresql_storage_fails_with_one_line():
    port = free_port()
    res = zoo("study", "--trials", "1", "--storage", f"postgresql://zoo@127.0.0.1:{port}/x", timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    line = last_error_line(res.stderr)
    assert line.startswith(f"Error: cannot reach the Optuna storage postgresql://zoo@127.0.0.1:{port}/x (")
    assert "--storage" in line


@pytest.mark.slow
def test_resume_restores_dropout_randomness_and_the_best_epoch(mnist_5k):
    """mlp with dropout and keep_best: the resumed run draws the same dropout masks and restores the same best epoch."""
    from training.train import fit, resume

    config = TrainConfig(model="mlp", epochs=3, max_batches=5, lr=0.05, keep_best=True, model_config={"dropout": "0.3"},
                         progress=False)

    def stop_after_epoch_2(result) -> None:
        if result.epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises, once epoch 2's checkpoint is logged

    with pytest.raises(KeyboardInterrupt), tracking.start_run(run_name="stopped") as run:
        fit(config, mnist_5k, on_epoch=stop_after_epoch_2)
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"

    resumed = resume(run.info.run_id, dataset=mnist_5k, log_model=False)
    fresh = train(config, dataset=mnist_5k, log_model=False)
    assert resumed.run_id == run.info.run_id and steps(resumed.run_id, "val_accuracy") == [1, 2, 3]
    assert resumed.test_accuracy == fresh.test_accuracy and resumed.test_loss == fresh.test_loss
    metrics = [MlflowClient().get_run(r.run_id).data.metrics for r in (resumed, fresh)]
    assert metrics[0]["best_epoch"] == metrics[1]["best_epoch"]  # the recipe's keep_best, restored across the stop
