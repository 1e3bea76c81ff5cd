"""The torchvision catalog (zoo/data/torchvision_datasets.py), offline: each test writes a small copy of a
dataset in that dataset's own on-disk format and loads it through zoo.data.load_dataset, so
torchvision's own class parses the files, exactly as it parses a downloaded copy.

CIFAR, SVHN and STL-10 files are checked by torchvision against the MD5 of the published files,
which a small copy cannot match. The tests do not switch the check off: they give the class the
MD5 of the files they wrote (``pin_checksums``), so torchvision still reads and verifies every
file; test_a_copy_that_fails_the_checksum_is_refused shows the check is live.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zoo.cli.main import cli
from zoo.data import DatasetUnavailable, load_dataset
from zoo.data import dataset_info

PER_CLASS_TRAIN, PER_CLASS_TEST = 5, 2
VAL_FRACTION = 0.2  # one validation image per class out of five


class Written:
    """A small dataset as written to disk: upright uint8 [N, C, H, W] images and 0-based labels."""

    def __init__(self, classes: list[str], shape: tuple[int, int, int], seed: int = 0):
        rng = np.random.default_rng(seed)
        k = len(classes)
        self.classes = classes
        self.train_labels = np.repeat(np.arange(k), PER_CLASS_TRAIN)
        self.test_labels = np.tile(np.arange(k), PER_CLASS_TEST)
        self.train = rng.integers(0, 256, (len(self.train_labels), *shape), dtype=np.uint8)
        self.test = rng.integers(0, 256, (len(self.test_labels), *shape), dtype=np.uint8)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def pin_checksums(monkeypatch: pytest.MonkeyPatch, cls: type, attr: str, folder: Path) -> None:
    """Give ``cls.attr`` (torchvision's [[filename, md5], ...]) the MD5 of the files written in ``folder``."""
    monkeypatch.setattr(cls, attr, [[name, md5(folder / name)] for name, _ in getattr(cls, attr)])


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic 0x08 (uint8) and the number of dimensions, big-endian sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def assert_loaded_as_written(ds, name: str, written: Written) -> None:
    """Shapes, dtypes, split sizes, class names, labels, and every image's pixels (orientation included)."""
    k = len(written.classes)
    assert ds.name == name and ds.classes == written.classes
    assert ds.image_shape == written.train.shape[1:]
    # What `zoo datasets` announces without loading agrees with what loading gives.
    assert (dataset_info(name).image_shape, dataset_info(name).classes) == (ds.image_shape, k)
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    # Stratified: each class gives (1 - VAL_FRACTION) of its training images to train, the rest to val.
    assert torch.bincount(ds.train.labels, minlength=k).tolist() == [PER_CLASS_TRAIN - 1] * k
    assert torch.bincount(ds.val.labels, minlength=k).tolist() == [1] * k
    # The test split is the dataset's own, in its own order.
    assert torch.equal(ds.test.images, torch.from_numpy(written.test))
    assert ds.test.labels.tolist() == written.test_labels.tolist()
    # Train + val hold exactly the written training images, each with its own label.
    loaded = sorted((img.numpy().tobytes(), int(lbl)) for split in (ds.train, ds.val)
                    for img, lbl in zip(split.images, split.labels))
    assert loaded == sorted((img.tobytes(), int(lbl)) for img, lbl in zip(written.train, written.train_labels))
    assert Path(ds.source).exists()


# --- CIFAR-10 / CIFAR-100: pickled dicts, rows of 3072 bytes (R plane, G plane, B plane) -------------

def write_cifar(root: Path, name: str, written: Written, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if cls is CIFAR10 else "fine_labels"
    train_files = [f for f, _ in cls.train_list]
    chunks = np.array_split(np.arange(len(written.train)), len(train_files))  # data_batch_1..5 for CIFAR-10
    batches = [(f, written.train[idx], written.train_labels[idx]) for f, idx in zip(train_files, chunks)]
    batches.append((cls.test_list[0][0], written.test, written.test_labels))
    for filename, images, labels in batches:
        entry = {"data": images.reshape(len(images), -1), label_key: labels.tolist()}
        (folder / filename).write_bytes(pickle.dumps(entry))
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: written.classes}))
    for attr in ("train_list", "test_list"):
        pin_checksums(monkeypatch, cls, attr, folder)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize("name, classes", [
    ("cifar10", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
    ("cifar100", [f"class{i:02d}" for i in range(100)]),  # the names come from the meta file
])
def test_cifar_loads_from_its_pickled_batches(tmp_path, monkeypatch, name, classes):
    written = Written(classes, (3, 32, 32))
    write_cifar(tmp_path, name, written, monkeypatch)
    ds = load_dataset(name, data_dir=tmp_path, download=False, val_fraction=VAL_FRACTION)
    assert_loaded_as_written(ds, name, written)


def test_a_copy_that_fails_the_checksum_is_refused(tmp_path, monkeypatch):
    written = Written([str(i) for i in range(10)], (3, 32, 32))
    with monkeypatch.context() as patch:
        write_cifar(tmp_path, "cifar10", written, patch)
    # The published checksums are back: torchvision refuses the small copy, and the zoo says where it looked.
    with pytest.raises(DatasetUnavailable, match=r"corrupted.*cifar-10-batches-py/ \(data_batch_1"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# --- SVHN: MATLAB files, X is [H, W, C, N], y is [N, 1] with the digit 0 labelled 10 -------------------

def test_svhn_loads_from_its_mat_files_with_digit_zero_labelled_0(tmp_path, monkeypatch):
    import scipy.io
    from torchvision.datasets import SVHN

    written = Written([str(d) for d in range(10)], (3, 32, 32))
    split_list = dict(SVHN.split_list)
    for split, images, labels in (("train", written.train, written.train_labels),
                                  ("test", written.test, written.test_labels)):
        url, filename, _ = SVHN.split_list[split]
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(tmp_path / filename, {"X": images.transpose(2, 3, 1, 0), "y": y})
        split_list[split] = [url, filename, md5(tmp_path / filename)]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    ds = load_dataset("svhn", data_dir=tmp_path, download=False, val_fraction=VAL_FRACTION)
    assert_loaded_as_written(ds, "svhn", written)


# --- KMNIST and EMNIST letters: IDX files under CLASS/raw/ ---------------------------------------------

def test_kmnist_loads_from_its_idx_files(tmp_path):
    written = Written(["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"], (1, 28, 28))
    raw = tmp_path / "KMNIST" / "raw"
    for prefix, images, labels in (("train", written.train, written.train_labels),
                                   ("t10k", written.test, written.test_labels)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = load_dataset("kmnist", data_dir=tmp_path, download=False, val_fraction=VAL_FRACTION)
    assert_loaded_as_written(ds, "kmnist", written)


def test_emnist_letters_are_upright_and_labelled_a_to_z(tmp_path):
    written = Written(list("abcdefghijklmnopqrstuvwxyz"), (1, 28, 28))
    written.test[0, 0] = 0
    written.test[0, 0, :3, :] = 255  # a bar along the top of the first test image
    raw = tmp_path / "EMNIST" / "raw"
    for split, images, labels in (("train", written.train, written.train_labels),
                                  ("test", written.test, written.test_labels)):
        # NIST stores each image transposed, and labels letters 1..26.
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte", images[:, 0].transpose(0, 2, 1))
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte", labels + 1)
    ds = load_dataset("emnist-letters", data_dir=tmp_path, download=False, val_fraction=VAL_FRACTION)
    assert_loaded_as_written(ds, "emnist-letters", written)
    assert ds.test.images[0, 0, :3, :].eq(255).all() and ds.test.images[0, 0, 3:, :].eq(0).all()
    assert ds.classes[int(ds.test.labels[0])] == "a"


# --- STL-10: raw binaries, each image column-major [C, W, H], labels 1..10 ----------------------------

def test_stl10_loads_its_labelled_binaries_upright(tmp_path, monkeypatch):
    from torchvision.datasets import STL10

    written = Written(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
                      (3, 96, 96))
    folder = tmp_path / STL10.base_folder
    folder.mkdir()
    for split, images, labels in (("train", written.train, written.train_labels),
                                  ("test", written.test, written.test_labels)):
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    # torchvision requires the unlabelled images to be present; the zoo does not use them.
    (folder / "unlabeled_X.bin").write_bytes(np.full((2, 3, 96, 96), 7, np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(written.classes) + "\n")
    for attr in ("train_list", "test_list"):
        pin_checksums(monkeypatch, STL10, attr, folder)
    ds = load_dataset("stl10", data_dir=tmp_path, download=False, val_fraction=VAL_FRACTION)
    assert_loaded_as_written(ds, "stl10", written)


# --- Offline and missing --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, looked_for, source", [
    ("cifar10", "cifar-10-batches-py/ (data_batch_1, ", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python/ (train, test, meta)", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    ("svhn", "train_32x32.mat and test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/"),
    ("kmnist", "KMNIST/raw/ (train-images-idx3-ubyte, ", "http://codh.rois.ac.jp/kmnist/"),
    ("emnist-letters", "EMNIST/raw/ (emnist-letters-train-images-idx3-ubyte, ", "EMNIST/gzip.zip"),
    ("stl10", "stl10_binary/ (train_X.bin, ", "stl10_binary.tar.gz"),
])
def test_a_missing_dataset_offline_says_which_files_it_looked_for_and_where_to_get_them(
        tmp_path, monkeypatch, name, looked_for, source):
    monkeypatch.setenv("ZOO_OFFLINE", "1")  # download=True is overridden: nothing is fetched
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(name, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"{name!r}" in message and str(tmp_path / "empty") in message
    assert looked_for in message and source in message
    assert "--data-dir" in message and "mnist-5k" in message  # how to point at a copy, and what works offline


# --- zoo datasets -------------------------------------------------------------------------------------------

NEW = {
    "cifar10": (50_000, 10_000, [3, 32, 32], 10),
    "cifar100": (50_000, 10_000, [3, 32, 32], 100),
    "svhn": (73_257, 26_032, [3, 32, 32], 10),
    "kmnist": (60_000, 10_000, [1, 28, 28], 10),
    "emnist-letters": (124_800, 20_800, [1, 28, 28], 26),
    "stl10": (5_000, 8_000, [3, 96, 96], 10),
    "mnist-5k": (4_000, 1_000, [1, 28, 28], 10),
    "fashion-mnist": (60_000, 10_000, [1, 28, 28], 10),
}


def zoo_json(*args: str):
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "datasets", "--format", "json", *args],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_zoo_datasets_lists_sizes_shapes_and_classes_and_keeps_its_json():
    plain = zoo_json()
    # The original shape, for scripts: name -> description.
    assert set(NEW) <= set(plain) and isinstance(plain["cifar10"], str) and "torchvision" in plain["cifar10"]
    details = zoo_json("--details")
    assert set(details) == set(plain)
    for name, (train, test, shape, classes) in NEW.items():
        row = details[name]
        assert row["description"] == plain[name]
        assert (row["train_images"], row["test_images"], row["image_shape"], row["classes"]) == (train, test, shape,
                                                                                                 classes)
    text = CliRunner().invoke(cli, ["datasets"]).stdout
    assert "name" in text.splitlines()[0] and "classes" in text.splitlines()[0]
    cifar = next(line for line in text.splitlines() if line.startswith("cifar10 "))
    assert cifar.split()[:5] == ["cifar10", "50,000", "10,000", "3x32x32", "10"]

