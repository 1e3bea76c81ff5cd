"""Checkpoint bytes a normalization study leaves per trial, measured on real trials, projected to 200.

    PYTHONPATH=. python benchmarks/checkpoint_footprint.py --trials 4 --epochs 1

Run it with another checkout first on PYTHONPATH to measure that code's scheme (e.g. the
scheme before checkpoint retention, exported with `git archive`). A checkpoint's size does
not depend on how long the trial trains, so trials train a few batches only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def measure(trials: int, epochs: int, project_to: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # mlflow.db and ./mlruns (the artifacts) land here
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        from training.study.config import StudyConfig
        from training.study.workers import run_study

        run_study(StudyConfig(trials=trials, epochs=epochs, max_batches=2, train_size=256, val_size=200, test_size=200,
                              sampler="random", storage=f"sqlite:///{tmp}/optuna.db", progress=False))
        per_trial = sorted(_checkpoint_bytes(run.info.artifact_uri) for run in _trial_runs())
    total = sum(per_trial)
    # Projection: the best trial's bytes once, every other trial's at their mean.
    best = max(per_trial)
    others = (total - best) / max(len(per_trial) - 1, 1)
    return {"trials": trials, "epochs": epochs, "per_trial_bytes": per_trial, "total_bytes": total,
            f"projected_{project_to}_trials_bytes": round(best + others * (project_to - 1))}


def _trial_runs() -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _checkpoint_bytes(artifact_uri: str) -> int:
    from mlflow.utils.file_utils import local_file_uri_to_path

    folder = Path(local_file_uri_to_path(artifact_uri)) / "checkpoints"
    return sum(f.stat().st_size for f in folder.glob("*.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--project-to", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(measure(args.trials, args.epochs, args.project_to), indent=2))


if __name__ == "__main__":
    main()
