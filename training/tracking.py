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
    stopped: tuple[type[BaseException], ...] = (),
) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FINISHED, FAILED (with the reason as a tag) or KILLED (Ctrl-C), never left RUNNING.

    Exceptions of the ``stopped`` types (e.g. a pruned study trial) end the run KILLED
    with the reason, not FAILED: the run was stopped on purpose, nothing broke.
    Inside ``mlflow run``, MLFLOW_RUN_ID names the run the project created, and it is reused.
    """
    if run_id is None and parent_run_id is None and os.environ.get("MLFLOW_RUN_ID"):
        run_id = os.environ["MLFLOW_RUN_ID"]
    if experiment and run_id is None:
        mlflow.set_experiment(experiment)
    elif run_id is None and not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)
    run = mlflow.start_run(run_id=run_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag(FAILURE_TAG, "interrupted")
        mlflow.end_run("KILLED")
        raise
    except stopped as exc:
        mlflow.set_tag(FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag(FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def create_run(*, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a RUNNING run that is *not* the active run (a study's parent, shared by threads
    and processes); returns its id. End it with :func:`end_run_by_id`."""
    experiment_obj = mlflow.set_experiment(experiment)
    tags = {"mlflow.runName": run_name, **(tags or {})}
    return MlflowClient().create_run(experiment_obj.experiment_id, tags=tags, run_name=run_name).info.run_id


def end_run_by_id(run_id: str, status: str, reason: str | None = None) -> None:
    """Set a run's final status (FINISHED, FAILED, KILLED), recording ``reason`` as a tag."""
    client = MlflowClient()
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status)


def reopen_run(run_id: str) -> None:
    """Mark a run RUNNING again (a resumed study's parent), dropping the reason it stopped."""
    client = MlflowClient()
    if FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    client.update_run(run_id, status="RUNNING")


def default_experiment() -> str:
    """The experiment a new run goes to: MLFLOW_EXPERIMENT_NAME / _ID when set, else ``zoo``."""
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return MlflowClient().get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"]).name
    return DEFAULT_EXPERIMENT


def run_experiment_name(run_id: str) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def run_status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def load_checkpoint(run_id: str, artifact_path: str) -> dict[str, Any]:
    """A checkpoint written by :func:`log_checkpoint`, read back from the run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        return torch.load(path, map_location="cpu", weights_only=True)


def set_tags(tags: dict[str, Any], run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.set_tags(tags)
    else:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    mlflow.log_params({k: v for k, v in params.items() if v is not None}, run_id=run_id)


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    mlflow.log_metrics(metrics, step=step, run_id=run_id)


def log_checkpoint(state: dict[str, Any], epoch: int, artifact_path: str = "checkpoints") -> None:
    """Save a training checkpoint (model, optimizer, lr_scheduler, epoch, args) as a run artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:03d}.pt"
        torch.save(state, path)
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: Any, artifact_file: str, run_id: str | None = None) -> None:
    mlflow.log_dict(data, artifact_file, run_id=run_id)


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    mlflow.log_text(text, artifact_file, run_id=run_id)


def log_figure(figure, artifact_file: str, run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.log_figure(figure, artifact_file)
    else:
        MlflowClient().log_figure(run_id, figure, artifact_file)


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
