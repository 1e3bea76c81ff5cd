"""The logged model as MLflow stores it: code (pyfunc_model.py, zoo/imaging.py), the ``torch.export`` program of
the network with its normalization, the shipped ONNX graph, the signature, input example and requirements."""

import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from zoo.model_format.model import ONNX_ARTIFACT, ONNX_FILE, model_metadata
from zoo.model_format.onnx_graph import export_onnx_file
from zoo import imaging
from zoo.normalization import Normalization, NormalizedModel

PYFUNC_MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
IMAGING_CODE = Path(imaging.__file__).resolve()  # its image decoder, shipped beside it
SERVING_PACKAGES = ("torch", "numpy", "pandas", "pillow", "mlflow")  # what pyfunc_model.py imports
# As pyfunc_model.py names them (importing it would run its set_model()).
PROGRAM_ARTIFACT = "program"  # the torch.export program it loads
IMAGE_COLUMN = "image"  # the signature's column of encoded images


def log_model(network: torch.nn.Module, *, model_name: str, normalization: Normalization,
              input_shape: tuple[int, int, int], class_names: list[str], registered_name: str | None = None,
              sample_images: torch.Tensor | None = None, onnx: bool | None = None, resize: int | None = None,
              **extra_metadata: Any) -> str:
    """Log ``network`` (taking *normalized* input) in the active run as a model that takes images; returns its URI.
    ``onnx`` (default: when it will be registered) ships the ONNX graph, for `zoo classify` to download."""
    config = {"class_names": [str(c) for c in class_names], "input_shape": list(input_shape), "resize": resize}
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "program.pt2"
        torch.export.save(export_program(network, normalization, input_shape), program)
        artifacts = {PROGRAM_ARTIFACT: str(program)}
        if (registered_name is not None) if onnx is None else onnx:
            graph = _onnx_or_warning(Path(tmp), network, normalization, input_shape, class_names, model_name,
                                     source=f"models:/{registered_name}" if registered_name else "the logged model",
                                     resize=resize)
            if graph is not None:
                artifacts[ONNX_ARTIFACT] = str(graph)
        # MLflow records this absolute path but reads back only its file name (a relative one would need a chdir).
        metadata = model_metadata(model_name=model_name, normalization=normalization, input_shape=input_shape,
                                  class_names=class_names, resize=resize, **extra_metadata)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_MODEL_CODE), code_paths=[str(IMAGING_CODE)], artifacts=artifacts,
            model_config=config, signature=model_signature(), input_example=image_example(sample_images, input_shape),
            pip_requirements=pip_requirements(), metadata=metadata)
    return info.model_uri


def ships_onnx(model_uri: str) -> bool:
    listed = MlflowClient().list_logged_model_artifacts(_logged_model_id(model_uri), "artifacts")
    return any(Path(a.path).name == ONNX_FILE for a in listed)


def _logged_model_id(model_uri: str) -> str:
    return model_uri.rstrip("/").rpartition("/")[2]


def ship_onnx(model_uri: str, network: torch.nn.Module, normalization: Normalization, input_shape: tuple[int, int, int],
              class_names: list[str], model_name: str, source: str) -> None:
    """Add the ONNX graph to a model logged without it and registered later as ``source``."""
    with tempfile.TemporaryDirectory() as tmp:
        graph = _onnx_or_warning(Path(tmp), network, normalization, input_shape, class_names, model_name, source=source)
        if graph is not None:
            MlflowClient().log_model_artifact(_logged_model_id(model_uri), str(graph), artifact_path="artifacts")


def _onnx_or_warning(folder: Path, *args: Any, **kwargs: Any) -> Path | None:
    """:func:`export_onnx_file` into ``folder``, or None with a warning: shipping the graph is a convenience."""
    try:
        return export_onnx_file(*args, path=folder / ONNX_FILE, **kwargs)
    except Exception as exc:
        print(f"warning: the model is logged without its ONNX graph ({type(exc).__name__}: {exc}); "
              "zoo classify and zoo export will export it when used", file=sys.stderr)
        return None


def export_program(network: torch.nn.Module, normalization: Normalization, input_shape: tuple[int, int, int]):
    """The network with its normalization, exported with a dynamic batch dimension."""
    module = NormalizedModel(network.eval().cpu(), normalization).eval()
    example = torch.rand(2, *input_shape)  # batch 2, not 1: a batch of 1 would be specialized
    return torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def model_signature():
    """An ``image`` or a ``pixels`` column (typed Any: pyfunc_model.py names a bad row), a ``top_k`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec(AnyType(), "pixels", required=False)])
    top = Array(Object([Property("label", "string"), Property("probability", "double")]))
    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec(top, "top")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("top_k", "long", 3)]))


def image_example(images: torch.Tensor | None, input_shape: tuple[int, int, int]):
    import io
    import pandas as pd
    from PIL import Image
    if images is None:
        images = torch.full((1, *input_shape), 128, dtype=torch.uint8)
    encoded = []
    for image in images[:2]:
        array = image.cpu().numpy()
        buffer = io.BytesIO()
        Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def pip_requirements() -> list[str]:
    """Pinned requirements, given explicitly: MLflow's inference of them is slow."""
    from importlib.metadata import version
    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]
