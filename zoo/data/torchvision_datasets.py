"""The torchvision catalog: CIFAR-10/100, SVHN, KMNIST, EMNIST letters and STL-10.

Each entry opens the data with torchvision's own dataset class (its download, checksums and file
parsing), then turns what that class holds into the zoo's uint8 [N, C, H, W] splits. The
classes differ in how they hold images, which is all this module deals with:

- CIFAR keeps numpy HWC images and a list of labels;
- SVHN and STL-10 keep numpy CHW images, and take ``split='train'/'test'`` instead of ``train=``;
- KMNIST and EMNIST keep [N, H, W] tensors; EMNIST's images are stored transposed (NIST's
  column-major order) and its letter labels run 1..26.

``--data-dir`` (``ZOO_DATA_DIR``) is the ``root`` torchvision is given, so a folder that
torchvision already downloaded into serves as it is.

Registered when zoo.data is imported (zoo/data/__init__.py).
"""

from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from zoo.data.catalog import DatasetInfo, DatasetUnavailable, _split_train, register_dataset
from zoo.splits import Dataset, Split

# STL-10's class_names.txt is in its archive, but torchvision sets .classes only when the file is there.
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# SVHN's .mat files label the digit 0 as 10; torchvision maps it to 0, so labels are the digits.
SVHN_CLASSES = [str(d) for d in range(10)]
EMNIST_LETTERS = list(string.ascii_lowercase)


def _torchvision_dataset(cls, name: str, root: Path, download: bool, hint: str):
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as exc:  # torchvision raises RuntimeError when not found, URLError when offline
        raise DatasetUnavailable(
            f"dataset {name!r} is not under {root} and could not be downloaded ({_first_line(exc)}). "
            f"{hint} Offline alternatives: mnist-5k, fashion-mnist."
        ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _from_torchvision(name: str, classes: list[str], pair, val_fraction: float, seed: int) -> Dataset:
    train_ds, test_ds = pair
    as_split = lambda ds: Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())  # noqa: E731
    return _split_train(name, classes, as_split(train_ds), as_split(test_ds), val_fraction, seed,
                        str(Path(train_ds.raw_folder).resolve()))


def _catalog_entry(name: str, what: str, info: DatasetInfo) -> Callable:
    """register_dataset with the static facts `zoo datasets` shows."""
    return register_dataset(name, f"{what} through torchvision: downloads when online, or reads --data-dir", info)


def _by_split_name(cls: type) -> Callable[..., Any]:
    """Open a class that takes ``split='train'/'test'`` (SVHN, STL10) as _torchvision_dataset opens ``train=``."""

    def open_split(root: str, train: bool, download: bool):
        return cls(root, split="train" if train else "test", download=download)

    return open_split


def _split(images: np.ndarray | torch.Tensor, labels: Any) -> Split:
    images = torch.as_tensor(images, dtype=torch.uint8)
    return Split(images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _finish(name: str, classes: list[str], train: Split, test: Split, val_fraction: float, seed: int,
            source: Path) -> Dataset:
    return _split_train(name, classes, train, test, val_fraction, seed, str(source.resolve()))


def _folder_hint(folder: str, files: list[str], origin: str) -> str:
    return f"Point --data-dir (or ZOO_DATA_DIR) at a folder holding {folder} ({', '.join(files)}), {origin}, or go online."


def _cifar(cls: type, name: str, data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    hint = _folder_hint(f"{cls.base_folder}/", files, f"as unpacked from {cls.url}")
    train_ds, test_ds = _torchvision_dataset(cls, name, data_dir, download, hint)
    # CIFAR holds images as numpy [N, H, W, C]; the zoo's splits are [N, C, H, W].
    as_split = lambda ds: _split(ds.data.transpose(0, 3, 1, 2), ds.targets)  # noqa: E731
    return _finish(name, list(train_ds.classes), as_split(train_ds), as_split(test_ds), val_fraction, seed,
                   data_dir / cls.base_folder)


@_catalog_entry("cifar10", "CIFAR-10 objects and animals", DatasetInfo(50_000, 10_000, (3, 32, 32), 10))
def _load_cifar10(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "cifar10", data_dir, download, val_fraction, seed)


@_catalog_entry("cifar100", "CIFAR-100 (100 fine classes)", DatasetInfo(50_000, 10_000, (3, 32, 32), 100))
def _load_cifar100(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "cifar100", data_dir, download, val_fraction, seed)


@_catalog_entry("svhn", "SVHN house-number digits ('extra' not used)", DatasetInfo(73_257, 26_032, (3, 32, 32), 10))
def _load_svhn(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import SVHN

    files = [SVHN.split_list[s][1] for s in ("train", "test")]
    hint = (f"Point --data-dir (or ZOO_DATA_DIR) at the folder holding {' and '.join(files)} "
            f"(from {SVHN.split_list['train'][0].rsplit('/', 1)[0]}/), or go online.")
    train_ds, test_ds = _torchvision_dataset(_by_split_name(SVHN), "svhn", data_dir, download, hint)
    as_split = lambda ds: _split(ds.data, ds.labels)  # noqa: E731  (already [N, C, H, W], digit 0 labelled 0)
    return _finish("svhn", SVHN_CLASSES, as_split(train_ds), as_split(test_ds), val_fraction, seed, data_dir)


@_catalog_entry("kmnist", "Kuzushiji-MNIST (10 hiragana)", DatasetInfo(60_000, 10_000, (1, 28, 28), 10))
def _load_kmnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import KMNIST

    files = [f.removesuffix(".gz") for f, _ in KMNIST.resources]
    hint = _folder_hint("KMNIST/raw/", files, f"gunzipped from {KMNIST.mirrors[0]}")
    train_ds, test_ds = _torchvision_dataset(KMNIST, "kmnist", data_dir, download, hint)
    as_split = lambda ds: _split(ds.data.unsqueeze(1), ds.targets)  # noqa: E731
    return _finish("kmnist", list(KMNIST.classes), as_split(train_ds), as_split(test_ds), val_fraction, seed,
                   Path(train_ds.raw_folder))


@_catalog_entry("emnist-letters", "EMNIST letters a..z (upper and lower case merged)",
                DatasetInfo(124_800, 20_800, (1, 28, 28), 26))
def _load_emnist_letters(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import EMNIST

    files = [f"emnist-letters-{s}-{kind}-ubyte" for s in ("train", "test") for kind in ("images-idx3", "labels-idx1")]
    hint = _folder_hint("EMNIST/raw/", files, f"gunzipped from the gzip/ folder of {EMNIST.url}")
    opener = functools.partial(EMNIST, split="letters")
    train_ds, test_ds = _torchvision_dataset(opener, "emnist-letters", data_dir, download, hint)
    # NIST stores each image transposed (torchvision leaves it so); its letter labels are 1..26
    # (0 is an unused 'N/A' class), so 'a' becomes 0.
    as_split = lambda ds: _split(ds.data.transpose(1, 2).unsqueeze(1), ds.targets - 1)  # noqa: E731
    return _finish("emnist-letters", EMNIST_LETTERS, as_split(train_ds), as_split(test_ds), val_fraction, seed,
                   Path(train_ds.raw_folder))


@_catalog_entry("stl10", "STL-10 labelled images ('unlabeled' not used)", DatasetInfo(5_000, 8_000, (3, 96, 96), 10))
def _load_stl10(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import STL10

    # torchvision checks all five binaries, unlabeled_X.bin (2.8 GB, unused here) included.
    files = [f for f, _ in STL10.train_list + STL10.test_list]
    hint = _folder_hint(f"{STL10.base_folder}/", files, f"as unpacked from {STL10.url}")
    train_ds, test_ds = _torchvision_dataset(_by_split_name(STL10), "stl10", data_dir, download, hint)
    classes = list(getattr(train_ds, "classes", STL10_CLASSES))
    as_split = lambda ds: _split(ds.data, ds.labels)  # noqa: E731  (already [N, C, H, W], labels 0-based)
    return _finish("stl10", classes, as_split(train_ds), as_split(test_ds), val_fraction, seed,
                   data_dir / STL10.base_folder)
