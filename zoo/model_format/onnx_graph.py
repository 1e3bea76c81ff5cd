"""The one ONNX exporter (`zoo export`, and the graph a registered model ships): normalization inside, checked
against PyTorch with onnxruntime."""

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


def onnx_metadata(model: LoadedModel) -> dict[str, str]:
    return {"zoo_model": model.model_name, "source_uri": model.uri, "class_names": json.dumps(model.class_names),
            "normalization": json.dumps(model.normalization.to_dict()), "input_shape": json.dumps(list(model.input_shape)),
            "input_range": "pixels in [0, 1]; the normalization is inside the graph",
            **({RESIZE_METADATA: json.dumps(model.resize)} if model.resize is not None else {})}


def export_onnx(model: LoadedModel, path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Write ``path`` (one self-contained file) and check it against PyTorch; raise ParityError above ``tolerance``."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = model.module
    example = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(wrapped, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    proto = without_hard_sigmoid(program.model_proto)
    for key, value in onnx_metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))  # weights inside the one file: these models are small
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    batch_sizes = (1, 7)  # neither is the export batch: proves the batch dimension is dynamic
    diff = max(parity(wrapped, path, model.input_shape, n) for n in batch_sizes)
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"ONNX export of {model.uri} differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}); "
                          f"{path} kept for inspection")
    return ExportReport(path, diff, opset, batch_sizes)


def without_hard_sigmoid(proto):
    """Each ``HardSigmoid`` as ``Clip(x * alpha + beta, 0, 1)``: OpenCV's DNN gets timm's MobileNetV3 gates wrong."""
    from onnx import TensorProto, helper
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        constants = {"alpha": attrs.get("alpha", 0.2), "beta": attrs.get("beta", 0.5), "zero": 0.0, "one": 1.0}
        for key, value in constants.items():
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


def parity(wrapped: torch.nn.Module, path: Path, input_shape: tuple[int, ...], batch: int) -> float:
    import onnxruntime as ort
    pixels = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        expected = wrapped(pixels).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return float(np.max(np.abs(got - expected)))


def export_onnx_file(network: torch.nn.Module, normalization: Normalization, input_shape: tuple[int, int, int],
                     class_names: list[str], model_name: str, path: Path, source: str, resize: int | None = None) -> Path:
    """``network`` (taking normalized input) with its normalization as ONNX at ``path``, as `zoo export` writes it."""
    module = NormalizedModel(network.eval().cpu(), normalization).eval()
    export_onnx(LoadedModel(source, module, normalization, [str(c) for c in class_names], tuple(input_shape), model_name,
                            resize), path)
    return path
