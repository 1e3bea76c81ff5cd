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
def test_mlflow_run_train_entry_point_logs_one_finished_run():
    proc = mlflow_run("-e", "train", "-P", "epochs=1", "-P", "register=mlproject-cnn", "-P", "alias=candidate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1  # the run `mlflow run` created is the one training logs to
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["mean"] == "0.1307"
    assert run.data.metrics["test_accuracy"] > 0.8  # one epoch on 3,500 real digits
    assert client.get_model_version_by_alias("mlproject-cnn", "candidate").run_id == run.info.run_id
