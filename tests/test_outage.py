"""A real `mlflow server` stopped and started again on the same port and store while `zoo train` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from servers import free_port, mlflow_server
from test_checkpoints import HANG_GUARD_S, artifacts, last_error_line, steps, wait_for_first_checkpoint, zoo

EPOCHS = 5
TRAIN = ["train", "--epochs", str(EPOCHS), "--max-batches", "8", "--seed", "3", "--format", "json"]
KEYS = ("train_loss", "val_loss", "val_accuracy", "epoch_seconds")
AWAY, BACK = "stopped answering", "answers again"


@pytest.fixture
def server_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One store (SQLite, served artifacts) and one loopback port that servers are started on, one after another."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield {"port": port, "store": f"sqlite:///{tmp_path / 'server.db'}", "artifacts": tmp_path / "served"}
    mlflow.set_tracking_uri(None)


def serve(address: dict):
    return mlflow_server(address["store"], address["artifacts"], port=address["port"])


def start_training(log: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zoo.cli", *TRAIN, *extra], stdout=open(out, "w"),
                            stderr=open(log, "w"))


def wait_for_line(log: Path, text: str, proc: subprocess.Popen) -> float:
    """When ``text`` appeared in the training's stderr (it must, before the process ends or the guard)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {text!r} line; exit {proc.poll()}: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    return time.time()


def assert_every_epoch_once(run_id: str) -> None:
    for key in KEYS:
        assert steps(run_id, key) == list(range(1, EPOCHS + 1)), key


@pytest.mark.slow
def test_training_rides_out_a_tracking_server_restart(server_address: dict, tmp_path: Path):
    log, out = tmp_path / "train.err", tmp_path / "train.json"
    with serve(server_address):
        proc = start_training(log, out)
        run_id = wait_for_first_checkpoint(proc)
    try:
        stopped = time.time()  # the server is down: training goes on, keeping what it logs
        wait_for_line(log, AWAY, proc)
        time.sleep(4)  # about two more epochs while the server is away
        restarted = time.time()
        with serve(server_address):
            assert proc.wait(timeout=HANG_GUARD_S) == 0, log.read_text()[-3000:]
            stderr = log.read_text()
            assert stderr.count(AWAY) == 1 and stderr.count(BACK) == 1, stderr[-3000:]
            run = MlflowClient().get_run(run_id)
            assert run.info.status == "FINISHED"
            assert_every_epoch_once(run_id)
            # Epochs trained while the server was away were logged when it came back, at the time they ended.
            ended = [m.timestamp / 1000 for m in MlflowClient().get_metric_history(run_id, "val_accuracy")]
            assert any(stopped < t < restarted for t in ended), (stopped, ended, restarted)
            assert artifacts(run_id) == ["checkpoints/best.pt", "checkpoints/last.pt"]
            summary = json.loads(out.read_text())
            assert summary["run_id"] == run_id and mlflow.models.get_model_info(summary["model_uri"]).run_id == run_id
            assert not (Path(os.environ["ZOO_CACHE_DIR"]) / "runs" / run_id).exists()  # sent, so not kept
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_server_away_past_the_bound_stops_training_and_resume_finishes_the_run(server_address: dict, tmp_path: Path):
    log, out = tmp_path / "train.err", tmp_path / "train.json"
    with serve(server_address):
        proc = start_training(log, out, "--tracking-timeout", "3")
        run_id = wait_for_first_checkpoint(proc)
    try:
        assert proc.wait(timeout=HANG_GUARD_S) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log.read_text()
    line = last_error_line(stderr)
    kept = Path(os.environ["ZOO_CACHE_DIR"]) / "runs" / run_id / "checkpoints" / "last.pt"
    assert line.startswith(f"Error: the MLflow tracking server at http://127.0.0.1:{server_address['port']} did not "
                           f"answer for 3 s (--tracking-timeout): run {run_id} stopped after epoch "), line
    assert f"its checkpoint kept at {kept}; once the server is back, finish the run with: zoo train --resume {run_id}" in line
    assert "Traceback" not in stderr and kept.is_file()

    with serve(server_address):
        resumed = zoo("train", "--resume", run_id, "--format", "json")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from the checkpoint kept on this machine, {kept}" in resumed.stderr
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FINISHED"
        assert_every_epoch_once(run_id)  # those kept locally were sent by the resume, none twice
        assert artifacts(run_id) == ["checkpoints/best.pt", "checkpoints/last.pt"]
        assert tracking_epoch(run_id) == EPOCHS
        assert json.loads(resumed.stdout)["model_uri"]
    assert not kept.exists()


def tracking_epoch(run_id: str) -> int:
    from training import tracking

    return tracking.load_checkpoint(run_id, "checkpoints/last.pt")["epoch"]


@pytest.mark.parametrize("env, args", [({"ZOO_TRACKING_TIMEOUT": "ten"}, []), ({}, ["--tracking-timeout", "-1"])])
def test_a_bad_tracking_timeout_exits_2_before_any_run(env: dict, args: list[str]):
    res = zoo("train", "--dry-run", *args, env=env, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--tracking-timeout" in last_error_line(res.stderr)
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


@pytest.mark.parametrize("lost", ["logged", "registered"])
def test_logging_and_registering_again_after_a_lost_answer_leave_one_model_and_one_described_version(lost, mnist_5k):
    """The logged model and the registered version are retried as one unit once the tracking server
    is back: a connection that dropped after the model was logged (``logged``), or after its version
    was created (``registered``), must not leave a second logged model or a version without its
    description and alias."""
    import torch

    from zoo.model_format import mlflow_model
    from training import tracking
    from zoo.models.registry import create_model, get_model_spec

    torch.manual_seed(0)
    model = dict(model_name="mnist_cnn", normalization=get_model_spec("mnist_cnn").normalization,
                 input_shape=mnist_5k.image_shape, class_names=mnist_5k.classes,
                 sample_images=mnist_5k.test.images[:2], dataset="mnist-5k", test_accuracy=0.5)
    network = create_model("mnist_cnn")
    with tracking.start_run(run_name="retried") as run:
        first = mlflow_model.log_model(network, onnx=False, **model)  # what the attempt whose answer was lost did
        if lost == "registered":
            mlflow.register_model(first, "digits")
        retried = tracking.log_model(network, registered_name="digits", alias="champion", **model)

    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.model_id for m in logged] == [first.rpartition("/")[2]] and retried == first
    versions = MlflowClient().search_model_versions("name = 'digits'")
    assert [int(v.version) for v in versions] == [1]
    assert versions[0].description.startswith("mnist_cnn trained on mnist-5k")
    assert versions[0].run_id == run.info.run_id
    assert MlflowClient().get_model_version_by_alias("digits", "champion").version == versions[0].version


def test_a_call_to_a_server_that_never_answers_waits_up_to_the_bound_then_says_what_to_do(monkeypatch, capsys):
    """The one waiting policy on a real MLflow client and a port nothing listens on: one line when the server
    goes away, calls made again until the bound, then ServerGone naming the bound and the next step."""
    from training.outage import Patience
    from training.tracking import ServerGone

    port = free_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    calls = []

    def call() -> None:
        calls.append(1)
        MlflowClient().get_experiment("0")

    with pytest.raises(ServerGone, match=rf"127\.0\.0\.1:{port} did not answer for 3 s \(--tracking-timeout\); "
                                         "once it is back, re-run it"):
        Patience(3, then="re-run it").patiently(call)
    assert len(calls) >= 2  # made again while waiting, not given up at once
    assert capsys.readouterr().err.count(AWAY) == 1
