"""What a model and its data are: the lowest layer (docs/architecture.md).

``models/`` (the families and their registry), ``data/`` (the dataset catalog), ``folder_dataset``
and ``splits`` (image folders and uint8 splits), ``imaging`` (the one image decoder),
``normalization`` (and its exact fold), ``pretrained`` (torchvision's weights); ``access`` and
``progress`` serve the command line without torch.

Nothing in this package imports MLflow or another package of the project: it is usable on its
own; runs are written by ``training`` (``training.tracking``, with ``training.registration`` for the
registry) and logged models by ``zoo.model_format.mlflow_model`` (docs/architecture.md).
"""

from __future__ import annotations

import importlib

# Loaded on first use (PEP 562): `import zoo.x` must not pull in torch for code that only
# needs a torch-free module (the CLI's start-up, classifying with an .onnx file).
_EXPORTS = {
    "Normalization": "zoo.normalization",
    "ModelSpec": "zoo.models.registry",
    "create_model": "zoo.models.registry",
    "get_model_spec": "zoo.models.registry",
    "list_models": "zoo.models.registry",
    "register_model": "zoo.models.registry",
}

__all__ = [
    "Normalization",
    "ModelSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
