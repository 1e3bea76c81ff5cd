"""The model registry: a dict plus a decorator, as torchvision's ``models/_api.py``. Each entry carries the input
shape, classes, default normalization and optimizer recipe; builders fit the data (``create_model(name,
input_shape=(C, H, W), num_classes=K)``). ``timm:NAME`` names any timm architecture."""

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from zoo.normalization import Normalization
from zoo.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (channels, height, width) the network expects
    num_classes: int
    normalization: Normalization  # the default, as the reference code ships it
    optimizer: str = "adadelta"
    lr: float = 1.0
    lr_gamma: float = 0.7  # StepLR(step_size=1) decay per epoch; 1.0 keeps lr constant
    trainer: str = "autograd"  # or the name of a trainer of its own (training/engine.py)
    description: str = ""
    # Training defaults beyond the optimizer (batch_size, val_fraction, momentum, keep_best) for TrainConfig.
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.input_shape[0]


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, input_shape: tuple[int, int, int], num_classes: int, normalization: Normalization,
                   **spec: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name``; a duplicate name is an error."""

    def wrapper(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        description = spec.pop("description", None) or (builder.__doc__ or "").strip().splitlines()[0]
        _MODELS[name] = ModelSpec(name, builder, tuple(input_shape), num_classes, normalization,
                                  description=description, **spec)
        return builder
    return wrapper


def list_models(include: str | None = None) -> list[str]:
    """Sorted model names, optionally filtered by an fnmatch pattern."""
    return sorted(n for n in _MODELS if not include or fnmatch.fnmatch(n, include))


TIMM_PREFIX = "timm:"
_PREFIXED: dict[str, Callable[[str], ModelSpec]] = {}  # prefix -> resolve(NAME) -> spec (``timm:NAME``)


def register_prefix(prefix: str, resolve: Callable[[str], ModelSpec]) -> None:
    _PREFIXED[prefix] = resolve


def get_model_spec(name: str) -> ModelSpec:
    for prefix, resolve in _PREFIXED.items():
        if name.startswith(prefix):
            return resolve(name[len(prefix):])
    try:
        return _MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}, "
                         f"or {TIMM_PREFIX}NAME for any timm architecture") from None


def create_model(name: str, *, input_shape: tuple[int, int, int] | None = None, **config: Any) -> nn.Module:
    """Build a model for ``input_shape`` (default: the registered one); ``None`` values keep the builder's defaults."""
    spec = get_model_spec(name)
    kwargs = {k: v for k, v in config.items() if v is not None}
    kwargs.setdefault("num_classes", spec.num_classes)
    if input_shape is not None and tuple(input_shape) != spec.input_shape:
        kwargs["input_shape"] = tuple(int(v) for v in input_shape)
    return spec.builder(**kwargs)
