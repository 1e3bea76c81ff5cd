"""zoo's jobs against the floor of each, measured in the same run: ratios hold where absolute speeds do not.

The machines these run on differ by 2x or more from day to day, so each job is set against the
plainest code that does the same work, in the same process, alternating A B:

- training: `zoo train`'s loop (its trainer, its shuffled batches normalized per batch on the
  device, its progress bar) against a plain in-memory loop of the same network, optimizer and
  batch size over float tensors already normalized, contiguous slices, nothing logged.
  Target: at least 0.95x.
- folder classification: `zoo classify MODEL.onnx FOLDER` (the whole command, start-up included,
  and its decode-and-classify path alone) against decoding the same PNG files with PIL and running
  onnxruntime on batches of 128 in one plain loop. Target: at least 1.0x.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 64  # mnist_cnn's recipe
CLASSIFY_BATCH = 128  # zoo classify's default --batch-size


def _training_data(images: int):
    from zoo.data import load_dataset

    dataset = load_dataset("fashion-mnist")
    return dataset.train.subset(images), dataset


def plain_loop(split, normalization, seed: int = 1) -> float:
    """The floor: images/s of one epoch over pre-normalized contiguous float tensors."""
    import torch
    import torch.nn.functional as F

    from zoo.models.registry import create_model

    torch.manual_seed(seed)
    order = torch.randperm(len(split))
    images = normalization.apply(split.images[order].float() / 255).contiguous()  # once, before the clock
    labels = split.labels[order].contiguous()
    model = create_model("mnist_cnn")
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()
    started = time.perf_counter()
    for start in range(0, len(labels), BATCH):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[start:start + BATCH]), labels[start:start + BATCH])
        loss.backward()
        optimizer.step()
    return len(labels) / (time.perf_counter() - started)


def zoo_loop(split, normalization, seed: int = 1) -> float:
    """`zoo train`'s loop: images/s of one epoch through its trainer, uint8 data normalized per batch."""
    import io

    import torch

    from zoo.progress import tqdm
    from training.train import trainer_for
    from training.train_config import TrainConfig
    from zoo.models.registry import create_model

    torch.manual_seed(seed)
    config = TrainConfig(model="mnist_cnn", dataset="fashion-mnist", epochs=1)
    network = create_model("mnist_cnn")
    trainer = trainer_for(config, network)
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=len(split), unit="img", file=io.StringIO(), leave=False) as bar:  # zoo train draws one
        started = time.perf_counter()
        trainer.train_epoch(split, normalization, config.resolved().batch_size, generator, on_batch=bar.update)
        return len(split) / (time.perf_counter() - started)


def training(images: int, pairs: int) -> dict:
    from zoo.normalization import Normalization

    split, _ = _training_data(images)
    normalization = Normalization((0.2860,), (0.3530,))
    floors, zoos = [], []
    for _ in range(pairs):  # A B pairs: the machine's drift hits both sides alike
        floors.append(plain_loop(split, normalization))
        zoos.append(zoo_loop(split, normalization))
    ratios = [z / f for z, f in zip(zoos, floors)]
    return {"images": len(split), "floor": statistics.median(floors), "zoo": statistics.median(zoos),
            "ratios": ratios, "ratio": statistics.median(ratios)}


def _write_folder(folder: Path, images: int) -> list[Path]:
    """Fashion-MNIST test images as 28x28 grayscale PNG files."""
    from PIL import Image

    from zoo.data import load_dataset

    files = []
    for i, image in enumerate(load_dataset("fashion-mnist").test.subset(images).images):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(files[-1])
    return files


def _onnx_model(path: Path) -> Path:
    """An (untrained) mnist_cnn exported as `zoo export` does: the speed does not depend on the weights."""
    from model_format.onnx_graph import export_onnx
    from model_format.model import LoadedModel
    from zoo.normalization import NormalizedModel
    from zoo.models.registry import create_model, get_model_spec

    spec = get_model_spec("mnist_cnn")
    module = NormalizedModel(create_model("mnist_cnn").eval(), spec.normalization).eval()
    export_onnx(LoadedModel("bench", module, spec.normalization, [str(i) for i in range(10)], (1, 28, 28), "mnist_cnn"), path)
    return path


def plain_classify(model: Path, files: list[Path]) -> float:
    """The floor: images/s of PIL decoding and onnxruntime on batches, in one plain loop."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    started = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(files), CLASSIFY_BATCH):
        batch = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.uint8)[None] for f in files[start:start + CLASSIFY_BATCH]])
        session.run(None, {name: batch.astype(np.float32) / np.float32(255)})
    return len(files) / (time.perf_counter() - started)


def zoo_classify_inside(model: Path, folder: Path, count: int) -> float:
    """zoo classify's path without the process start-up: open the model, decode and classify the folder."""
    from serving.classify import classify_batches, open_classifier

    started = time.perf_counter()
    rows = sum(len(batch) for batch in classify_batches(open_classifier(str(model)), [folder]))
    assert rows == count
    return count / (time.perf_counter() - started)


def zoo_classify_command(model: Path, folder: Path, count: int) -> float:
    """The whole `zoo classify MODEL.onnx FOLDER --format jsonl` process, start-up included."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", "classify", str(model), str(folder), "--format", "jsonl"],
                          capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - started
    assert len(done.stdout.splitlines()) == count
    return count / seconds


def classification(images: int, pairs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = sorted(_write_folder(folder, images))
        model = _onnx_model(Path(tmp) / "model.onnx")
        rates: dict[str, list[float]] = {"floor": [], "zoo classify (command)": [], "zoo classify (in process)": []}
        for _ in range(pairs):
            rates["floor"].append(plain_classify(model, files))
            rates["zoo classify (command)"].append(zoo_classify_command(model, folder, len(files)))
            rates["zoo classify (in process)"].append(zoo_classify_inside(model, folder, len(files)))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {name: statistics.median(z / f for z, f in zip(values, rates["floor"]))
              for name, values in rates.items() if name != "floor"}
    return {"images": len(files), "images_per_s": medians, "ratios": ratios}


TRAIN_IMAGES, CLASSIFY_IMAGES = 12_000, 10_000


def measure(quick: bool = False, pairs: int = 3, train_images: int = TRAIN_IMAGES,
            classify_images: int = CLASSIFY_IMAGES) -> dict:
    return {"training": training(1024 if quick else train_images, 1 if quick else pairs),
            "classification": classification(512 if quick else classify_images, 1 if quick else pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--classify-images", type=int, default=CLASSIFY_IMAGES)
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.pairs, args.train_images, args.classify_images), indent=2))


if __name__ == "__main__":
    main()
