"""Builder keyword arguments from ``--model-opt KEY=VALUE``, checked against the builder and converted to each
default's type, so a typo fails with the valid keys before any run starts."""

import inspect
from typing import Any, Iterable

from zoo.errors import UsageError

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_model_options(pairs: Iterable[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"model option {pair!r} is not KEY=VALUE (e.g. dropout=0.2)")
        options[key.strip()] = value.strip()
    return options


def coerce_model_config(model: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked against the builder's keyword arguments (not input shape and classes: the data's)."""
    from zoo.models.registry import get_model_spec  # torch: not needed to parse options at CLI start-up
    signature = inspect.signature(get_model_spec(model).builder)
    valid = {name: p.default for name, p in signature.parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("num_classes", "input_shape")}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key not in valid:
            choices = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
            raise UsageError(f"model {model!r} has no option {key!r}; valid options: {choices}")
        out[key] = _convert(key, value, valid[key]) if isinstance(value, str) else value
    return out


def _convert(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UsageError(f"model option {key} takes true or false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            raise UsageError(f"model option {key} takes a {type(default).__name__}, got {value!r}") from None
    return value
