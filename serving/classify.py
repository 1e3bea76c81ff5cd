"""Images and folders -> top-k labels, on onnxruntime (default) or PyTorch.

Files are walked lazily and decoded and classified batch by batch, in worker processes (zoo/pool.py) or here,
so memory stays flat; an unreadable file becomes a row with an ``error``. Only numpy and Pillow load at start-up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from zoo.errors import UsageError
from zoo.imaging import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, SUPPORTED, DecodeSpec, decode_batch
from zoo.machine import cache_dir, fork_is_safe, usable_cores
from zoo.model_format.model import RESIZE_METADATA
from zoo.pool import in_order, start_pool

if TYPE_CHECKING:
    from concurrent.futures import Executor

RUNTIMES = ("onnx", "torch")
DEFAULT_BATCH_SIZE = 128  # large enough for onnxruntime to run near full speed on 28x28, small for 224x224x3
Batch = list[tuple[str, "str | None"]]  # (path, why it is skipped)


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


def _inputs(paths: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """(path, None) to decode, or (path, why not); a file named is tried whatever its suffix, in folders images only."""
    for p in map(Path, paths):
        if p.is_dir():
            found = False
            for item in _walk_images(str(p)):
                found = found or item[1] is None
                yield item
            if not found:
                yield str(p), f"no images ({SUPPORTED}) in this folder"
        else:
            yield str(p), None if p.exists() else "no such file or folder"


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """The image files named and under the folders named (in name order); UsageError for a bad path."""
    inputs = list(_inputs(paths))
    if bad := next((f"{p}: {e}" for p, e in inputs if e), None):
        raise UsageError(bad)
    return [Path(p) for p, _ in inputs]


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
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
            yield prefix + entry.name, None


def load_pixels(files: Sequence[Path], input_shape: Sequence[int], invert: bool = False,
                resize: int | None = None) -> np.ndarray:
    """float32 [N, C, H, W] in [0, 1] for a few files; UsageError naming the first unreadable one."""
    pixels, errors = decode_batch([str(f) for f in files], DecodeSpec(tuple(input_shape), invert, resize=resize))
    if bad := next((f"cannot read image {f}: {e}" for f, e in zip(files, errors) if e), None):
        raise UsageError(bad)
    return to_float(pixels)


def _batches(items: Iterator[tuple[str, str | None]], size: int) -> Iterator[Batch]:
    while batch := list(islice(items, size)):
        yield batch


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], the exported graph's input."""
    return pixels.astype(np.float32) / np.float32(255.0)


def top_k(scores: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's ``k`` best classes and softmax probabilities (networks end in logits), best first."""
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = e / e.sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :min(k, probabilities.shape[1])]
    return order.tolist(), np.take_along_axis(probabilities, order, axis=1).tolist()


def _rows(class_names: list[str], batch: Batch, errors: list[str | None], order: list[list[int]],
          best: list[list[float]]) -> list[Prediction]:
    top = iter([(class_names[j], p) for j, p in zip(o, ps)] for o, ps in zip(order, best))
    return [Prediction(path, next(top)) if errors[i] is None else Prediction(path, [], error or errors[i])
            for i, (path, error) in enumerate(batch)]


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
        self.model, self.class_names = loaded.module, loaded.class_names
        self.input_shape, self.resize = loaded.input_shape, loaded.resize

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

    from serving.loading import load_model, resolve_model_id

    # Keyed on what the model is, never on the URI typed alone; the tracking URI keeps two stores' models apart.
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{resolve_model_id(uri)}".encode()).hexdigest()[:16]
    cached = cache_dir("onnx") / f"{key}.onnx"
    if not cached.is_file():
        # Written beside, renamed when complete: a failed export never leaves a file the next call would trust.
        part = cached.with_name(f"{key}.{os.getpid()}.partial.onnx")
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not _shipped_onnx(uri, part):
                from zoo.model_format.onnx_graph import export_onnx

                export_onnx(load_model(uri), part)
            os.replace(part, cached)
        finally:
            part.unlink(missing_ok=True)
    return cached


def _shipped_onnx(uri: str, target: Path) -> bool:
    """Copy the ONNX graph the model ships to ``target`` (saves an export); False when it ships none."""
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from serving.loading import registry_version
    from zoo.model_format.model import SHIPPED_ONNX

    try:
        # Where the model's files are: its logged model's artifact location, a runs:/ URI or a local folder.
        if (version := registry_version(uri)) is not None:
            uri = f"models:/{version.model_id}" if version.model_id else version.source
        if m := re.match(r"^models:/(m-[0-9a-f]+)$", uri):
            uri = mlflow.get_logged_model(m.group(1)).artifact_location
        elif Path(uri).is_dir():
            uri = Path(uri).resolve().as_uri()
        with tempfile.TemporaryDirectory() as tmp:
            shutil.move(mlflow.artifacts.download_artifacts(f"{uri}/{SHIPPED_ONNX}", dst_path=tmp), target)
        return True
    except (MlflowException, OSError):
        return False


# On onnxruntime, images up to SMALL_INPUT values (128x128 grey, 73x73 RGB) are decoded *and* classified by workers
# with one-thread sessions: a batch of them is too little to split across onnxruntime's threads, and in one process
# decoding and inference slow each other down (benchmarks/RESULTS.md). Larger ones are classified here, where
# onnxruntime's threads share each image's work; workers (or a thread) only decode them.
SMALL_INPUT = 16_384
MAX_CLASSIFYING_WORKERS = 8  # a model and a batch each; more cores than this are not measured
POOL_MIN_IMAGES = 4096  # a spawned pool (an interpreter, numpy, Pillow each) pays for itself from here on


def pool_for(batches: Iterator[Batch], processes: int, asked: bool) -> tuple[Iterator[Batch], Executor | None]:
    """The batches (those looked ahead put back) and a pool of ``processes`` workers when it pays (``pays``)."""
    ahead: list[Batch] = []  # paths only: cheap to look ahead
    forking = fork_is_safe()

    def pays() -> bool:
        return len(ahead) >= 2 and (asked or forking or sum(map(len, ahead)) >= POOL_MIN_IMAGES)

    while processes and not pays() and (batch := next(batches, None)):
        ahead.append(batch)
    return chain(ahead, batches), (start_pool(processes) if processes and pays() else None)


def _decode(batch: Batch, spec: DecodeSpec) -> tuple[np.ndarray, list[str | None]]:
    return decode_batch([path if error is None else None for path, error in batch], spec)


def _scored(classifier, pixels: np.ndarray, errors: list[str | None], k: int) -> tuple[list, list]:
    """The top-k of the readable files' (no error) pixels."""
    good = [i for i, e in enumerate(errors) if e is None]
    return top_k(classifier.scores(to_float(pixels[good])), k) if good else ([], [])


_sessions: dict[str, OnnxClassifier] = {}  # in a worker: one per model file


def classify_batch(batch: Batch, model: str, spec: DecodeSpec, k: int
                   ) -> tuple[list[list[int]], list[list[float]], list[str | None]]:
    """In a worker: the top-k of ``batch``'s readable files by the ONNX file ``model``, and one error per file."""
    pixels, errors = _decode(batch, spec)
    if model not in _sessions:
        _sessions[model] = OnnxClassifier(model, threads=1)  # the other cores run the other workers
    return *_scored(_sessions[model], pixels, errors, k), errors


def classify_paths(uri: str, paths: Iterable[str | Path], *, runtime: str = "onnx", k: int = 3, invert: bool = False,
                   batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                   max_pixels: int | None = None) -> Iterator[list[Prediction]]:
    """`zoo classify`: the model opened (a bad one fails here), then Predictions in input order, a batch at a time.
    Classifying workers start before the model is opened, while they can still be forked."""
    for name, value in (("top-k", k), ("batch size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    batches = _batches(_inputs(paths), batch_size)
    pool, processes = None, 0
    if runtime == "onnx" and workers != 0:
        n = usable_cores()
        processes = (0 if n < 2 else min(n, MAX_CLASSIFYING_WORKERS)) if workers is None else workers
        batches, pool = pool_for(batches, processes, asked=workers is not None)
    try:
        classifier = open_classifier(uri, runtime)
    except BaseException:
        if pool:
            pool.shutdown(cancel_futures=True)
        raise
    # To the model's input shape, stretched or (resize) cropped as it was scored.
    spec = DecodeSpec(tuple(classifier.input_shape), invert, max_pixels or DEFAULT_MAX_PIXELS, resize=classifier.resize)
    if pool and (workers is not None or math.prod(classifier.input_shape) <= SMALL_INPUT):
        job = partial(classify_batch, model=str(classifier.path), spec=spec, k=k)
        return (_rows(classifier.class_names, batch, errors, order, best)
                for batch, (order, best, errors) in in_order(batches, job, pool, depth=2 * processes))
    if pool:
        pool.shutdown()
    return _classified_here(classifier, batches, spec, k, workers)


def _classified_here(classifier, batches: Iterator[Batch], spec: DecodeSpec, k: int, workers: int | None
                     ) -> Iterator[list[Prediction]]:
    """Classified here; decoded by ``workers`` processes (default: one per core but one, none on 2 cores, where
    onnxruntime already runs a batch on both), or a thread."""
    processes = (0 if usable_cores() <= 2 else usable_cores() - 1) if workers is None else workers
    batches, pool = pool_for(batches, processes, asked=workers is not None)
    depth = 2 * processes if pool else 1  # twice as many batches in flight as workers keeps each one busy
    if pool is None:
        # Pillow's decoders and onnxruntime both release the GIL: decoding the next batch in a thread overlaps
        # this one's inference (decoding then classifying leaves a core idle in each half).
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="zoo-decode")
    for batch, (pixels, errors) in in_order(batches, partial(_decode, spec=spec), pool, depth):
        yield _rows(classifier.class_names, batch, errors, *_scored(classifier, pixels, errors, k))
