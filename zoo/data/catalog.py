"""The catalog's registry (names -> loaders, descriptions, static facts) and :func:`load_dataset`; a name that
is a folder goes to zoo/folder_dataset.py."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zoo.errors import UsageError
from zoo.machine import offline
from zoo.splits import Dataset


class DatasetUnavailable(RuntimeError):
    """The data is not on this machine and cannot be downloaded; the message says where we looked."""


def default_data_dir() -> Path:
    return Path(os.environ.get("ZOO_DATA_DIR", Path.home() / ".cache" / "zoo" / "data"))


# The published sizes of a dataset's own splits, for `zoo datasets` without loading (or downloading) it.
@dataclass(frozen=True)
class DatasetInfo:
    train_images: int  # the training split, before the validation split is taken from it
    test_images: int
    image_shape: tuple[int, int, int]  # (channels, height, width), as Dataset.image_shape
    classes: int


Loader = Callable[[Path, bool, float, int], Dataset]
_DATASETS: dict[str, tuple[Loader, str, DatasetInfo]] = {}


def register_dataset(name: str, description: str, info: DatasetInfo) -> Callable[[Loader], Loader]:
    def wrapper(loader: Loader) -> Loader:
        _DATASETS[name] = (loader, description, info)
        return loader
    return wrapper


def list_datasets() -> dict[str, str]:
    return {name: desc for name, (_, desc, _) in sorted(_DATASETS.items())}


def dataset_info(name: str) -> DatasetInfo | None:
    return _DATASETS[name][2] if name in _DATASETS else None


def load_dataset(name: str, *, data_dir: str | Path | None = None, download: bool = True, val_fraction: float = 0.1,
                 seed: int = 0, test_fraction: float | None = None, image_size: tuple[int, int] | None = None,
                 default_size: tuple[int, int] = (28, 28), progress: bool = True, crop_mode: str = "squash") -> Dataset:
    """Load ``name`` (a catalog name, or a folder of class folders) as uint8 splits, deterministic for ``seed``.
    ``image_size`` and ``crop_mode`` apply to folders only: a catalog dataset has the one size it comes in."""
    download = download and not offline()
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"the val fraction must be between 0 and 1 (exclusive), got {val_fraction:g}")
    if name not in _DATASETS:
        from zoo.folder_dataset import load_image_folder, looks_like_folder
        if looks_like_folder(name):
            return load_image_folder(name, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                     image_size=image_size, default_size=default_size, progress=progress,
                                     crop_mode=crop_mode)
        raise UsageError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(_DATASETS))}, "
                         "or the path of a folder of class folders of images")
    loader, _, _ = _DATASETS[name]
    return loader(Path(data_dir) if data_dir else default_data_dir(), download, val_fraction, seed)
