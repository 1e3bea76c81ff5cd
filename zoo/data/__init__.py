"""The dataset catalog (this package's API): every dataset becomes uint8 tensors in memory, split into train/val/test.

Keeping uint8 images in memory (and on the device) and normalizing per batch feeds a
batch far faster than a per-sample PIL transform in a DataLoader (benchmarks/RESULTS.md, "Input
pipeline"; on a 2-core CPU the MNIST CNN's own compute still dominates an epoch), uses a quarter of the
memory of float32, and lets one decoded dataset serve any number of normalizations.
"""

from zoo.data.catalog import (
    DatasetInfo, DatasetUnavailable, dataset_info, default_data_dir, list_datasets, load_dataset, register_dataset,
)
from zoo.splits import Dataset, Split, stratified_split

# Importing the loaders registers them (as zoo.models does for the architectures): anything that
# imports zoo.data, or a module inside it, finds the whole catalog.
from zoo.data import mnist, torchvision_datasets  # noqa: E402,F401

__all__ = [
    "Dataset", "DatasetInfo", "DatasetUnavailable", "Split", "dataset_info", "default_data_dir", "list_datasets",
    "load_dataset", "register_dataset", "stratified_split",
]
