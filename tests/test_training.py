"""zoo train / training.train against a real MLflow store."""

import json
import os

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from zoo.cli.main import cli


def all_runs():
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_trained_run_records_params_metrics_checkpoints_and_model(registered_model):
    result = registered_model["result"]
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "mnist_cnn" and params["dataset"] == "mnist-5k"
    assert (params["mean"], params["std"]) == ("0.1307", "0.3081")
    assert (params["epochs"], params["batch_size"], params["optimizer"], params["lr"], params["seed"]) == (
        "2", "64", "adadelta", "1.0", "1")
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2]
    assert 0.9 <= run.data.metrics["test_accuracy"] <= 1.0  # 2 epochs on 3,500 real digits
    checkpoints = [a.path for a in client.list_artifacts(result.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/best.pt", "checkpoints/last.pt"]  # the default: last and best
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=checkpoints[-1]),
                       weights_only=True)
    assert set(state) >= {"model", "optimizer", "lr_scheduler", "epoch", "args", "rng", "history"} and state["epoch"] == 2
    meta = mlflow.models.get_model_info(result.model_uri).metadata
    assert meta["normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert meta["input_shape"] == [1, 28, 28] and meta["class_names"] == [str(d) for d in range(10)]


def test_train_cli_logs_a_custom_normalization_and_prints_json():
    res = CliRunner().invoke(cli, ["train", "--mean", "0.5", "--std", "0.25", "--epochs", "2", "--dry-run",
                                   "--no-checkpoints", "--format", "json", "--register", "quick", "--alias", "dev"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert summary["registered"] == "models:/quick@dev"
    run = MlflowClient().get_run(summary["run_id"])
    assert (run.data.params["mean"], run.data.params["std"]) == ("0.5", "0.25")
    version = MlflowClient().get_model_version_by_alias("quick", "dev")
    assert version.run_id == summary["run_id"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--std", "0"], "std must be positive"),
        (["--mean", "abc"], "not a number"),
        (["--model", "vgg99"], "unknown model 'vgg99'; valid models: "),
        (["--dataset", "cifar"], "unknown dataset 'cifar'; valid datasets: cifar10, cifar100, "
                                   "emnist-letters, fashion-mnist, kmnist, mnist, mnist-5k, stl10, svhn"),
        (["--optimizer", "lbfgs"], "only adadelta, sgd, adam, adamw are supported"),
        (["--alias", "x"], "--alias needs --register"),
        (["--register", "m", "--alias", "latest"], "alias 'latest' is reserved by MLflow"),
        (["--precision", "fp16"], "'fp16' is not one of 'fp32', 'bf16-mixed'"),
        (["--model", "scratch_mlp", "--precision", "bf16-mixed"], "the scratch trainer computes in float32 only"),
        # mnist-5k holds 0.2 of its digits out for testing: validation may take less than the other 0.8.
        (["--val-fraction", "0.85"], "the val fraction (0.85) and test fraction (0.2) leave no images to train on"),
        (["--val-fraction", "0.8"], "the val fraction (0.8) and test fraction (0.2) leave no images to train on"),
        (["--val-fraction", "0.0005"], "the val split would hold no images"),
    ],
)
def test_bad_train_input_exits_2_with_one_line_and_leaves_no_run(args, expected):
    res = CliRunner().invoke(cli, ["train", "--epochs", "1", "--dry-run", *args])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert expected in res.stderr
    assert [r.info.status for r in all_runs() if r.info.status == "RUNNING"] == []


def test_a_libraries_value_error_is_a_runtime_failure_with_the_traceback_hint_not_bad_usage(tmp_path):
    # MLflow raises ValueError for a setting it cannot parse: the command line was fine, so not exit 2.
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "five", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("ZOO_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "--epochs", "1", "--dry-run"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE" in line and line.endswith("(set ZOO_DEBUG=1 for the traceback)")


def test_diverging_training_exits_1_and_marks_the_run_failed_with_the_reason():
    res = CliRunner().invoke(cli, ["train", "--optimizer", "sgd", "--lr", "1e12", "--epochs", "2", "--dry-run",
                                   "--no-checkpoints"])
    assert res.exit_code == 1, res.output
    assert "training diverged at epoch 1" in res.stderr
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["zoo.failure"]
    # What was recorded before the failure is kept.
    assert run.data.params["lr"] == "1000000000000.0" and "train_loss" in run.data.metrics


def test_unavailable_dataset_exits_1_naming_alternatives(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--dry-run"],
                             env={"ZOO_OFFLINE": "1"})
    # Offline here: torchvision cannot download, so the error names where it looked.
    assert res.exit_code == 1, res.output
    assert "mnist-5k" in res.stderr and "fashion-mnist" in res.stderr
    assert all_runs() == []


@pytest.mark.slow
def test_bf16_mixed_trains_as_well_as_fp32_and_the_run_says_which(mnist_5k):
    from training.engine import PRECISIONS
    from training.train import train
    from training.train_config import TrainConfig

    results = {precision: train(TrainConfig(epochs=1, precision=precision, progress=False, checkpoints=False),
                                dataset=mnist_5k, log_model=False) for precision in PRECISIONS}
    for precision, result in results.items():
        assert MlflowClient().get_run(result.run_id).data.params["precision"] == precision
    fp32, bf16 = results["fp32"].test_accuracy, results["bf16-mixed"].test_accuracy
    assert bf16 >= 0.85 and abs(bf16 - fp32) <= 0.03, (fp32, bf16)  # one epoch on 3,500 digits
    # Only the forward pass ran in bfloat16: the weights (and so the logged model) stay float32.
    assert {p.dtype for p in results["bf16-mixed"].network.parameters()} == {torch.float32}
    precision_option = next(p for p in cli.commands["train"].params if p.name == "precision")
    assert tuple(precision_option.type.choices) == PRECISIONS  # the CLI offers what the engine knows


NESTED_BARS = """
from zoo.progress import tqdm
with tqdm(total=2, desc="renorm resnet18", unit="eval", mininterval=0) as outer:
    for _ in range(2):
        with tqdm(total=50, desc="scoring", unit="img", leave=False, mininterval=0) as inner:
            for _ in range(50):
                inner.update()
        tqdm.write("one evaluation done")
        outer.update()
"""


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    """Nested bars (as `zoo renorm` draws them) with stderr in a file (CI, `2> log`): no carriage
    returns or cursor escapes, one readable line per refresh."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        subprocess.run([sys.executable, "-c", NESTED_BARS], stderr=err, stdout=subprocess.DEVNULL, check=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text, repr(text[:300])
    lines = text.splitlines()
    assert lines and all(line.startswith(("renorm resnet18:", "scoring:")) for line in lines), lines
    assert lines[-1].startswith("renorm resnet18: 100%|##########| 2/2")
    assert sum(line.startswith("scoring: 100%") for line in lines) == 2


@pytest.mark.slow
def test_zoo_train_prints_zoo_lines_only_unless_the_user_asks_mlflow_for_its_own(tmp_path):
    """MLflow's INFO lines (database creation, signature validation) and its artifact progress bars stay off
    in a log file; a user's own MLFLOW_LOGGING_LEVEL still wins."""
    import subprocess
    import sys

    def stderr_of(folder: str, **env: str) -> str:
        (tmp_path / folder).mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / folder}/mlflow.db", **env}
        res = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "--epochs", "1", "--dry-run"],
                             env=env, cwd=tmp_path / folder, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return res.stderr

    quiet = stderr_of("quiet")
    assert "INFO mlflow" not in quiet and "Downloading artifacts" not in quiet and "\r" not in quiet, quiet
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in stderr_of(
        "asked", MLFLOW_LOGGING_LEVEL="INFO")


def test_bf16_mixed_evaluation_loss_is_taken_in_float32(mnist_5k):
    """Under bf16-mixed only the forward pass runs in bfloat16: val_loss and test_loss are the float32
    cross-entropy of its logits, not a bfloat16 sum (8 significant bits: 312.0 for 312.086)."""
    import torch.nn.functional as F

    from training.engine import autocast, evaluate
    from zoo.models.registry import create_model
    from zoo.normalization import Normalization

    torch.manual_seed(0)
    network, split = create_model("mnist_cnn").eval(), mnist_5k.test.subset(256)
    normalization = Normalization((0.1307,), (0.3081,))
    with torch.inference_mode(), autocast("bf16-mixed", torch.device("cpu")):
        logits = network(normalization.apply(split.images))
    assert logits.dtype == torch.bfloat16  # the forward pass did run in bfloat16
    expected = F.cross_entropy(logits.double(), split.labels).item()
    loss, _ = evaluate(network, split, normalization, batch_size=256, precision="bf16-mixed")
    assert loss == pytest.approx(expected, rel=1e-6)


def test_zoo_train_builds_the_network_once():
    """Every check before the run (optimizer, image shape) runs on the network that trains: with
    --weights pretrained each build would load the weights again."""
    from zoo.models.mnist_cnn import mnist_cnn
    from zoo.models.registry import register_model
    from zoo.normalization import Normalization

    built = []

    @register_model("build_counter_cnn", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity())
    def build_counter_cnn(**kwargs):
        """mnist_cnn, counting its builds."""
        built.append(kwargs)
        return mnist_cnn(**kwargs)

    res = CliRunner().invoke(cli, ["train", "--model", "build_counter_cnn", "--epochs", "1", "--dry-run",
                                   "--no-checkpoints", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(built) == 1, built
