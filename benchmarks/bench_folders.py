"""Image folders: decoding into the cache against a plain PIL loop, the cached start, and training
on a PNG folder against the same images from the catalog.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_folders [--quick] [--train]

Decoding: Fashion-MNIST's 60,000 training images written as 28x28 PNG files, and 10,000 of them
as 96x96 RGB JPEG files (tinted, upscaled: no offline RGB set of that size exists here). The
plain loop opens, converts and stacks each file with PIL in one process (what a script does);
zoo's first load lists the folder, reads the headers, decodes in worker processes and writes the
cache; its second load reads the cache. Training: `zoo train --dataset FOLDER` against
`--dataset fashion-mnist`, one epoch each, the same seed, in whole processes. The class folders
are named `0-T-shirt_top`, `1-Trouser`, ... and the files by their index, so that the folder lists
classes and images in the catalog's order: the seeded stratified split then picks the same
validation images in the same order, and the two runs differ only by the pipeline that fed them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent


def write_png_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
                     numbered: bool = False) -> list[Path]:
    """PNG files under root/CLASS/INDEX.png; ``numbered``: CLASS is "LABEL-NAME", so folders sort in label order."""
    from PIL import Image

    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        name = classes[int(y)].replace("/", "_")
        folder = root / (f"{int(y)}-{name}" if numbered else name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray(img[0]).save(path)
        paths.append(path)
    return paths


def write_jpeg_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / classes[int(y)].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(0.4, 1.0, 3)
        rgb = (img[0][..., None].astype(np.float32) * tint).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rgb, "RGB").resize((96, 96), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], mode: str) -> float:
    """Seconds for PIL to decode every file into one uint8 array, in this process."""
    from PIL import Image

    started = time.perf_counter()
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert(mode)))
    np.stack(arrays)
    return time.perf_counter() - started


def zoo_loads(root: Path, cache: Path) -> tuple[float, float]:
    """Seconds of zoo's first load (decode into the cache) and second load (from the cache)."""
    from zoo.folder_dataset import load_image_folder

    times = []
    for _ in range(2):
        started = time.perf_counter()
        load_image_folder(root, cache_dir=cache, progress=False)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def decoding(quick: bool) -> list[dict]:
    from zoo.data import load_dataset

    fashion = load_dataset("fashion-mnist")
    images = np.concatenate([fashion.train.images.numpy(), fashion.val.images.numpy()])
    labels = np.concatenate([fashion.train.labels.numpy(), fashion.val.labels.numpy()])
    sizes = {"png": 3000 if quick else 60000, "jpeg": 1000 if quick else 10000}
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-bench-folders-") as work:
        work = Path(work)
        for kind, writer, mode in (("png", write_png_folder, "L"), ("jpeg", write_jpeg_folder, "RGB")):
            n = sizes[kind]
            paths = writer(work / kind, images[:n], labels[:n], fashion.classes)
            plain = plain_loop(paths, mode)
            first, second = zoo_loads(work / kind, work / f"cache-{kind}")
            rows.append({"files": f"{n:,} {'28x28 PNG' if kind == 'png' else '96x96 RGB JPEG'}", "n": n,
                         "plain_s": plain, "zoo_first_s": first, "zoo_cached_s": second,
                         "speedup": plain / first, "workers": min(os.cpu_count() or 1, 8)})
    return rows


def zoo_train(dataset: str, store: Path, batches: int | None) -> dict:
    """One `zoo train` process; its test accuracy and its epoch's seconds from the run."""
    command = [sys.executable, "-m", "zoo.cli", "train", "--dataset", dataset, "--epochs", "1", "--seed", "1",
               "--no-checkpoints", "--format", "json"] + (["--max-batches", str(batches)] if batches else [])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(PROJECT)}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=store, check=True)
    wall = time.perf_counter() - started
    summary = json.loads(proc.stdout)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    epoch_s = client.get_metric_history(summary["run_id"], "epoch_seconds")[0].value
    return {"test_accuracy": summary["test_accuracy"], "epoch_s": epoch_s, "wall_s": wall}


def training(quick: bool, pairs: int = 2) -> dict[str, list[dict]]:
    """`zoo train` on Fashion-MNIST as a PNG folder (train/ and test/) and from the catalog."""
    from torchvision.datasets import FashionMNIST

    from zoo.data import default_data_dir, load_dataset

    fashion = load_dataset("fashion-mnist")  # also puts the Debian package's files where torchvision reads them
    with tempfile.TemporaryDirectory(prefix="zoo-bench-train-folder-") as work:
        work = Path(work)
        source = FashionMNIST(str(default_data_dir()), train=True, download=False)  # torchvision's order, unsplit
        write_png_folder(work / "fashion-png" / "train", source.data.unsqueeze(1).numpy(), source.targets.numpy(),
                         fashion.classes, numbered=True)
        write_png_folder(work / "fashion-png" / "test", fashion.test.images.numpy(), fashion.test.labels.numpy(),
                         fashion.classes, numbered=True)
        os.environ["ZOO_CACHE_DIR"] = str(work / "cache")
        batches = 20 if quick else None
        zoo_train(str(work / "fashion-png"), work, 1)  # decodes the folder into the cache: not what is compared
        runs: dict[str, list[dict]] = {"folder": [], "catalog": []}
        for _ in range(pairs):  # alternated: a machine whose speed drifts slows both sides alike
            runs["folder"].append(zoo_train(str(work / "fashion-png"), work, batches))
            runs["catalog"].append(zoo_train("fashion-mnist", work, batches))
        return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", action="store_true", help="Also compare training on the folder and the catalog.")
    args = parser.parse_args()
    print(json.dumps({"decoding": decoding(args.quick),
                      **({"training": training(args.quick, 1 if args.quick else 2)} if args.train else {})}, indent=2))


if __name__ == "__main__":
    main()
