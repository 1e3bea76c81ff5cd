"""`zoo train --model mnist_cnn --dataset fashion-mnist --epochs 1` against the published notebook's protocol.

The reference is a faithful re-implementation of the notebook's loop: torchvision's FashionMNIST
read from the same files the project reads (zoo/data/mnist.py unpacks them under --data-dir), a
per-sample ``Compose([ToTensor(), Normalize((0.2860,), (0.3530,))])``, a shuffled DataLoader of
batch 64, the project's mnist_cnn network, Adadelta lr 1.0, one epoch on 54,000 training images
(the project keeps the other 6,000 for validation), then the 10,000 test images in batches of 1000.

Each side runs as a whole process, start-up included, in rounds (zoo, zoo with --precision
bf16-mixed, reference: rounds keep the ratios meaningful when the machine's speed drifts). The zoo
runs all log into one temporary SQLite store, created before the first round, as a user's runs find
their store: creating a store (MLflow's schema migrations, once per store) is timed apart, in
bench_fixed_cost.py. Prints wall seconds, training-loop images/s, seconds outside the training
epoch, test accuracy and the ratios.

Run:      PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py [--pairs 2]   (rounds)
One side: PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --reference   (one side alone, for an external A/B timer such as /usr/bin/time)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

TRAIN_IMAGES = 54_000
ZOO_COMMAND = ["train", "--model", "mnist_cnn", "--dataset", "fashion-mnist", "--epochs", "1"]


def reference(images: int = TRAIN_IMAGES) -> dict[str, float]:
    """The notebook's protocol, one epoch (of ``images`` training images); returns loop images/s and test accuracy."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from zoo.data import default_data_dir
    from zoo.data.mnist import _stage_system_fashion_mnist
    from zoo.models.registry import create_model

    torch.manual_seed(1)
    root = default_data_dir()
    _stage_system_fashion_mnist(root)  # the Debian package's files, where the project reads them
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train_set = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    test_set = datasets.FashionMNIST(str(root), train=False, download=False, transform=transform)
    train_set = Subset(train_set, torch.randperm(len(train_set))[:images].tolist())
    model = create_model("mnist_cnn")
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)

    started = time.perf_counter()
    model.train()
    for data, target in DataLoader(train_set, batch_size=64, shuffle=True):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
    loop_seconds = time.perf_counter() - started

    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in DataLoader(test_set, batch_size=1000):
            correct += (model(data).argmax(dim=1) == target).sum().item()
    return {"images_per_s": images / loop_seconds, "test_accuracy": correct / len(test_set)}


def zoo_metrics(store: str, images: int = TRAIN_IMAGES) -> dict[str, float]:
    """Loop images/s (the epoch's seconds include its 6,000-image validation) and test accuracy of the store's newest run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    return {"images_per_s": images / run.data.metrics["epoch_seconds"],
            "test_accuracy": run.data.metrics["test_accuracy"]}


def timed(command: list[str], env: dict[str, str], cwd: str | os.PathLike | None = None) -> float:
    """Wall seconds of one whole process (start-up included)."""
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def new_store(folder: str) -> str:
    """A SQLite MLflow store in ``folder``, created (schema and migrations) before any timed run."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(tracking_uri=store).search_experiments()
    return store


def run_zoo(store: str, batches: int | None = None, extra: list[str] | None = None) -> dict[str, float]:
    """One `zoo train` process (with ``extra`` options) logging into ``store``; ``batches`` cuts the epoch
    to that many batches of 64 (a smoke run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    zoo = os.path.join(os.path.dirname(sys.executable), "zoo")
    wall = timed([zoo, *ZOO_COMMAND, *(extra or []), *(["--max-batches", str(batches)] if batches else [])], env)
    return with_outside({"wall_s": wall, **zoo_metrics(store, 64 * batches if batches else TRAIN_IMAGES)},
                        64 * batches if batches else TRAIN_IMAGES)


def with_outside(row: dict[str, float], images: int) -> dict[str, float]:
    """``row`` with the seconds spent outside the training epoch (start-up, store, test, figures, model logging)."""
    return {**row, "outside_s": row["wall_s"] - images / row["images_per_s"]}


def run_reference(batches: int | None = None) -> dict[str, float]:
    """One process of the reference protocol; ``batches`` as for :func:`run_zoo`."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        images = ["--images", str(64 * batches)] if batches else []
        wall = timed([sys.executable, __file__, "--reference", "--json", out.name, *images], dict(os.environ))
        return with_outside({"wall_s": wall, **json.load(open(out.name))}, 64 * batches if batches else TRAIN_IMAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs to run (zoo, then reference)")
    parser.add_argument("--reference", action="store_true", help="run the reference protocol once, in this process")
    parser.add_argument("--json", help="with --reference: write its figures to this file")
    parser.add_argument("--images", type=int, default=TRAIN_IMAGES, help="with --reference: training images")
    args = parser.parse_args()
    if args.reference:
        figures = reference(args.images)
        print(json.dumps(figures))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f)
        return

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    result = compare(args.pairs)
    for name, m in result["median"].items():
        print(f"{name:34s} median wall {m['wall_s']:.1f} s, loop {m['images_per_s']:.0f} images/s, "
              f"outside the epoch {m['outside_s']:.1f} s, test accuracy {m['test_accuracy']:.4f}")
    for name, ratios in result["ratios"].items():
        print(f"{name} is {statistics.median(ratios):.2f}x faster than the reference (ratios per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")


# The zoo sides: the default command, and the same with bfloat16 autocast (training.engine.PRECISIONS).
ZOO_SIDES = {"zoo train": [], "zoo train --precision bf16-mixed": ["--precision", "bf16-mixed"]}


def compare(pairs: int, batches: int | None = None) -> dict:
    """``pairs`` rounds of every zoo side then the reference; each side's medians and, per zoo side,
    the ratios reference wall / zoo wall of each round (above 1: zoo is faster)."""
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in [*ZOO_SIDES, "reference"]}
    with tempfile.TemporaryDirectory() as tmp:
        store = new_store(tmp)
        for round_ in range(pairs):
            for name, extra in ZOO_SIDES.items():
                rows[name].append(run_zoo(store, batches, extra))
            rows["reference"].append(run_reference(batches))
            print(f"round {round_ + 1}: " + " | ".join(
                f"{name} {r[-1]['wall_s']:.1f} s ({r[-1]['images_per_s']:.0f} img/s, acc {r[-1]['test_accuracy']:.4f})"
                for name, r in rows.items()), flush=True)
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()}
    ratios = {name: [ref["wall_s"] / side["wall_s"] for side, ref in zip(rows[name], rows["reference"])] for name in ZOO_SIDES}
    return {"median": median, "ratios": ratios}


if __name__ == "__main__":
    main()
