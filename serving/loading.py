"""``models:/name@alias`` (or ``models:/name/1``, ``runs:/ID/model``, a local model folder) -> a usable model
taking pixels in [0, 1], its normalization, input shape and class names from its MLflow metadata (an older
``pytorch``-flavor model, taking normalized input, gets its normalization put in front of it here)."""

from __future__ import annotations

import re
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.model_format.model import REQUIRED_METADATA, RESIZE_METADATA, LoadedModel
from zoo.errors import UsageError

if TYPE_CHECKING:  # torch is imported where a network is loaded: `zoo classify x.onnx` never needs it
    from torch import nn


class ModelNotFound(RuntimeError):
    """The URI is well formed but names no model in the tracking store."""


_URI_FORMS = ("models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME (its latest version), runs:/RUN_ID/model, "
              "a local MLflow model folder, or a .onnx file")
_BARE_NAME = re.compile(r"^models:/([^/@]+)$")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")  # MLflow 3's models:/m-ID: a logged model, not a registered one


def check_uri(uri: str) -> None:
    """UsageError for a string that is no model URI at all."""
    if re.match(r"^(models|runs):/.+", uri) or Path(uri).exists():
        return
    if "://" in uri or uri.startswith(("models:", "runs:")):
        raise UsageError(f"model URI {uri!r} is not of a supported form; use {_URI_FORMS}")
    raise UsageError(f"{uri!r} is neither a model URI nor an existing path; use {_URI_FORMS}")


def resolve_latest(uri: str) -> tuple[str, str | None]:
    """``models:/NAME`` -> (``models:/NAME/LATEST``, a note saying so), as MLflow would read NAME as a logged model id
    (``zoo renorm --register`` registers without an alias, so users write it); any other URI unchanged."""
    m = _BARE_NAME.match(uri)
    if not m or _LOGGED_MODEL_ID.match(m.group(1)):
        return uri, None
    import mlflow
    from mlflow.tracking import MlflowClient

    from zoo.access import masked_url

    name = m.group(1)
    escaped = name.replace("'", "\\'")
    versions = [int(v.version) for v in MlflowClient().search_model_versions(f"name = '{escaped}'")]
    if not versions:
        raise ModelNotFound(f"no registered model {name!r} in tracking store {masked_url(mlflow.get_tracking_uri())}; "
                            f"`zoo models --registered` lists them; use {_URI_FORMS}")
    latest = f"models:/{name}/{max(versions)}"
    return latest, f"{uri} names no version or alias: using its latest version, {latest}"


def read_metadata(uri: str) -> dict:
    return _model_info(uri).metadata


def _model_info(uri: str):
    """MLflow's ModelInfo for ``uri``; ModelNotFound when there is none or its metadata lacks what zoo needs."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(uri)
    except MlflowException as exc:
        raise _not_found(uri, exc) from exc
    except OSError as exc:
        raise ModelNotFound(f"no MLflow model at {uri!r}: {_short(exc)}") from exc
    if missing := [k for k in REQUIRED_METADATA if k not in (info.metadata or {})]:
        raise ModelNotFound(f"model {uri!r} has no {', '.join(missing)} in its metadata; log it with `zoo train` "
                            "(or training.tracking.log_model) so its normalization and classes travel with it")
    return info


def load_model(uri: str) -> LoadedModel:
    """Load a model logged by ``training.tracking.log_model`` (or its pytorch-flavor predecessor)."""
    import mlflow

    from zoo.normalization import Normalization, NormalizedModel

    check_uri(uri)
    info = _model_info(uri)
    metadata = info.metadata
    normalization = Normalization.from_dict(metadata["normalization"])
    if "pytorch" in info.flavors:  # logged before the pyfunc model: the network takes normalized input
        import mlflow.pytorch

        network = mlflow.pytorch.load_model(uri)
        with suppress(NotImplementedError):  # a torch.export module was exported in eval mode and refuses eval()
            network.eval()
        module = NormalizedModel(network, normalization)
        module.training = False
    else:
        module = mlflow.pyfunc.load_model(uri).unwrap_python_model().module
    return LoadedModel(uri=uri, module=module, normalization=normalization, class_names=list(metadata["class_names"]),
                       input_shape=tuple(metadata["input_shape"]), model_name=str(metadata.get("zoo_model", "unknown")),
                       resize=metadata.get(RESIZE_METADATA))


def load_module(uri: str) -> nn.Module:
    """The PyTorch module of a logged model: pixels in [0, 1] ``[N, C, H, W]`` in, class scores out."""
    return load_model(uri).module


def registry_version(uri: str):
    """The registered version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (one lookup), else None."""
    from mlflow.tracking import MlflowClient

    m = re.match(r"^models:/([^/@]+)(?:@(.+)|/(\d+))$", uri)
    if not m:
        return None
    client = MlflowClient()
    return (client.get_model_version_by_alias(m.group(1), m.group(2)) if m.group(2) else
            client.get_model_version(m.group(1), m.group(3)))


def resolve_model_id(uri: str) -> str:
    """What the model behind ``uri`` is, to key its cached export (an alias moves, a folder is saved over): its
    logged-model id, else its MLmodel's ``model_uuid`` (new at each save) and a local folder's files' stats."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = registry_version(uri)
        if version is not None and version.model_id:
            return version.model_id
        if uri.startswith("models:/") and _LOGGED_MODEL_ID.match(uri.removeprefix("models:/")):
            return uri
        source = version.source if version is not None else uri
        # The MLmodel file alone: get_model_info would also look the model's logged-model id up in this
        # tracking store, where a folder copied from another store has none.
        identity = mlflow.models.Model.load(source).model_uuid or source
    except MlflowException as exc:
        raise _not_found(uri, exc) from exc
    if not Path(source).is_dir():
        return identity
    files = sorted(f for f in Path(source).rglob("*") if f.is_file())
    return identity + "|" + ";".join(f"{f.relative_to(source).as_posix()}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                     for f in files)


def _not_found(uri: str, exc: Exception) -> ModelNotFound:
    import mlflow

    from zoo.access import masked_url

    return ModelNotFound(f"no model at {uri!r} in tracking store {masked_url(mlflow.get_tracking_uri())}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
