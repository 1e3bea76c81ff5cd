"""The input normalization of a vision model, as a value.

A :class:`Normalization` is a mean and a standard deviation per channel. Images enter
as pixels in [0, 1] (or uint8 in [0, 255]) and leave as ``(x - mean) / std``. It
travels with a model (registry default, MLflow metadata, ONNX metadata) so nothing
downstream hard-codes 0.1307.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn


def _parse_floats(value: str | float | Iterable[float], what: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p != ""]
        if not parts:
            raise ValueError(f"{what} is empty; give a number or a comma-separated list such as 0.5,0.5,0.5")
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"{what} {value!r} is not a number or a comma-separated list of numbers (e.g. 0.1307 or 0.485,0.456,0.406)"
            ) from None
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std``; ``std`` must be positive and finite."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean has {len(self.mean)} values and std has {len(self.std)}; give one value, or one per channel for both"
            )
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"std must be positive and finite (division by std), got {self.std}")

    @classmethod
    def parse(
        cls,
        mean: str | float | Sequence[float],
        std: str | float | Sequence[float],
        channels: int | None = None,
    ) -> "Normalization":
        """Build from CLI-style values ("0.5" or "0.485,0.456,0.406"); one value broadcasts over ``channels``."""
        m, s = _parse_floats(mean, "mean"), _parse_floats(std, "std")
        if channels is not None:
            m, s = _broadcast(m, channels, "mean"), _broadcast(s, channels, "std")
        return cls(m, s)

    @classmethod
    def identity(cls, channels: int = 1) -> "Normalization":
        """No normalization: pixels in [0, 1] go in unchanged."""
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def for_channels(self, channels: int) -> "Normalization":
        return Normalization(_broadcast(self.mean, channels, "mean"), _broadcast(self.std, channels, "std"))

    def as_params(self) -> dict[str, str]:
        """MLflow param values: one number, or comma-separated per channel."""
        return {"mean": _fmt(self.mean), "std": _fmt(self.std)}

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(tuple(d["mean"]), tuple(d["std"]))

    def __str__(self) -> str:
        return f"mean={_fmt(self.mean)} std={_fmt(self.std)}"

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalize a batch ``[N, C, H, W]``: uint8 in [0, 255] or float in [0, 1]."""
        x = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def module(self) -> "Normalize":
        return Normalize(self)


def _broadcast(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ValueError(f"{what} has {len(values)} values but the model has {channels} channel(s); give 1 or {channels}")


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


class Normalize(nn.Module):
    """``(x - mean) / std`` as a layer, so an exported graph takes pixels in [0, 1]."""

    def __init__(self, normalization: Normalization):
        super().__init__()
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A network preceded by its normalization: takes pixels in [0, 1]."""

    def __init__(self, network: nn.Module, normalization: Normalization):
        super().__init__()
        self.normalize = Normalize(normalization)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))


# --- Named normalizations and "MEAN:STD" specs (the renorm job's --norm values) ---

IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMED = {"imagenet": IMAGENET, "identity": Normalization((0.0,), (1.0,))}


def parse_spec(spec: str, channels: int) -> Normalization:
    """``imagenet``, ``identity`` or ``MEAN:STD`` (each one number or one per channel, e.g. ``0.5:0.5``)."""
    text = spec.strip()
    if text.lower() in NAMED:
        return NAMED[text.lower()].for_channels(channels)
    if text.count(":") != 1:
        raise ValueError(
            f"normalization {spec!r} is not {' or '.join(NAMED)} or MEAN:STD "
            "(e.g. 0.5:0.5, 0:1 or 0.485,0.456,0.406:0.229,0.224,0.225)"
        )
    mean, std = text.split(":")
    return Normalization.parse(mean, std, channels=channels)


# --- Adapting a trained network to another normalization, without training ---


def first_conv_and_norm(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The first ``Conv2d`` (in registration order) and the BatchNorm registered right after it, if any."""
    modules = list(model.modules())
    for i, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            following = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(following, nn.BatchNorm2d) and following.num_features == module.out_channels:
                return module, following
            return module, None
    raise ValueError(f"{type(model).__name__} has no Conv2d layer to fold a normalization into")


@torch.no_grad()
def fold_normalization(model: nn.Module, source: Normalization, target: Normalization) -> nn.Module:
    """Rewrite ``model`` in place so that on ``target``-normalized input it computes what it computed on ``source``.

    With ``a = s_target / s_source`` and ``b = (m_target - m_source) / s_source`` per input channel,
    ``x_source = a * x_target + b``. The first convolution's weights are scaled by ``a`` and the
    response of its kernel to the constant ``b`` is added to its bias, or, when it has none
    (ResNet's conv1), subtracted from the running mean of the BatchNorm after it.

    Exact wherever the kernel sees only image pixels. Zero padding differs: a padded zero stands
    for pixel value ``m_source`` before and ``m_target`` after, so outputs whose receptive field
    overlaps the border change unless the means are equal (a change of std alone is exact).
    The BatchNorm route holds in eval mode, where running statistics are used.
    """
    conv, bn = first_conv_and_norm(model)
    if conv.groups != 1:
        raise ValueError("fold_normalization supports a first convolution with groups=1 only")
    src, tgt = source.for_channels(conv.in_channels), target.for_channels(conv.in_channels)
    weight = conv.weight
    as_tensor = lambda values: torch.tensor(values, dtype=weight.dtype, device=weight.device)  # noqa: E731
    scale = as_tensor(tgt.std) / as_tensor(src.std)
    shift = (as_tensor(tgt.mean) - as_tensor(src.mean)) / as_tensor(src.std)
    constant = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))  # the kernel's response to a constant input
    weight.mul_(scale.view(1, -1, 1, 1))
    if conv.bias is not None:
        conv.bias.add_(constant)
    elif bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(constant)
    else:
        conv.bias = nn.Parameter(constant)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``inputs`` (already normalized batches).

    The statistics are reset and accumulated as an equal-weight average over the batches
    (``momentum=None``), with every other layer in eval mode. Returns the number of images seen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to recalibrate")
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in inputs:
            if len(batch) < 2:  # BatchNorm cannot take the variance of one image (1x1 maps)
                continue
            model(batch)
            seen += len(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("BatchNorm recalibration needs at least 2 calibration images")
    return seen
