"""The ONNX graph of a zoo model: normalization inside, checked against PyTorch with onnxruntime.

The one exporter: `zoo export` writes it for a loaded model, and a registered model ships the
same graph (artifacts/model.onnx, written by zoo.model_format.mlflow_model when it is logged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoo.model_format.model import RESIZE_METADATA, LoadedModel
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
        **({RESIZE_METADATA: json.dumps(model.resize)} if model.resize is not None else {}),
    }


def export_onnx(model: LoadedModel, path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Write ``path`` (one self-contained file) and check it against PyTorch; raise ParityError above ``tolerance``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = model.module
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
    proto = without_hard_sigmoid(program.model_proto)
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


def without_hard_sigmoid(proto):
    """``proto`` with each ``HardSigmoid(x; alpha, beta)`` written as ``Clip(Add(Mul(x, alpha), beta), 0, 1)``.

    The same function, in operators every ONNX reader implements alike: OpenCV's DNN module (5.1)
    computes ``Mul(x, HardSigmoid(s))`` wrongly when the Mul broadcasts, which is how timm's
    MobileNetV3 family gates its squeeze-excite blocks, and onnxruntime, the parity check, does not.
    """
    from onnx import TensorProto, helper

    nodes = []
    for node in proto.graph.node:
        if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        constants = {"alpha": attrs.get("alpha", 0.2), "beta": attrs.get("beta", 0.5), "zero": 0.0, "one": 1.0}
        for key, value in constants.items():  # initializers: the readers fold them like the attributes they replace
            proto.graph.initializer.append(helper.make_tensor(f"{name}_{key}", TensorProto.FLOAT, [], [value]))
        nodes += [
            helper.make_node("Mul", [node.input[0], f"{name}_alpha"], [f"{name}_scaled"], name=f"{name}_mul"),
            helper.make_node("Add", [f"{name}_scaled", f"{name}_beta"], [f"{name}_shifted"], name=f"{name}_add"),
            helper.make_node("Clip", [f"{name}_shifted", f"{name}_zero", f"{name}_one"], list(node.output),
                             name=f"{name}_clip"),
        ]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


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
                     class_names: list[str], model_name: str, path: Path, source: str, resize: int | None = None) -> Path:
    """``path``: ``network`` (taking normalized input) with its normalization as ONNX, exactly what
    `zoo export` writes for the logged model; ``source`` names it in the graph's metadata."""
    module = NormalizedModel(network.eval().cpu(), normalization).eval()
    export_onnx(LoadedModel(source, module, normalization, [str(c) for c in class_names], tuple(input_shape), model_name,
                            resize), path)
    return path
