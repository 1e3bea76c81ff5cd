"""K study trials trained one after another vs together (``zoo study --batch-trials K``), training only.

Each side trains the same K normalizations for one epoch over the same images from the same
initial weights: "one at a time" with the engine's loop (what a lone trial runs), "together" with
training.train_batch.StackedTrials (what --batch-trials runs). Reported: trial-images per second
(K x images / seconds) of each, and their ratio. MLflow logging is left out: it is the same per
trial either way.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_batched_trials --trials 4 --images 3000 [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from training.train_batch import StackedTrials
from training.engine import make_optimizer, train_one_epoch
from zoo.data import load_dataset
from zoo.normalization import Normalization
from zoo.models.registry import create_model


def normalizations(k: int) -> list[Normalization]:
    generator = torch.Generator().manual_seed(0)
    means = torch.empty(k).uniform_(-1, 2, generator=generator)
    stds = torch.empty(k).uniform_(0.05, 1, generator=generator)
    return [Normalization((float(m),), (float(s),)) for m, s in zip(means, stds)]


def one_at_a_time(model: str, split, norms, batch_size: int, device: torch.device) -> float:
    started = time.perf_counter()
    for normalization in norms:
        torch.manual_seed(1)
        network = create_model(model).to(device)
        optimizer = make_optimizer("adadelta", network.parameters(), 1.0)
        network.train()
        train_one_epoch(network, optimizer, split, normalization, batch_size, torch.Generator().manual_seed(1))
    _sync(device)
    return time.perf_counter() - started


def together(model: str, split, norms, batch_size: int, device: torch.device) -> float:
    started = time.perf_counter()
    torch.manual_seed(1)
    stack = StackedTrials(create_model(model).to(device), norms, optimizer="adadelta", lr=1.0, gamma=0.7)
    stack.train_epoch(split, batch_size, torch.Generator().manual_seed(1))
    _sync(device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--trials", type=int, nargs="+", default=[4], help="K values to measure")
    parser.add_argument("--images", type=int, default=3000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = parser.parse_args()

    device = torch.device(args.device)
    split = load_dataset(args.dataset).train.subset(args.images)
    split = type(split)(split.images.to(device), split.labels.to(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{args.model} on {args.images} {args.dataset} images, batch {args.batch_size}, {name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| K | one at a time (s) | together (s) | trial-images/s alone | together | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in args.trials:
        norms = normalizations(k)
        pairs = [(one_at_a_time(args.model, split, norms, args.batch_size, device),
                  together(args.model, split, norms, args.batch_size, device)) for _ in range(args.repeats)]
        alone, batched = min(p[0] for p in pairs), min(p[1] for p in pairs)  # interleaved, best of each
        work = k * args.images
        print(f"| {k} | {alone:.2f} | {batched:.2f} | {work / alone:,.0f} | {work / batched:,.0f} | {alone / batched:.2f}x |")


if __name__ == "__main__":
    main()
