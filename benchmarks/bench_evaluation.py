"""Evaluation speed of the MNIST CNN against the evaluation batch size (training.engine.EVAL_BATCH_SIZE).

Times ``training.engine.evaluate_predictions`` (what every validation and test pass runs) on the
10,000 Fashion-MNIST test images, one round per batch size, the rounds interleaved so that a drift in
the machine's speed hits every size alike. Prints images/s per round and the median.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_evaluation [--sizes 1000 256 128 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from training.engine import evaluate_predictions
from zoo.data import load_dataset
from zoo.normalization import Normalization
from zoo.models.registry import create_model


def measure(sizes: list[int], rounds: int) -> dict[int, list[float]]:
    dataset = load_dataset("fashion-mnist")
    model = create_model("mnist_cnn")
    normalization = Normalization((0.2860,), (0.3530,))  # the usual Fashion-MNIST constants
    evaluate_predictions(model, dataset.test, normalization, sizes[0])  # warm-up
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            started = time.perf_counter()
            evaluate_predictions(model, dataset.test, normalization, size)
            rates[size].append(len(dataset.test) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 256, 128, 64])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    for size, values in measure(args.sizes, args.rounds).items():
        print(f"batch {size:5d}: {statistics.median(values):7.0f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
