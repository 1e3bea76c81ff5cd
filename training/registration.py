"""Registering logged models: names, aliases, descriptions and tags from the logged model's metadata,
so train, study and renorm register alike."""

from __future__ import annotations

import re

import mlflow
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
    meta, run_id, client = info.metadata or {}, info.run_id, MlflowClient()
    scored = next(((k, float(meta[k])) for k in ("test_accuracy", "top1") if meta.get(k) is not None), None)
    normalization = str(Normalization.from_dict(meta["normalization"])) if "normalization" in meta else "unknown"
    model, classes = meta.get("zoo_model", "unknown"), [str(c) for c in meta.get("class_names", [])]
    shape = "x".join(map(str, meta.get("input_shape", [])))
    if meta.get("dataset"):
        source = f"trained on {meta['dataset']}"
    elif meta.get("weights"):
        evaluated = f", evaluated on {meta['eval_data']}" if meta.get("eval_data") else ""
        source = f"pretrained weights {meta['weights']}, adapted by {meta.get('adaptation', 'none')}{evaluated}"
    else:
        source = "source unknown"
    model_id = model_uri.rstrip("/").rpartition("/")[2]
    escaped = name.replace("'", "\\'")
    existing = run_id and next((v for v in client.search_model_versions(f"name = '{escaped}' and run_id = '{run_id}'")
                                if model_id in (v.model_id, v.source.rpartition("/")[2]) and v.status == "READY"), None)
    version = existing or mlflow.register_model(model_uri, name, tags={
        "zoo_model": str(model), "dataset": str(meta.get("dataset") or meta.get("eval_data") or "unknown"),
        "normalization": normalization, "source_run_id": str(run_id),
        **({"weights": str(meta["weights"])} if meta.get("weights") else {}),
        **({scored[0]: f"{scored[1]:.4f}"} if scored else {})})
    score = f"{scored[0]} {scored[1]:.4f}" if scored else ""
    client.update_model_version(name, version.version, description=(
        f"{meta.get('zoo_model', 'model')} {source}, normalization {normalization} (inside the model)"
        f"{'; ' + score if score else ''}. Logged by run {run_id}."))
    pointer = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    client.update_registered_model(name, description=(
        f"{meta.get('zoo_model', 'A zoo')} image classifier, {len(classes)} classes ({', '.join(classes[:10])}"
        f"{', ...' if len(classes) > 10 else ''}). Takes images (column 'image': PNG/JPEG bytes, base64 over REST) "
        f"or pixels in [0, 1] (column 'pixels', {shape}); the normalization is inside the model. Answers label, "
        f"probability and top-k.\n\nLatest version {version.version} ({pointer}): {source}, normalization "
        f"{normalization}{', ' + score if score else ''}."))
    for key, value in {"task": "image-classification", "zoo_model": str(model), "classes": str(len(classes)),
                       "input": f"image bytes or pixels in [0, 1], {shape}"}.items():
        client.set_registered_model_tag(name, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)
