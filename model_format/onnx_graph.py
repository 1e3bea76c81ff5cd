"""The ONNX graph of a zoo model: normalization inside, checked against PyTorch with onnxruntime.

The one exporter: `zoo export` writes it for a loaded model, and a registered model ships the
same graph (artifacts/model.onnx, written by model_format.mlflow_model when it is logged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_format.model import LoadedModel
from zoo.normalization import Normalization, NormalizedModel

DEFAULT_TOLERANCE = 1e-4
INPUT_NAME = "pixels"  # float32 [batch, C, H, W] in [0, 1]
OUTPUT_NAME = "scores"


class ParityError(RuntimeError):
    """The ONNX graph's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    opset: int
    batch_sizes_checked: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "max_abs_diff": self.max_abs_diff,
            "opset": self.opset,
            "batch_sizes_checked": list(self.batch_sizes_checked),
        }


def onnx_metadata(model: LoadedModel) -> dict[str, str]:
    return {
        "zoo_model": model.model_name,
        "source_uri": model.uri,
        "class_names": json.dumps(model.class_names),
        "normalization": json.dumps(model.normalization.to_dict()),
        "input_shape": json.dumps(list(model.input_shape)),
        "input_range": "pixels in [0, 1]; the normalization is inside the graph",
    }


def export_onnx(model: LoadedModel, path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Write ``path`` (one self-contained file) and check it against PyTorch; raise ParityError above ``tolerance``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = model.with_normalization()
    example = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(
        wrapped,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto
    for key, value in onnx_metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))  # weights inside the one file: these models are small
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)

    batch_sizes = (1, 7)  # neither is the export batch: proves the batch dimension is dynamic
    diff = max(parity(wrapped, path, n) for n in batch_sizes)
    report = ExportReport(path, diff, opset, batch_sizes)
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"ONNX export of {model.uri} differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}); {path} kept for inspection")
    return report


def parity(wrapped: torch.nn.Module, path: Path, batch: int) -> float:
    import onnxruntime as ort

    pixels = torch.rand(batch, *_input_shape(path), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        expected = wrapped(pixels).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return float(np.max(np.abs(got - expected)))


def _input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return tuple(json.loads(meta["input_shape"]))


def export_onnx_file(network: torch.nn.Module, normalization: Normalization, input_shape: tuple[int, int, int],
                     class_names: list[str], model_name: str, path: Path, source: str) -> Path:
    """``path``: ``network`` (taking normalized input) with its normalization as ONNX, exactly what
    `zoo export` writes for the logged model; ``source`` names it in the graph's metadata."""
    module = NormalizedModel(network.eval().cpu(), normalization).eval()
    export_onnx(LoadedModel(source, module, normalization, [str(c) for c in class_names], tuple(input_shape), model_name),
                path)
    return path
