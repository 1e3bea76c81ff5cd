"""Any timm architecture as ``timm:NAME``: ``timm.create_model(NAME, in_chans=C, num_classes=K)``.

timm is an optional extra (``pip install 'mlflow-zoo[timm]'``). Its names are listed by
``python -c "import timm; print(timm.list_models('*resnet*'))"``. The default input shape and
normalization come from the architecture's pretrained config (timm's ``_cfg``: usually 3x224x224
and the ImageNet mean/std); the data decides the real input shape and number of classes.

Pretrained weights: ``zoo train --weights pretrained`` (the builder option ``pretrained=true``)
downloads them through timm (online), and ``--weights FILE`` (``weights=FILE``) reads a local
checkpoint, tensors and state dicts only (``torch.load(weights_only=True)``), handed to timm as
``pretrained_cfg_overlay=dict(state_dict=...)``.
Either way timm adapts them as it does for its own fine-tuning: the stem is summed or repeated
for another number of channels, and a classifier of another size starts fresh.
Without a network (the hub does not answer, or ``ZOO_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) the
pretrained weights are read from the hub's local cache (``HF_HOME``), or refused in one line
(:class:`zoo.pretrained.WeightsUnavailable`) when they are not there.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from torch import nn

from zoo.normalization import IMAGENET, Normalization
from zoo.models.registry import TIMM_PREFIX, ModelSpec, register_prefix
from zoo.errors import UsageError

# timm's own fine-tuning defaults (train.py): AdamW; the zoo's StepLR stays off.
_RECIPE = dict(optimizer="adamw", lr=1e-3, lr_gamma=1.0)
# Seconds the hub has to answer one request before the weights are looked for offline: an unknown host
# or a refused connection fails at once, a network that drops packets waits this long.
HUB_PROBE_TIMEOUT = 5


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm: models need the timm package: pip install 'mlflow-zoo[timm]' (or pip install timm)") from None
    return timm


@functools.lru_cache(maxsize=None)
def timm_spec(architecture: str) -> ModelSpec:
    """The registry entry of timm architecture ``architecture``, or a ValueError saying how to list them."""
    timm = _timm()
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture[:6]}*")[:8]
        raise UsageError(f"unknown timm architecture {architecture!r}"
                         + (f" (similar: {', '.join(close)})" if close else "")
                         + "; list them with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")
    cfg = timm.get_pretrained_cfg(architecture)
    input_shape = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    normalization = Normalization(cfg.mean, cfg.std) if cfg is not None else IMAGENET
    return ModelSpec(
        name=f"timm:{architecture}",
        builder=functools.partial(build_timm, architecture),
        input_shape=input_shape,
        num_classes=cfg.num_classes if cfg is not None and cfg.num_classes else 1000,
        normalization=normalization,
        description=f"timm {architecture} (in_chans and num_classes from the data)",
        **_RECIPE,
    )


def build_timm(architecture: str, *, num_classes: int = 1000, input_shape: tuple[int, int, int] | None = None,
               pretrained: bool = False, weights: str = "") -> nn.Module:
    """``timm.create_model`` for ``input_shape``'s channels (and size, for architectures fixed to one)."""
    timm = _timm()
    cfg = timm.get_pretrained_cfg(architecture)
    kwargs: dict = {"num_classes": num_classes}
    if input_shape is not None:
        kwargs["in_chans"] = input_shape[0]
        if cfg is not None and cfg.fixed_input_size and tuple(input_shape[1:]) != tuple(cfg.input_size[1:]):
            kwargs["img_size"] = tuple(input_shape[1:])  # ViTs and the like build their position table for one size
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"no weights file {weights!r} (model option weights= takes a local timm checkpoint)")
        pretrained = True
        # Read here rather than by timm (its `file` overlay), so that the file is loaded with weights_only
        # whatever timm's and torch's defaults, and refused in one line naming it.
        kwargs["pretrained_cfg_overlay"] = {"state_dict": _state_dict(weights)}
    elif pretrained:
        return _from_the_hub(timm, architecture, kwargs)
    return timm.create_model(architecture, pretrained=pretrained, **kwargs)


def _from_the_hub(timm, architecture: str, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with the hub's weights. Without a network, from the hub's local cache at once: the
    hub would retry each file for about a minute before looking there, then end with a message about neither
    the network nor what to do instead."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    if constants.is_offline_mode() or os.environ.get("ZOO_OFFLINE", "") not in ("", "0"):
        reason = "offline mode is on (ZOO_OFFLINE or HF_HUB_OFFLINE)"
    else:
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
        except Exception as exc:  # no answer at all (DNS, refused, timeout, proxy): any HTTP status is one
            reason = f"{constants.ENDPOINT} does not answer ({exc})"
        else:
            return timm.create_model(architecture, pretrained=True, **kwargs)
    repo, _, revision = (timm.get_pretrained_cfg(architecture).hf_hub_id or "").partition("@")
    cached = [path for name in ("model.safetensors", "pytorch_model.bin") if repo
              for path in [try_to_load_from_cache(repo, name, revision=revision or None)] if isinstance(path, str)]
    if not cached:
        from zoo.pretrained import WeightsUnavailable

        raise WeightsUnavailable(f"timm:{architecture}'s pretrained weights need a network: {reason}, and they are not "
                                 f"in the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME); go online once to "
                                 "download them, or pass a local checkpoint with --weights FILE")
    return timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay={"file": cached[0]}, **kwargs)


def _state_dict(path: str) -> dict:
    """The state dict of a local checkpoint: a bare state dict, or one under ``state_dict`` or ``model``
    (timm's train.py and the zoo's own checkpoints), as timm's ``load_state_dict`` finds it."""
    from zoo.pretrained import load_weights_file

    saved = load_weights_file(path)
    for key in ("state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            return saved[key]
    return saved


register_prefix(TIMM_PREFIX, timm_spec)
