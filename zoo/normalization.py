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
