"""A zoo model in memory and the metadata it is logged with; no torch or MLflow at import (`zoo classify x.onnx`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from zoo.normalization import Normalization

# What every logged zoo model's MLflow metadata holds (serving.loading refuses a model without them).
REQUIRED_METADATA = ("normalization", "input_shape", "class_names")
# Optional: the shorter side before a center crop (`zoo renorm`); absent, images are stretched (imaging.DecodeSpec).
RESIZE_METADATA = "resize"
ONNX_ARTIFACT, ONNX_FILE = "onnx", "model.onnx"  # a registered model's ONNX graph, beside its program
SHIPPED_ONNX = f"artifacts/{ONNX_FILE}"  # where it lies inside the logged model (serving.classify downloads it)


@dataclass
class LoadedModel:
    uri: str
    module: nn.Module  # the network with its normalization inside: takes pixels in [0, 1]
    normalization: Normalization
    class_names: list[str]
    input_shape: tuple[int, int, int]
    model_name: str
    resize: int | None = None  # shorter side before the center crop; None: stretched (see RESIZE_METADATA)


def model_metadata(*, model_name: str, normalization: Normalization, input_shape: tuple[int, ...],
                   class_names: list[str], resize: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"zoo_model": model_name, "normalization": normalization.to_dict(), "input_shape": list(input_shape),
            "class_names": list(class_names), **({RESIZE_METADATA: int(resize)} if resize is not None else {}), **extra}
