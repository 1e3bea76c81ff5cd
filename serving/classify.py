"""Images and folders -> top-k labels, on onnxruntime (default) or PyTorch."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RUNTIMES = ("onnx", "torch")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first

    @property
    def label(self) -> str:
        return self.top[0][0]

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "top": [{"label": l, "probability": p} for l, p in self.top]}


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, plus those under named folders (recursively, sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{p} is not an image; supported: {', '.join(sorted(IMAGE_SUFFIXES))}")
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    return found


def load_pixels(files: Sequence[Path], input_shape: Sequence[int], invert: bool = False) -> np.ndarray:
    """Decode, convert to the model's channels (grayscale or RGB), resize: float32 [N, C, H, W] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = input_shape
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), channels, height, width), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img = img.convert(mode)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from exc
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        out[i] = 1.0 - arr if invert else arr
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    # Networks end in logits or log-probabilities: softmax gives probabilities for both.
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, class_names: list[str], files: Sequence[Path], k: int) -> list[Prediction]:
    k = min(k, probabilities.shape[1])
    preds = []
    for f, p in zip(files, probabilities):
        order = np.argsort(-p)[:k]
        preds.append(Prediction(str(f), [(class_names[j], float(p[j])) for j in order]))
    return preds


class OnnxClassifier:
    """An exported graph: takes pixels in [0, 1], knows its classes and input shape from its metadata."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta or "input_shape" not in meta:
            raise ValueError(f"{self.path} has no class_names/input_shape metadata; export it with `zoo export`")
        self.class_names = json.loads(meta["class_names"])
        self.input_shape = tuple(json.loads(meta["input_shape"]))
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


class TorchClassifier:
    def __init__(self, loaded):
        self.model = loaded.with_normalization()
        self.class_names = loaded.class_names
        self.input_shape = loaded.input_shape

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(pixels)).numpy()


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE_DIR", Path.home() / ".cache" / "zoo")) / "onnx"


def open_classifier(uri: str, runtime: str = "onnx"):
    """A classifier for a local .onnx file or an MLflow model URI (exported once, then cached)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    if uri.endswith(".onnx"):
        if runtime != "onnx":
            raise ValueError("a .onnx file runs on onnxruntime only; use --runtime onnx or pass an MLflow model URI")
        if not Path(uri).is_file():
            raise FileNotFoundError(f"no such ONNX file: {uri}")
        return OnnxClassifier(uri)

    from serving.loading import check_uri, load_model, read_metadata, resolve_model_id

    check_uri(uri)
    if runtime == "torch":
        return TorchClassifier(load_model(uri))
    read_metadata(uri)  # a clear error for an unknown URI before any export work
    import mlflow

    # Model ids are unique; the tracking URI guards the runs:/ and local-folder forms.
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{resolve_model_id(uri)}".encode()).hexdigest()[:16]
    cached = onnx_cache_dir() / f"{key}.onnx"
    if not cached.is_file():
        from serving.export import export_onnx

        export_onnx(load_model(uri), cached)
    return OnnxClassifier(cached)


def classify(classifier, paths: Sequence[str | Path], *, k: int = 3, invert: bool = False) -> list[Prediction]:
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    files = collect_images(paths)
    pixels = load_pixels(files, classifier.input_shape, invert=invert)
    return top_k(softmax(classifier.scores(pixels)), classifier.class_names, files, k)
