"""What each catalog dataset holds (sizes, image shape, classes), known without loading it.

`zoo datasets` lists these facts; loading CIFAR-10 to count its images would take seconds and
a download. The figures are the published sizes of each dataset's own train and test splits;
``--val-fraction`` then takes the validation split out of the training images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DatasetInfo:
    train_images: int  # the training split, before the validation split is taken from it
    test_images: int
    image_shape: tuple[int, int, int]  # (channels, height, width), as Dataset.image_shape
    classes: int

    def to_dict(self) -> dict:
        return {**asdict(self), "image_shape": list(self.image_shape)}


_INFO: dict[str, DatasetInfo] = {
    # mnist-5k's fixed 20 % test split comes out of its 5,000 digits (zoo/data.py).
    "mnist-5k": DatasetInfo(4_000, 1_000, (1, 28, 28), 10),
    "mnist": DatasetInfo(60_000, 10_000, (1, 28, 28), 10),
    "fashion-mnist": DatasetInfo(60_000, 10_000, (1, 28, 28), 10),
}


def register_dataset_info(name: str, info: DatasetInfo) -> None:
    _INFO[name] = info


def dataset_info(name: str) -> DatasetInfo | None:
    """The facts about catalog dataset ``name``; None for a dataset that has none recorded."""
    return _INFO.get(name)
