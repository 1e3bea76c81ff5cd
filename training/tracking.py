"""The one module that writes to MLflow: runs, params, metrics, checkpoints, models, registry.

Everything here acts on MLflow's *active run*, which is thread-local: a study running
trials in threads starts each child run in its own thread with an explicit
``parent_run_id`` (``nested=True`` alone would give orphans under threads).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from zoo.normalization import Normalization

DEFAULT_EXPERIMENT = "zoo"
FAILURE_TAG = "zoo.failure"


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


@contextmanager
def start_run(
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FINISHED, FAILED (with the reason as a tag) or KILLED (Ctrl-C), never left RUNNING.

    Inside ``mlflow run``, MLFLOW_RUN_ID names the run the project created, and it is reused.
    """
    if run_id is None and parent_run_id is None and os.environ.get("MLFLOW_RUN_ID"):
        run_id = os.environ["MLFLOW_RUN_ID"]
    experiment_id = None
    if parent_run_id is not None and run_id is None and not experiment:
        # A child lives in its parent's experiment, whatever the environment or the default say.
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    elif experiment and run_id is None:
        mlflow.set_experiment(experiment)
    elif run_id is None and not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)
    # A child started while its parent is active in this thread must be "nested" for MLflow.
    nested = parent_run_id is not None and mlflow.active_run() is not None
    run = mlflow.start_run(
        run_id=run_id, experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags, nested=nested
    )
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag(FAILURE_TAG, "interrupted")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag(FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: v for k, v in params.items() if v is not None})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_checkpoint(state: dict[str, Any], epoch: int, artifact_path: str = "checkpoints") -> None:
    """Save a training checkpoint (model, optimizer, lr_scheduler, epoch, args) as a run artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:03d}.pt"
        torch.save(state, path)
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: Any, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    """A text artifact (CSV, Markdown) of the active run."""
    mlflow.log_text(text, artifact_file)


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def model_metadata(
    *, model_name: str, normalization: Normalization, input_shape: tuple[int, ...], class_names: list[str], **extra: Any
) -> dict[str, Any]:
    """What downstream code needs to use a logged model without hard-coding anything."""
    return {
        "zoo_model": model_name,
        "normalization": normalization.to_dict(),
        "input_shape": list(input_shape),
        "class_names": list(class_names),
        **extra,
    }


def log_model(
    network: torch.nn.Module,
    *,
    model_name: str,
    normalization: Normalization,
    input_shape: tuple[int, int, int],
    class_names: list[str],
    registered_name: str | None = None,
    alias: str | None = None,
    **extra_metadata: Any,
) -> str:
    """Log ``network`` (it takes *normalized* input) as an MLflow PyTorch model; returns its model URI.

    The normalization, input shape and class names go into the model's metadata. The input
    example has a batch of 2 so the pickle-free pt2 export keeps the batch dimension dynamic.
    """
    network = network.eval().cpu()
    example = np.zeros((2, *input_shape), dtype=np.float32)
    info = mlflow.pytorch.log_model(
        network,
        name="model",
        input_example=example,
        metadata=model_metadata(
            model_name=model_name,
            normalization=normalization,
            input_shape=input_shape,
            class_names=class_names,
            **extra_metadata,
        ),
    )
    if registered_name:
        register(info.model_uri, registered_name, alias)
    return info.model_uri


def register(model_uri: str, name: str, alias: str | None = None) -> int:
    """Register ``model_uri`` as a new version of ``name``; point ``alias`` at it. Returns the version."""
    version = mlflow.register_model(model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return int(version.version)
