"""Registering logged models in MLflow's model registry: names, aliases, version descriptions and tags,
all from the logged model's metadata, so train, study and renorm register alike."""

from __future__ import annotations

import re
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from zoo.normalization import Normalization
from zoo.errors import UsageError


def check_registry_names(name: str | None, alias: str | None) -> None:
    """Validate a registered-model name and alias before any training time is spent."""
    if alias and not name:
        raise UsageError("--alias needs --register NAME (the registered model the alias belongs to)")
    if name is not None and not name.strip():
        raise UsageError("the registered model name is empty")
    if alias is None:
        return
    # MLflow reserves "latest" and version-like aliases ("v3") for version lookups.
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UsageError(f"alias {alias!r} is reserved by MLflow (latest, vN); choose another, e.g. champion or staging")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias):
        raise UsageError(f"alias {alias!r} may only contain letters, digits, '_' and '-'")


def register(model_uri: str, name: str, alias: str | None = None) -> int:
    """Register ``model_uri`` as a version of ``name``, described and tagged, ``alias`` pointing at it; the version.
    Safe to call again (a retry after an outage): the version made from ``model_uri`` is reused."""
    info = mlflow.models.get_model_info(model_uri)
    metadata = info.metadata or {}
    version = (existing_version(name, model_uri, info.run_id)
               or mlflow.register_model(model_uri, name, tags=version_tags(metadata, info.run_id)))
    client = MlflowClient()
    client.update_model_version(name, version.version, description=version_description(metadata, info.run_id))
    client.update_registered_model(name, description=registered_model_description(metadata, name, version.version, alias))
    for key, value in registered_model_tags(metadata).items():
        client.set_registered_model_tag(name, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def existing_version(name: str, model_uri: str, run_id: str | None) -> ModelVersion | None:
    """The version of registered model ``name`` made from ``model_uri`` (``models:/m-...``), or None."""
    if run_id is None:
        return None
    escaped = name.replace("'", "\\'")
    model_id = model_uri.rstrip("/").rpartition("/")[2]
    versions = MlflowClient().search_model_versions(f"name = '{escaped}' and run_id = '{run_id}'")
    return next((v for v in versions if model_id in (v.model_id, v.source.rpartition("/")[2])
                 and v.status == "READY"), None)


def _accuracy(metadata: dict[str, Any]) -> tuple[str, float] | None:
    """(metric name, value): a trained model's test accuracy, or a renormalized one's top-1 agreement."""
    return next(((k, float(metadata[k])) for k in ("test_accuracy", "top1") if metadata.get(k) is not None), None)


def _source(metadata: dict[str, Any]) -> str:
    if metadata.get("dataset"):
        return f"trained on {metadata['dataset']}"
    if metadata.get("weights"):
        evaluated = f", evaluated on {metadata['eval_data']}" if metadata.get("eval_data") else ""
        return f"pretrained weights {metadata['weights']}, adapted by {metadata.get('adaptation', 'none')}{evaluated}"
    return "source unknown"


def _normalization_text(metadata: dict[str, Any]) -> str:
    return str(Normalization.from_dict(metadata["normalization"])) if "normalization" in metadata else "unknown"


def version_tags(metadata: dict[str, Any], run_id: str | None) -> dict[str, str]:
    accuracy = _accuracy(metadata)
    return {"zoo_model": str(metadata.get("zoo_model", "unknown")),
            "dataset": str(metadata.get("dataset") or metadata.get("eval_data") or "unknown"),
            "normalization": _normalization_text(metadata), "source_run_id": str(run_id),
            **({"weights": str(metadata["weights"])} if metadata.get("weights") else {}),
            **({accuracy[0]: f"{accuracy[1]:.4f}"} if accuracy else {})}


def version_description(metadata: dict[str, Any], run_id: str | None) -> str:
    accuracy = _accuracy(metadata)
    scored = f"; {accuracy[0]} {accuracy[1]:.4f}" if accuracy else ""
    return (f"{metadata.get('zoo_model', 'model')} {_source(metadata)}, normalization {_normalization_text(metadata)} "
            f"(inside the model){scored}. Logged by run {run_id}.")


def registered_model_description(metadata: dict[str, Any], name: str, version: str, alias: str | None) -> str:
    classes = [str(c) for c in metadata.get("class_names", [])]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    shape = "x".join(map(str, metadata.get("input_shape", [])))
    accuracy = _accuracy(metadata)
    scored = f", {accuracy[0]} {accuracy[1]:.4f}" if accuracy else ""
    pointer = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    return (f"{metadata.get('zoo_model', 'A zoo')} image classifier, {len(classes)} classes ({shown}). "
            f"Takes images (column 'image': PNG/JPEG bytes, base64 over REST) or pixels in [0, 1] "
            f"(column 'pixels', {shape}); the normalization is inside the model. Answers label, probability and top-k.\n\n"
            f"Latest version {version} ({pointer}): {_source(metadata)}, normalization {_normalization_text(metadata)}{scored}.")


def registered_model_tags(metadata: dict[str, Any]) -> dict[str, str]:
    return {"task": "image-classification", "zoo_model": str(metadata.get("zoo_model", "unknown")),
            "input": "image bytes or pixels in [0, 1], " + "x".join(map(str, metadata.get("input_shape", []))),
            "classes": str(len(metadata.get("class_names", [])))}
