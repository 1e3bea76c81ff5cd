"""The input normalization of a vision model as a value (a mean and std per channel), its layer, and
folding it into a trained network. It travels with a model so nothing downstream hard-codes 0.1307."""

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from zoo.errors import UsageError


def parse_floats(value: str | float | Iterable[float], what: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p != ""]
        if not parts:
            raise UsageError(f"{what} is empty; give a number or a comma-separated list such as 0.5,0.5,0.5")
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise UsageError(f"{what} {value!r} is not a number or a comma-separated list of numbers "
                             "(e.g. 0.1307 or 0.485,0.456,0.406)") from None
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
            raise UsageError(f"mean has {len(self.mean)} values and std has {len(self.std)}; "
                             "give one value, or one per channel for both")
        if not all(math.isfinite(m) for m in self.mean):
            raise UsageError(f"mean must be finite, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise UsageError(f"std must be positive and finite (division by std), got {self.std}")

    @classmethod
    def parse(cls, mean: str | float | Sequence[float], std: str | float | Sequence[float],
              channels: int | None = None) -> "Normalization":
        """From CLI values ("0.5" or "0.485,0.456,0.406"); one value broadcasts over ``channels``."""
        m, s = parse_floats(mean, "mean"), parse_floats(std, "std")
        if channels is not None:
            m, s = _broadcast(m, channels, "mean"), _broadcast(s, channels, "std")
        return cls(m, s)

    @classmethod
    def identity(cls, channels: int = 1) -> "Normalization":
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def for_channels(self, channels: int) -> "Normalization":
        return Normalization(_broadcast(self.mean, channels, "mean"), _broadcast(self.std, channels, "std"))

    def for_data(self, channels: int) -> "Normalization":
        """A model's default for data of ``channels`` planes; grey data under an RGB default takes the channel average."""
        if self.channels != channels and channels == 1:
            return Normalization((sum(self.mean) / self.channels,), (sum(self.std) / self.channels,))
        return self.for_channels(channels)

    @classmethod
    def from_images(cls, images: torch.Tensor, chunk: int = 4096) -> "Normalization":
        """Per-channel mean and std of uint8 ``[N, C, H, W]`` as pixels in [0, 1], in chunks (memory-mapped data)."""
        if len(images) == 0:
            raise UsageError("cannot compute the normalization of an empty training split")
        total = torch.zeros(images.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].to("cpu", torch.float64).div_(255.0)
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        if not bool((std > 0).all()):
            raise UsageError("every training image has the same value in some channel (std 0): --mean/--std auto "
                             "cannot normalize it; give explicit values")
        return cls(tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist()))

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
        return Normalize(self).to(x)(x)


def _broadcast(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise UsageError(f"{what} has {len(values)} values but the model has {channels} channel(s); give 1 or {channels}")


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


class NormalizedModel(nn.Sequential):
    """A network preceded by its normalization (``.normalize``, ``.network``): takes pixels in [0, 1]."""

    def __init__(self, network: nn.Module, normalization: Normalization):
        super().__init__(OrderedDict(normalize=Normalize(normalization), network=network))


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMED = {"imagenet": IMAGENET, "identity": Normalization((0.0,), (1.0,))}


def parse_spec(spec: str, channels: int) -> Normalization:
    """``imagenet``, ``identity`` or ``MEAN:STD`` (each one number or one per channel, e.g. ``0.5:0.5``)."""
    text = spec.strip()
    if text.lower() in NAMED:
        return NAMED[text.lower()].for_channels(channels)
    if text.count(":") != 1:
        raise UsageError(f"normalization {spec!r} is not {' or '.join(NAMED)} or MEAN:STD "
                         "(e.g. 0.5:0.5, 0:1 or 0.485,0.456,0.406:0.229,0.224,0.225)")
    mean, std = text.split(":")
    return Normalization.parse(mean, std, channels=channels)


class BorderPaddedConv2d(nn.Conv2d):
    """A ``Conv2d`` padding with a constant per channel: a folded border holds what the old normalization maps to 0."""

    def __init__(self, conv: nn.Conv2d, border: Sequence[int], pad_value: Sequence[float]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=0,
                         dilation=conv.dilation, bias=conv.bias is not None, device=conv.weight.device,
                         dtype=conv.weight.dtype)
        self.border, self.pad_value = tuple(int(b) for b in border), tuple(float(v) for v in pad_value)
        self.load_state_dict(conv.state_dict())
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(set(self.pad_value)) == 1:  # one Pad node in an exported graph
            return super().forward(F.pad(x, self.border, value=self.pad_value[0]))
        return super().forward(torch.cat([F.pad(x[:, c : c + 1], self.border, value=v)
                                          for c, v in enumerate(self.pad_value)], dim=1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, border={self.border}, pad_value={self.pad_value}"


# Padding modes that copy pixels: they commute with a per-channel affine map, so the fold is exact as it is.
_PIXEL_PADDING_MODES = ("reflect", "replicate", "circular")


def zero_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``conv``'s zero padding as F.pad's (left, right, top, bottom)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # as torch does it: the odd pixel goes right/bottom
        totals = [d * (k - 1) for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size))]
        return tuple(n for t in totals for n in (t // 2, t - t // 2))
    height, width = conv.padding
    return (width, width, height, height)


def _refold_padding(model: nn.Module, name: str, conv: nn.Conv2d, scale: list[float], shift: list[float]) -> nn.Conv2d:
    """Give ``conv`` the border that keeps it exact (``v`` becomes ``(v - shift) / scale``); returns the new conv."""
    if conv.padding_mode in _PIXEL_PADDING_MODES:
        return conv
    if conv.padding_mode != "zeros":
        raise UsageError(f"cannot fold into a first convolution with padding_mode {conv.padding_mode!r}; "
                         f"valid: zeros, {', '.join(_PIXEL_PADDING_MODES)}")
    old = conv.pad_value if isinstance(conv, BorderPaddedConv2d) else (0.0,) * conv.in_channels
    new = tuple((v - b) / a for v, a, b in zip(old, scale, shift))
    if isinstance(conv, BorderPaddedConv2d):
        conv.pad_value = new
        return conv
    border = zero_padding(conv)
    if not any(border) or not any(new):  # no padding, or zeros stay zeros (same means): nothing to change
        return conv
    padded = BorderPaddedConv2d(conv, border, new)
    if name:
        model.set_submodule(name, padded)
    return padded


@torch.no_grad()
def fold_normalization(model: nn.Module, source: Normalization, target: Normalization) -> nn.Module:
    """Rewrite ``model`` in place so that on ``target``-normalized input it computes what it did on ``source``:
    the first convolution's weights scaled, its response to the shift in its bias (or the next BatchNorm's running
    mean), its zero padding a :class:`BorderPaddedConv2d` border."""
    modules = [*model.named_modules(), ("", None)]
    i = next((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)), None)
    if i is None:
        raise UsageError(f"{type(model).__name__} has no Conv2d layer to fold a normalization into")
    (name, conv), bn = modules[i], modules[i + 1][1]  # and the BatchNorm right after it, if any
    if not (isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels):
        bn = None
    if conv.groups != 1:
        raise UsageError("fold_normalization supports a first convolution with groups=1 only")
    src, tgt = source.for_channels(conv.in_channels), target.for_channels(conv.in_channels)
    scale = [t / s for t, s in zip(tgt.std, src.std)]
    shift = [(mt - ms) / s for mt, ms, s in zip(tgt.mean, src.mean, src.std)]
    conv = _refold_padding(model, name, conv, scale, shift)
    weight = conv.weight
    shift_t = torch.tensor(shift, dtype=weight.dtype, device=weight.device).view(1, -1, 1, 1)
    constant = (weight * shift_t).sum(dim=(1, 2, 3))  # the kernel's response to a constant input
    weight.mul_(torch.tensor(scale, dtype=weight.dtype, device=weight.device).view(1, -1, 1, 1))
    if conv.bias is not None:
        conv.bias.add_(constant)
    elif bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(constant)
    else:
        conv.bias = nn.Parameter(constant)
    return model if name else conv


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics from ``inputs`` (equal weights); returns the images seen."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    norms = [m for m in model.modules() if isinstance(m, kinds) and m.track_running_stats]
    if not norms:
        raise UsageError(f"{type(model).__name__} has no BatchNorm layer with running statistics to recalibrate")
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
        raise UsageError("BatchNorm recalibration needs at least 2 calibration images")
    return seen
