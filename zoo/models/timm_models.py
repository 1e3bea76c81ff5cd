"""Any timm architecture as ``timm:NAME``: ``timm.create_model(NAME, in_chans=C, num_classes=K)``, defaults from
its pretrained config. Pretrained weights (``pretrained=true``, or ``weights=FILE`` loaded weights-only) come
offline from the Hugging Face cache, or are refused in one line."""

import functools
from pathlib import Path

from torch import nn

from zoo.normalization import IMAGENET, Normalization
from zoo.models.registry import TIMM_PREFIX, ModelSpec, register_prefix
from zoo.errors import UsageError
from zoo.machine import offline

# timm's own fine-tuning defaults (train.py): AdamW; the zoo's StepLR stays off.
_RECIPE = dict(optimizer="adamw", lr=1e-3, lr_gamma=1.0)
# Seconds the hub has to answer before the weights are looked for offline (a dropped-packet network waits this long).
HUB_PROBE_TIMEOUT = 5


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm: models need the timm package: pip install 'mlflow-zoo[timm]' (or pip install timm)") from None
    return timm


@functools.lru_cache(maxsize=None)
def timm_spec(architecture: str) -> ModelSpec:
    timm = _timm()
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture[:6]}*")[:8]
        raise UsageError(f"unknown timm architecture {architecture!r}"
                         + (f" (similar: {', '.join(close)})" if close else "")
                         + "; list them with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")
    cfg = timm.get_pretrained_cfg(architecture)
    input_shape = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    normalization = Normalization(cfg.mean, cfg.std) if cfg is not None else IMAGENET
    return ModelSpec(f"timm:{architecture}", functools.partial(build_timm, architecture), input_shape,
                     cfg.num_classes if cfg is not None and cfg.num_classes else 1000, normalization,
                     description=f"timm {architecture} (in_chans and num_classes from the data)", **_RECIPE)


def build_timm(architecture: str, *, num_classes: int = 1000, input_shape: tuple[int, int, int] | None = None,
               pretrained: bool = False, weights: str = "") -> nn.Module:
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
        # Read here, not by timm's `file` overlay: weights_only whatever timm's and torch's defaults.
        from zoo.pretrained import load_weights_file
        saved = load_weights_file(weights)  # a bare state dict, or one under state_dict (timm's) or model (zoo's)
        for key in ("state_dict", "model"):
            if isinstance(saved, dict) and isinstance(saved.get(key), dict):
                saved = saved[key]
                break
        kwargs["pretrained_cfg_overlay"] = {"state_dict": saved}
    elif pretrained:
        return _from_the_hub(timm, architecture, kwargs)
    return timm.create_model(architecture, pretrained=pretrained, **kwargs)


def _from_the_hub(timm, architecture: str, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with the hub's weights; without a network, from its cache at once (the hub would retry)."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache
    if constants.is_offline_mode() or offline():
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


register_prefix(TIMM_PREFIX, timm_spec)
