"""One training epoch of mnist_cnn on mnist-5k: in-memory uint8 + per-batch normalization vs a
per-sample torchvision transform pipeline (PIL image -> ToTensor -> Normalize) in a DataLoader.

Both feed the same network, optimizer and batch size; only the input pipeline differs.
Run: .venv/bin/python benchmarks/bench_data_pipeline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from training.engine import batches, make_optimizer
from zoo.data import load_dataset
from zoo.models.registry import create_model, get_model_spec


class PilDataset(torch.utils.data.Dataset):
    """What a torchvision MNIST dataset does per sample: a PIL image through a transform."""

    def __init__(self, split, transform):
        self.images = [Image.fromarray(img[0].numpy(), mode="L") for img in split.images]
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def epoch(model, optimizer, loader, train: bool) -> float:
    started = time.perf_counter()
    for x, y in loader:
        if train:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k").train
    norm = get_model_spec("mnist_cnn").normalization
    pil = PilDataset(data, transforms.Compose([transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)]))
    pipelines = {
        "dataloader+per-sample transform": lambda: DataLoader(pil, batch_size=args.batch_size, shuffle=True),
        "in-memory uint8 + per-batch normalize": lambda: (
            (norm.apply(x), y) for x, y in batches(data, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
        ),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{len(data)} images, batch {args.batch_size}, best of {args.repeats}")
    results = {}
    for train in (False, True):
        for name, make in pipelines.items():
            model = create_model("mnist_cnn")
            optimizer = make_optimizer("adadelta", model.parameters(), 1.0)
            best = min(epoch(model, optimizer, make(), train) for _ in range(args.repeats))
            results[(name, train)] = best
            print(f"{'train epoch' if train else 'input only':<12} {name:<40} {best:7.3f} s")
    for train in (False, True):
        ratio = results[("dataloader+per-sample transform", train)] / results[("in-memory uint8 + per-batch normalize", train)]
        print(f"speed-up ({'train epoch' if train else 'input only'}): {ratio:.1f}x")


if __name__ == "__main__":
    main()
