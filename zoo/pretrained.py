"""Pretrained weights for a registered model: a torchvision weights name (with its preprocessing and class
names), or a local state dict (a project checkpoint carries its normalization and class names too)."""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import UsageError
from zoo.normalization import Normalization
from zoo.models.registry import create_model, get_model_spec

# torchvision's ImageNet evaluation preprocessing, used for a local state dict.
DEFAULT_RESIZE, DEFAULT_CROP = 256, 224


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that must be downloaded, without a network and not in the local cache."""
    complete_message = True  # the message says what to do: no traceback hint (zoo/cli/main.py)


@dataclass
class Pretrained:
    model: str
    weights: str  # the torchvision weights name, or the state dict's path
    network: nn.Module  # in eval mode, takes input normalized with ``normalization``
    normalization: Normalization  # the one the weights were trained with
    class_names: list[str] | None  # None: unknown (a bare state dict); the data folders name them
    resize: int
    crop: int

    @property
    def num_classes(self) -> int:
        return _num_classes(self.network.state_dict())


def load_pretrained(model: str, weights: str) -> Pretrained:
    """``weights``: a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) or the path of a state dict."""
    get_model_spec(model)  # unknown model: ValueError naming the valid ones
    local = Path(weights).exists() or weights.endswith((".pt", ".pth")) or "/" in weights
    return _from_state_dict_file(model, weights) if local else _from_torchvision(model, weights)


def _from_torchvision(model: str, name: str) -> Pretrained:
    from urllib.error import URLError
    from torchvision.models import get_model_weights
    try:
        enum = get_model_weights(model)
    except ValueError:
        raise UsageError(f"model {model!r} has no torchvision weights; pass the path of a state dict as --weights") from None
    try:
        weights = enum[name]
    except KeyError:
        raise UsageError(f"unknown weights {name!r} for {model}; valid: {', '.join(['DEFAULT', *(w.name for w in enum)])}") from None
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError) as exc:  # offline and not in the cache
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailable(
            f"{model}'s {name} weights need a network: cannot download {weights.url} ({exc}), and they are not in "
            f"torchvision's cache at {cached} (TORCH_HOME); go online once, copy the file there, or pass a local "
            "state dict as --weights FILE"
        ) from exc
    categories = list(weights.meta["categories"])
    network = create_model(model, num_classes=len(categories))
    network.load_state_dict(state_dict)
    preprocessing = weights.transforms()
    return Pretrained(model, name, network.eval(), Normalization(tuple(preprocessing.mean), tuple(preprocessing.std)),
                      categories, resize=int(preprocessing.resize_size[0]), crop=int(preprocessing.crop_size[0]))


def _num_classes(state_dict: dict[str, torch.Tensor]) -> int:
    # The classifier is the last 2-D weight (ResNet's fc.weight: [classes, features]).
    matrices = [t for t in state_dict.values() if t.ndim == 2]
    if not matrices:
        raise UsageError("the state dict has no linear classifier weight to count classes from")
    return int(matrices[-1].shape[0])


def load_weights_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``: anything but tensors and containers could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:  # naming what it holds is a courtesy (torch 2.5+): the file is refused either way
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            unsafe = []
        holds = f" (it holds {', '.join(unsafe)})" if unsafe else ""
        raise UsageError(f"the weights file {path} holds more than tensors{holds}: only tensors and state dicts are "
                         "loaded (torch.load weights_only=True); save the network's state_dict() with torch.save") from None


def _from_state_dict_file(model: str, path: str) -> Pretrained:
    if not Path(path).is_file():
        raise UsageError(f"no state dict at {path}; --weights takes a file or a torchvision weights name")
    saved = load_weights_file(path)
    checkpoint = saved if isinstance(saved, dict) and isinstance(saved.get("model"), dict) else {"model": saved}
    state_dict = checkpoint["model"]
    num_classes = _num_classes(state_dict)
    network = create_model(model, num_classes=num_classes)
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UsageError(f"{path} is not a {model} state dict: {str(exc).splitlines()[0]}") from None
    class_names = checkpoint.get("class_names")
    if class_names is None and num_classes == 1000:
        from torchvision.models import ResNet18_Weights
        class_names = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])  # ImageNet-1k, in synset order
    saved_norm = checkpoint.get("normalization")
    normalization = Normalization.from_dict(saved_norm) if saved_norm else get_model_spec(model).normalization
    return Pretrained(model, str(path), network.eval(), normalization,
                      list(class_names) if class_names is not None else None, DEFAULT_RESIZE, DEFAULT_CROP)
