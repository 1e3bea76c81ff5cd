"""What a model is: the registry, the model families, the dataset catalog and normalization.

Nothing in this package imports MLflow: it is usable on its own, and the tracking
layer (``training.tracking``) is the only place that writes runs.
"""

from zoo.normalization import Normalization
from zoo.registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = [
    "Normalization",
    "ModelSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
]
