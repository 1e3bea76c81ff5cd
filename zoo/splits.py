"""What a loaded dataset is, for the catalog and image folders: uint8 image splits (in memory or
memory-mapped) with class names."""

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from zoo.errors import UsageError
from zoo.normalization import Normalization


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    mapped: bool = False  # images memory-mapped from a file (too large to hold): read batch by batch

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> "Split":
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n], self.mapped)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    source: str = ""  # where the images came from (a file or folder), shown beside the runs that use them
    skipped: int = 0  # files of an image folder that were not readable images (zoo/folder_dataset.py)
    _statistics: object = field(default=None, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def pixel_statistics(self) -> Normalization:
        """The training split's per-channel mean and std as pixels in [0, 1] (``--mean auto``), computed once."""
        if self._statistics is None:
            self._statistics = Normalization.from_images(self.train.images)
        return self._statistics


def stratified_split(labels: torch.Tensor, fractions: list[float], seed: int,
                     names: Sequence[str] = ("train", "val", "test")) -> list[torch.Tensor]:
    """Indices for each fraction (adding up to 1, training first), every class divided alike; empty splits refused."""
    names = list(names)[: len(fractions)]
    if fractions[0] <= 0:
        held = " and ".join(f"{name} fraction ({f:g})" for name, f in zip(names[1:], fractions[1:]))
        raise UsageError(f"the {held} leave no images to train on: together they must be below 1")
    for name, f in zip(names[1:], fractions[1:]):
        if f <= 0:
            raise UsageError(f"the {name} fraction must be above 0, got {f:g}")
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    largest = 0
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        largest = max(largest, len(idx))
        bounds = np.cumsum([0] + [round(f * len(idx)) for f in fractions[:-1]] + [len(idx)])
        bounds[-1] = len(idx)
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i] : bounds[i + 1]])
    out = []
    for name, f, p in zip(names, fractions, parts):
        cat = torch.cat(p)
        if len(cat) == 0 and len(labels):
            option = "lower the other fractions" if name == "train" else f"give --{name}-fraction a larger one"
            raise UsageError(f"the {name} split would hold no images: a fraction of {f:g} of at most {largest:,} "
                             f"images a class rounds to none; {option}")
        out.append(cat[torch.randperm(len(cat), generator=generator)])
    return out
