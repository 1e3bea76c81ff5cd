"""Images and folders -> top-k labels, on onnxruntime (default) or PyTorch.

Files are walked lazily, then decoded and classified batch by batch (in worker processes, or here:
serving/workers.py), so memory stays flat however many files there are.
A file that cannot be read becomes a row with an ``error``; it never stops the others.
Only numpy and Pillow are imported here at start-up: onnxruntime, MLflow and torch are imported by
the path that needs them (an .onnx file needs neither MLflow nor torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from serving.scores import softmax, to_float, top_indices
from serving.workers import (SMALL_INPUT, Batch, classified_batches, decoded_batches, default_classifying_workers,
                             pool_for)
from zoo.model_format.model import RESIZE_METADATA
from zoo.imaging import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, SUPPORTED, DecodeSpec, decode_batch
from zoo.errors import UsageError
from zoo.machine import cache_dir

if TYPE_CHECKING:
    from concurrent.futures import Executor

RUNTIMES = ("onnx", "torch")
DEFAULT_BATCH_SIZE = 128  # large enough for onnxruntime to run near full speed on 28x28, small for 224x224x3


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first; empty when error is set
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "top": [{"label": l, "probability": p} for l, p in self.top],
                "error": self.error}


# ---- inputs: files named, folders walked lazily ---------------------------------------------------

def iter_inputs(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each file to decode, (path, reason) for a missing path or a folder without images.

    A file named directly is tried whatever its suffix; in folders only image suffixes count.
    """
    return ((Path(path), error) for path, error in _inputs(paths))


def _inputs(paths: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """:func:`iter_inputs` with each path as the string a Path would print: a Path per file is a
    noticeable share of classifying a small image."""
    for p in map(Path, paths):
        if p.is_dir():
            found = False
            for item in _walk_images(str(p)):
                found = found or item[1] is None
                yield item
            if not found:
                yield str(p), f"no images ({SUPPORTED}) in this folder"
        elif p.exists():
            yield str(p), None
        else:
            yield str(p), "no such file or folder"


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """The image files named, and those under the folders named (in name order); ValueError for a bad path."""
    files = []
    for path, error in iter_inputs(paths):
        if error:
            raise UsageError(f"{path}: {error}")
        files.append(path)
    return files


def _walk_images(folder: str) -> Iterator[tuple[str, str | None]]:
    # Depth first, entries sorted by name: the order of sorted(folder.rglob("*")), without holding the tree.
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield folder, f"cannot list this folder: {exc.strerror or exc}"
        return
    prefix = "" if folder == "." else os.path.join(folder, "")  # as Path prints them: "a/b", never "./b"
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_images(prefix + entry.name)
        elif _suffix(entry.name).lower() in IMAGE_SUFFIXES and entry.is_file():
            yield prefix + entry.name, None


def _suffix(name: str) -> str:
    """PurePath(name).suffix without building a path: ".png" of "a.png", nothing for ".png" or "a."."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


# ---- decoding: zoo/imaging.py (one file -> uint8 [C, H, W], or ImageError) ------------------

def load_pixels(files: Sequence[Path], input_shape: Sequence[int], invert: bool = False,
                resize: int | None = None) -> np.ndarray:
    """float32 [N, C, H, W] in [0, 1] for a few files; ValueError naming the first unreadable one."""
    spec = DecodeSpec(tuple(input_shape), invert, resize=resize)
    pixels, errors = decode_batch([str(f) for f in files], spec)
    for f, error in zip(files, errors):
        if error:
            raise UsageError(f"cannot read image {f}: {error}")
    return to_float(pixels)


def _batches(items: Iterator[tuple[str, str | None]], size: int) -> Iterator[Batch]:
    while batch := list(islice(items, size)):
        yield batch


# ---- classifiers -------------------------------------------------------------------------------------

def top_k(probabilities: np.ndarray, class_names: list[str], files: Sequence[str | Path], k: int) -> list[Prediction]:
    return _rows(class_names, [str(f) for f in files], *top_indices(probabilities, k))


def _rows(class_names: list[str], paths: list[str], order: list[list[int]], best: list[list[float]]) -> list[Prediction]:
    return [Prediction(path, [(class_names[j], p) for j, p in zip(o, ps)]) for path, o, ps in zip(paths, order, best)]


class OnnxClassifier:
    """An exported graph: takes pixels in [0, 1], knows its classes and input shape from its metadata."""

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        # Decode workers share the cores: idle inference threads must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta or "input_shape" not in meta:
            raise UsageError(f"{self.path} has no class_names/input_shape metadata; export it with `zoo export`")
        self.class_names = json.loads(meta["class_names"])
        self.input_shape = tuple(json.loads(meta["input_shape"]))
        self.resize = json.loads(meta[RESIZE_METADATA]) if RESIZE_METADATA in meta else None  # None: stretched
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


class TorchClassifier:
    def __init__(self, loaded):
        self.model = loaded.module
        self.class_names = loaded.class_names
        self.input_shape = loaded.input_shape
        self.resize = loaded.resize

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(pixels)).numpy()


def open_classifier(uri: str, runtime: str = "onnx"):
    """A classifier for a local .onnx file or an MLflow model URI (exported once, then cached)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    if uri.endswith(".onnx"):
        if runtime != "onnx":
            raise UsageError("a .onnx file runs on onnxruntime only; use --runtime onnx or pass an MLflow model URI")
        if not Path(uri).is_file():
            raise UsageError(f"no such ONNX file: {uri}")
        return OnnxClassifier(uri)

    from serving.loading import check_uri, load_model

    check_uri(uri)
    if runtime == "torch":
        return TorchClassifier(load_model(uri))
    return OnnxClassifier(cached_export(uri))


def cached_export(uri: str) -> Path:
    """The ONNX file for ``uri``: one registry lookup when it is cached, else loaded and exported once."""
    import mlflow

    # Keyed on what the model is (serving.loading.resolve_model_id), never on the URI typed alone; the
    # tracking URI keeps two stores' models apart.
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{_model_identity(uri)}".encode()).hexdigest()[:16]
    cached = cache_dir("onnx") / f"{key}.onnx"
    if not cached.is_file():
        # Written beside, renamed when complete: an interrupted or failed export never leaves a
        # file the next call would trust.
        partial = cached.with_name(f"{key}.{os.getpid()}.partial.onnx")
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not _shipped_onnx(uri, partial):
                from zoo.model_format.onnx_graph import export_onnx
                from serving.loading import load_model

                export_onnx(load_model(uri), partial)
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)
    return cached


def _shipped_onnx(uri: str, target: Path) -> bool:
    """Copy the ONNX graph the model ships to ``target``; False when it ships none (logged unregistered, or
    by an earlier version): then it is exported here. Saves the export (seconds, torch and onnxscript)."""
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from zoo.model_format.model import SHIPPED_ONNX

    quiet = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"  # one small file: MLflow's progress bar would only clutter stderr
    try:
        location = _model_location(uri)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.move(mlflow.artifacts.download_artifacts(f"{location}/{SHIPPED_ONNX}", dst_path=tmp), target)
        return True
    except (MlflowException, OSError):
        return False
    finally:
        if quiet is None:
            del os.environ[_PROGRESS_BAR]
        else:
            os.environ[_PROGRESS_BAR] = quiet


_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _model_location(uri: str) -> str:
    """Where the files of the model ``uri`` names are: its logged model's artifact location (MLflow 3's
    ``models:/m-ID``, what registered versions point at), a ``runs:/`` URI or a local folder."""
    import mlflow

    from serving.loading import registry_version

    version = registry_version(uri)
    if version is not None:
        uri = f"models:/{version.model_id}" if version.model_id else version.source
    m = re.match(r"^models:/(m-[0-9a-f]+)$", uri)
    if m:
        return mlflow.get_logged_model(m.group(1)).artifact_location
    return Path(uri).resolve().as_uri() if Path(uri).is_dir() else uri


def _model_identity(uri: str) -> str:
    from mlflow.exceptions import MlflowException

    from serving.loading import ModelNotFound, resolve_model_id

    try:
        return resolve_model_id(uri)
    except MlflowException as exc:
        import mlflow

        from zoo.access import masked_url

        reason = (exc.message or str(exc)).strip().splitlines()[0]
        raise ModelNotFound(f"no model at {uri!r} in tracking store {masked_url(mlflow.get_tracking_uri())}: {reason}") from exc


# ---- the whole path ----------------------------------------------------------------------------------

def classify_paths(uri: str, paths: Iterable[str | Path], *, runtime: str = "onnx", k: int = 3, invert: bool = False,
                   batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                   max_pixels: int | None = None) -> Iterator[list[Prediction]]:
    """`zoo classify`: the model at ``uri`` opened (a bad one fails here), then one Prediction per input, in
    input order, a batch at a time as the iterator is read; unreadable inputs have ``error`` set.

    On onnxruntime, worker processes decode and classify whole batches (serving/workers.py): ``workers``
    of them, or by default one per core for small images from two batches on. They are started before
    the model is opened, while they can still be forked, and stopped if the model turns out not to
    want them (large images, workers not asked for)."""
    _check(k, batch_size)
    batches = _batches(_inputs(paths), batch_size)
    pool, processes = None, 0
    if runtime == "onnx" and workers != 0:
        processes = default_classifying_workers() if workers is None else workers
        batches, pool = pool_for(batches, processes, asked=workers is not None)
    try:
        classifier = open_classifier(uri, runtime)
    except BaseException:
        if pool:
            pool.shutdown(cancel_futures=True)
        raise
    spec = decode_spec(classifier, invert, max_pixels)
    if pool and (workers is not None or math.prod(classifier.input_shape) <= SMALL_INPUT):
        return _classified_by(pool, processes, classifier, batches, spec, k)
    if pool:
        pool.shutdown()
    return _classified_here(classifier, batches, spec, k, workers)


def classify_batches(classifier, paths: Iterable[str | Path], *, k: int = 3, invert: bool = False,
                     batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                     max_pixels: int | None = None) -> Iterator[list[Prediction]]:
    """:func:`classify_paths` with a classifier already open: classified in this process (``workers`` decode)."""
    _check(k, batch_size)
    spec = decode_spec(classifier, invert, max_pixels)
    return _classified_here(classifier, _batches(_inputs(paths), batch_size), spec, k, workers)


def decode_spec(classifier, invert: bool, max_pixels: int | None) -> DecodeSpec:
    """How files are decoded for ``classifier``: to its input shape, stretched or (``resize``) cropped as it was scored."""
    return DecodeSpec(tuple(classifier.input_shape), invert, max_pixels or DEFAULT_MAX_PIXELS, resize=classifier.resize)


def _check(k: int, batch_size: int) -> None:
    if k < 1:
        raise UsageError(f"top-k must be at least 1, got {k}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")


def _classified_here(classifier, batches: Iterator[Batch], spec: DecodeSpec, k: int, workers: int | None
                     ) -> Iterator[list[Prediction]]:
    for batch, pixels, errors in decoded_batches(batches, spec, workers):
        good = [i for i, e in enumerate(errors) if e is None]
        rows: dict[int, Prediction] = {}
        if good:
            probabilities = softmax(classifier.scores(to_float(pixels[good])))
            rows = dict(zip(good, top_k(probabilities, classifier.class_names, [batch[i][0] for i in good], k)))
        yield [rows.get(i) or Prediction(path, [], error or errors[i]) for i, (path, error) in enumerate(batch)]


def _classified_by(pool: Executor, processes: int, classifier, batches: Iterator[Batch], spec: DecodeSpec, k: int
                   ) -> Iterator[list[Prediction]]:
    for batch, order, best, errors in classified_batches(pool, processes, batches, str(classifier.path), spec, k):
        rows = iter(_rows(classifier.class_names, [batch[i][0] for i, e in enumerate(errors) if e is None], order, best))
        yield [next(rows) if errors[i] is None else Prediction(path, [], error or errors[i])
               for i, (path, error) in enumerate(batch)]


def classify(classifier, paths: Sequence[str | Path], *, k: int = 3, invert: bool = False) -> list[Prediction]:
    return [p for batch in classify_batches(classifier, paths, k=k, invert=invert) for p in batch]
