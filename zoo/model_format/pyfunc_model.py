"""The MLflow model of a zoo classifier ("models from code"), shipped with zoo/imaging.py beside it (it never
imports the zoo package). Input: an ``image`` column (encoded bytes, base64 over REST) or a ``pixels`` column
(floats [C][H][W] in [0, 1]); output: ``label``, ``probability`` and the ``top_k`` best."""

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

try:  # the logged model: zoo/imaging.py ships beside this file (log_model's code_paths)
    import imaging
except ImportError:  # this file imported from the repository
    from zoo import imaging

PROGRAM_ARTIFACT = "program"  # the torch.export program: pixels in [0, 1] -> scores
IMAGE_COLUMN = "image"
PIXELS_COLUMN = "pixels"
DEFAULT_TOP_K = 3


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config
        self.class_names: list[str] = [str(c) for c in config["class_names"]]
        self.input_shape: tuple[int, int, int] = tuple(config["input_shape"])
        self.resize: int | None = config.get("resize")
        self.module: torch.nn.Module = torch.export.load(context.artifacts[PROGRAM_ARTIFACT]).module()
        # Exported in eval mode, but an exported module reports training=True (misleading torch.onnx.export).
        self.module.training = False

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if top_k < 1:
            raise invalid(f"top_k must be at least 1, got {top_k}")
        pixels = self.pixels_of(model_input)
        with torch.inference_mode():
            probabilities = torch.softmax(self.module(torch.from_numpy(pixels)), dim=1).numpy()
        return pd.DataFrame(self.top(probabilities, top_k))

    def pixels_of(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 [N, C, H, W] in [0, 1] from the ``image`` or the ``pixels`` column."""
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        sent = [name for name in (IMAGE_COLUMN, PIXELS_COLUMN) if name in frame.columns]
        if len(sent) == 2:  # spark_udf given one column adds the other, all NaN: it was not sent
            sent = [name for name in sent if frame[name].notna().any()] or sent
        has_image, has_pixels = IMAGE_COLUMN in sent, PIXELS_COLUMN in sent
        if has_image == has_pixels:
            raise invalid(f"expected one column, {IMAGE_COLUMN!r} (PNG/JPEG bytes, base64 strings over REST) or "
                          f"{PIXELS_COLUMN!r} (floats [C][H][W] in [0, 1], C,H,W = {','.join(map(str, self.input_shape))}); "
                          f"got {'both' if has_image else 'neither'}")
        if has_image:
            images = list(_unnest(frame[IMAGE_COLUMN], lambda cell: isinstance(cell, (list, tuple, np.ndarray))))
            if not images:
                raise invalid(f"column {IMAGE_COLUMN!r} is empty; send at least one image")
            return np.stack([decode_image(data, self.input_shape, row, self.resize) for row, data in enumerate(images)])
        # An "inputs" request ({"pixels": [image, ...]}) reaches predict as one row holding all its images.
        depth = len(self.input_shape) + 1
        cells = _unnest(frame[PIXELS_COLUMN], lambda cell: isinstance(cell, np.ndarray) and cell.ndim == depth)
        return stack_pixels(cells, self.input_shape)

    def top(self, probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
        rows = []
        for p in probabilities:
            order = np.argsort(-p, kind="stable")[: min(k, len(p))]
            top = [{"label": self.class_names[j], "probability": float(p[j])} for j in order]
            rows.append({"label": top[0]["label"], "probability": top[0]["probability"], "top": top})
        return rows


def invalid(message: str) -> MlflowException:
    """Bad input: the scoring server answers HTTP 400 with this one line."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _unnest(cells, nested) -> Any:
    """The values of a column, list cells spread out (an "inputs" request arrives as one row holding a list)."""
    for cell in cells:
        if nested(cell):
            yield from cell
        else:
            yield cell


def decode_image(data: Any, input_shape: tuple[int, int, int], row: int, resize: int | None = None) -> np.ndarray:
    """Encoded image bytes -> float32 [C, H, W] in [0, 1], decoded as `zoo classify` decodes a file."""
    if isinstance(data, str):
        data = data.encode("ascii", errors="replace")
    if not isinstance(data, (bytes, bytearray)):
        raise invalid(f"row {row} of column {IMAGE_COLUMN!r} is {type(data).__name__}; send PNG/JPEG bytes")
    try:
        pixels = imaging.decode_image(_base64_decoded(data), imaging.DecodeSpec(
            tuple(input_shape), max_pixels_hint="send a smaller image", resize=resize))
    except imaging.ImageError as exc:
        raise invalid(f"row {row} of column {IMAGE_COLUMN!r}: {exc}; send PNG/JPEG/... file bytes "
                      "(base64 strings over REST)") from None
    return pixels.astype(np.float32) / np.float32(255.0)


def _base64_decoded(data: bytes) -> bytes:
    """``data``, or what it encodes when it is base64 text (MLflow decodes only dataframe requests)."""
    import base64
    import binascii
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return bytes(data)


def stack_pixels(cells, input_shape: tuple[int, int, int]) -> np.ndarray:
    """float32 [N, C, H, W] from cells of one image [C][H][W] each, checked one by one to name a bad row."""
    rows = [row_pixels(cell, row, input_shape) for row, cell in enumerate(cells)]
    if not rows:
        raise invalid(f"column {PIXELS_COLUMN!r} is empty; send at least one image")
    pixels = np.stack(rows)
    low, high = float(pixels.min()), float(pixels.max())
    if not (0.0 <= low and high <= 1.0):  # 0-255 values would get confident, meaningless labels
        raise invalid(f"column {PIXELS_COLUMN!r} holds values in [{low:g}, {high:g}]; this model takes pixels in "
                      "[0, 1] (divide 0-255 values by 255)")
    return pixels


def row_pixels(cell: Any, row: int, input_shape: tuple[int, int, int]) -> np.ndarray:
    """float32 [C, H, W] of one row of the ``pixels`` column, or the reason it is not one."""
    expected = "expected [C][H][W] = " + "".join(f"[{n}]" for n in input_shape)
    try:
        pixels = np.asarray(cell, dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid(f"pixels of row {row} are not a [C][H][W] array of numbers (rows of different lengths?); "
                      f"{expected}, floats in [0, 1]") from None
    if pixels.shape != tuple(input_shape):
        if pixels.ndim == 1 and pixels.size == int(np.prod(input_shape)):
            raise invalid(f"pixels of row {row} are a flat list of {pixels.size} values; {expected}: "
                          "one list per channel holding one list per image row")
        raise invalid(f"pixels of row {row} have shape {pixels.shape}; {expected}")
    not_finite = ~np.isfinite(pixels)
    if not_finite.any():
        first = tuple(int(i) for i in np.argwhere(not_finite)[0])
        value = "NaN" if np.isnan(pixels[first]) else f"{pixels[first]:g}"
        raise invalid(f"pixels of row {row} hold {value} (first at {list(first)}); send numbers in [0, 1]")
    return pixels


mlflow.models.set_model(ImageClassifier())
