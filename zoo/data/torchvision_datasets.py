"""The torchvision catalog: CIFAR-10/100, SVHN, KMNIST, EMNIST letters and STL-10 (the MNIST family: mnist.py).
torchvision's classes download and parse the files (``--data-dir`` is their ``root``); each entry turns what its
class holds into uint8 [N, C, H, W] splits."""

import functools
import string
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from zoo.data.catalog import DatasetInfo, DatasetUnavailable, register_dataset
from zoo.splits import Dataset, Split, stratified_split

# torchvision sets STL10's .classes only when class_names.txt is there.
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SVHN_CLASSES = [str(d) for d in range(10)]  # torchvision labels the digit 0 as 0 (the .mat files say 10)
EMNIST_LETTERS = list(string.ascii_lowercase)


def open_splits(cls: Callable, name: str, root: Path, download: bool, hint: str):
    """torchvision's train and test datasets, or DatasetUnavailable saying where the files go."""
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as exc:  # RuntimeError when not found, URLError when offline
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetUnavailable(f"dataset {name!r} is not under {root} and could not be downloaded ({reason}). "
                                 f"{hint} Offline alternatives: mnist-5k, fashion-mnist.") from exc


def to_dataset(name: str, classes: list[str], pair, as_arrays: Callable[[Any], tuple], val_fraction: float,
               seed: int, source: str | Path) -> Dataset:
    """The zoo's splits of torchvision's (train, test) ``pair`` (``as_arrays(ds)``: [N, C, H, W] images, labels)."""
    train, test = (Split(torch.as_tensor(x, dtype=torch.uint8).contiguous(),
                         torch.as_tensor(np.asarray(y), dtype=torch.int64)) for x, y in map(as_arrays, pair))
    train_idx, val_idx = stratified_split(train.labels, [1 - val_fraction, val_fraction], seed)
    return Dataset(name, list(classes), Split(train.images[train_idx], train.labels[train_idx]),
                   Split(train.images[val_idx], train.labels[val_idx]), test, str(Path(source).resolve()))


def idx_arrays(ds) -> tuple:
    """MNIST-like classes hold [N, H, W] tensors."""
    return ds.data.unsqueeze(1), ds.targets


def _chw_arrays(ds) -> tuple:
    """SVHN and STL-10 hold [N, C, H, W] numpy images and 0-based labels."""
    return ds.data, ds.labels


def _catalog_entry(name: str, what: str, info: DatasetInfo) -> Callable:
    return register_dataset(name, f"{what} through torchvision: downloads when online, or reads --data-dir", info)


def _by_split_name(cls: type) -> Callable[..., Any]:
    """Open a class that takes ``split='train'/'test'`` (SVHN, STL10) as open_splits opens ``train=``."""
    return lambda root, train, download: cls(root, split="train" if train else "test", download=download)


def _folder_hint(folder: str, files: list[str], origin: str) -> str:
    return f"Point --data-dir (or ZOO_DATA_DIR) at a folder holding {folder} ({', '.join(files)}), {origin}, or go online."


def _cifar(cls_name: str, name: str, data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    hint = _folder_hint(f"{cls.base_folder}/", files, f"as unpacked from {cls.url}")
    pair = open_splits(cls, name, data_dir, download, hint)
    hwc = lambda ds: (ds.data.transpose(0, 3, 1, 2), ds.targets)  # noqa: E731  (CIFAR holds [N, H, W, C])
    return to_dataset(name, pair[0].classes, pair, hwc, val_fraction, seed, data_dir / cls.base_folder)


for _name, _cls_name, _what, _classes in (("cifar10", "CIFAR10", "CIFAR-10 objects and animals", 10),
                                          ("cifar100", "CIFAR100", "CIFAR-100 (100 fine classes)", 100)):
    _catalog_entry(_name, _what, DatasetInfo(50_000, 10_000, (3, 32, 32), _classes))(
        functools.partial(_cifar, _cls_name, _name))


@_catalog_entry("svhn", "SVHN house-number digits ('extra' not used)", DatasetInfo(73_257, 26_032, (3, 32, 32), 10))
def _load_svhn(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import SVHN
    files = [SVHN.split_list[s][1] for s in ("train", "test")]
    hint = (f"Point --data-dir (or ZOO_DATA_DIR) at the folder holding {' and '.join(files)} "
            f"(from {SVHN.split_list['train'][0].rsplit('/', 1)[0]}/), or go online.")
    pair = open_splits(_by_split_name(SVHN), "svhn", data_dir, download, hint)
    return to_dataset("svhn", SVHN_CLASSES, pair, _chw_arrays, val_fraction, seed, data_dir)


@_catalog_entry("kmnist", "Kuzushiji-MNIST (10 hiragana)", DatasetInfo(60_000, 10_000, (1, 28, 28), 10))
def _load_kmnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import KMNIST
    files = [f.removesuffix(".gz") for f, _ in KMNIST.resources]
    hint = _folder_hint("KMNIST/raw/", files, f"gunzipped from {KMNIST.mirrors[0]}")
    pair = open_splits(KMNIST, "kmnist", data_dir, download, hint)
    return to_dataset("kmnist", KMNIST.classes, pair, idx_arrays, val_fraction, seed, pair[0].raw_folder)


@_catalog_entry("emnist-letters", "EMNIST letters a..z (upper and lower case merged)",
                DatasetInfo(124_800, 20_800, (1, 28, 28), 26))
def _load_emnist_letters(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import EMNIST
    files = [f"emnist-letters-{s}-{kind}-ubyte" for s in ("train", "test") for kind in ("images-idx3", "labels-idx1")]
    hint = _folder_hint("EMNIST/raw/", files, f"gunzipped from the gzip/ folder of {EMNIST.url}")
    pair = open_splits(functools.partial(EMNIST, split="letters"), "emnist-letters", data_dir, download, hint)
    # NIST stores each image transposed; its letter labels run 1..26 (0 is an unused 'N/A' class).
    letters = lambda ds: (ds.data.transpose(1, 2).unsqueeze(1), ds.targets - 1)  # noqa: E731
    return to_dataset("emnist-letters", EMNIST_LETTERS, pair, letters, val_fraction, seed, pair[0].raw_folder)


@_catalog_entry("stl10", "STL-10 labelled images ('unlabeled' not used)", DatasetInfo(5_000, 8_000, (3, 96, 96), 10))
def _load_stl10(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import STL10
    # torchvision checks all five binaries, unlabeled_X.bin (2.8 GB, unused here) included.
    files = [f for f, _ in STL10.train_list + STL10.test_list]
    hint = _folder_hint(f"{STL10.base_folder}/", files, f"as unpacked from {STL10.url}")
    pair = open_splits(_by_split_name(STL10), "stl10", data_dir, download, hint)
    classes = getattr(pair[0], "classes", STL10_CLASSES)
    return to_dataset("stl10", classes, pair, _chw_arrays, val_fraction, seed, data_dir / STL10.base_folder)
