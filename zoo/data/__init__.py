"""The dataset catalog: every dataset becomes uint8 tensors split into train/val/test, normalized per batch on
the device: a quarter of float32's memory, any normalization (benchmarks/RESULTS.md, "Input pipeline")."""

from zoo.data.catalog import (
    DatasetInfo, DatasetUnavailable, dataset_info, default_data_dir, list_datasets, load_dataset, register_dataset,
)
from zoo.splits import Dataset, Split, stratified_split

# Importing the loaders registers them: whatever imports zoo.data finds the whole catalog.
from zoo.data import mnist, torchvision_datasets  # noqa: E402,F401

__all__ = ["Dataset", "DatasetInfo", "DatasetUnavailable", "Split", "dataset_info", "default_data_dir", "list_datasets",
           "load_dataset", "register_dataset", "stratified_split"]
