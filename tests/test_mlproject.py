"""`mlflow run . -e ENTRY --env-manager local` as a user runs it, in real subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent


def mlflow_run(*args: str) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    # The entry points call `python`: the one of this environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(PROJECT), *args, "--env-manager", "local"],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_mlflow_run_train_entry_point_logs_one_finished_run_in_the_zoo_experiment():
    proc = mlflow_run("-e", "train", "-P", "epochs=1", "-P", "register=mlproject-cnn", "-P", "alias=candidate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    # `mlflow run` given no experiment files its own run in Default; the training lands in `zoo`,
    # beside what the `zoo` commands log, and the project run points at it.
    (run,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["mean"] == "0.1307"
    assert run.data.metrics["test_accuracy"] > 0.8  # one epoch on 3,500 real digits
    assert run.info.run_name == "0.1307/0.3081 1ep s1 · mnist_cnn mnist-5k"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert client.get_model_version_by_alias("mlproject-cnn", "candidate").run_id == run.info.run_id
    (project_run,) = client.search_runs(["0"])
    assert run.data.tags["zoo.project_run_id"] == project_run.info.run_id
    assert project_run.data.tags["zoo.run_id"] == run.info.run_id and project_run.info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_run_with_an_experiment_logs_into_its_own_run():
    proc = mlflow_run("-e", "train", "-P", "epochs=1", "-P", "precision=bf16-mixed", "--experiment-name", "mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert client.get_experiment(run.info.experiment_id).name == "mine"
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] > 0.8
    assert run.data.params["precision"] == "bf16-mixed"  # the entry point's parameter reached zoo train
    assert client.get_experiment_by_name("mine").tags["mlflow.experimentKind"] == "custom_model_development"
