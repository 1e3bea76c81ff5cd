"""Class-folder images (ImageNet val, any ImageFolder) decoded once into uint8 crops for `zoo renorm --data`:
re-evaluating under many normalizations only changes ``(x - mean) / std``, applied on the device per batch.
Folders map to the model's classes by ImageNet synset index, by class name, or by sorted index (docs/renorm.md).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoo.folder_dataset import SPLIT_FOLDERS, class_files, decode_files, warn_skipped
from zoo.imaging import SUPPORTED, DecodeSpec
from zoo.errors import UsageError

SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class LabelledFiles:
    root: Path
    files: list[Path]
    labels: torch.Tensor  # int64 [N], indices into the model's classes
    class_mapping: str  # which rule of map_folders applied

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: torch.Tensor) -> "LabelledFiles":
        return LabelledFiles(self.root, [self.files[i] for i in indices.tolist()], self.labels[indices], self.class_mapping)


def image_folder_root(path: str | Path) -> Path:
    """The class folders to evaluate on: ``path``, ``path/val`` of torchvision's ``ImageNet`` root (``meta.bin``),
    or the held-out split (validation first) of zoo train's ``train/`` layout."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"no such image folder: {root} (expected one sub-folder of images per class)")
    if (root / "meta.bin").is_file() and (root / "val").is_dir():
        return root / "val"
    held_out = [root / name for split in ("val", "test") for name in SPLIT_FOLDERS[split] if (root / name).is_dir()]
    return held_out[0] if held_out and any((root / n).is_dir() for n in SPLIT_FOLDERS["train"]) else root


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def map_folders(folders: list[str], class_names: list[str]) -> tuple[dict[str, int], str]:
    """Folder name -> class index, and the rule used: all synset ids (ImageNet's sorted index), all class names (case
    and punctuation ignored), as many folders as classes (sorted index), else a UsageError listing both."""
    folders = sorted(folders)
    if folders and all(SYNSET.match(f) for f in folders):
        if len(folders) != len(class_names):
            raise UsageError(
                f"found {len(folders)} ImageNet synset folders but the model has {len(class_names)} classes; synset "
                "folders map to classes by sorted index, so all of them must be present (use --limit for a subset)"
            )
        return {f: i for i, f in enumerate(folders)}, "imagenet-synsets"
    by_key = {_key(c): i for i, c in enumerate(class_names)}
    if folders and all(_key(f) in by_key for f in folders):
        return {f: by_key[_key(f)] for f in folders}, "class-names"
    if len(folders) == len(class_names):
        return {f: i for i, f in enumerate(folders)}, "sorted-index"
    unknown = [f for f in folders if _key(f) not in by_key]
    raise UsageError(
        f"cannot map the {len(folders)} folders of the data to the model's {len(class_names)} classes: folders such as "
        f"{', '.join(unknown[:5])} name no class (classes: {', '.join(class_names[:10])}"
        f"{', ...' if len(class_names) > 10 else ''}); name the folders after the classes, or give one folder per class"
    )


def list_labelled_files(path: str | Path, class_names: list[str] | None) -> tuple[LabelledFiles, list[str]]:
    """Image files under ``path``'s class folders (as zoo train lists them) with their class index (``class_names``
    None: the sorted folders); other files are named in one warning."""
    root = image_folder_root(path)
    folders, files, indices, others = class_files(root)
    if not folders:
        raise UsageError(f"{root} holds no class folders; expected one sub-folder of images per class")
    names = class_names if class_names is not None else folders
    mapping, rule = map_folders(folders, names)
    if not files:
        raise UsageError(f"no images ({SUPPORTED}) in the class folders of {root}")
    warn_skipped(root, [(f, f"not an image file (image suffixes: {SUPPORTED})") for f in others],
                 len(files) + len(others))
    labels = torch.tensor([mapping[folders[i]] for i in indices], dtype=torch.int64)
    return LabelledFiles(root, [Path(f.path) for f in files], labels, rule), list(names)


def decode_crops(files: list[Path], *, resize: int, crop: int, workers: int = 0, memory_limit_bytes: int = 4 << 30,
                 spill_dir: str | Path | None = None, desc: str = "decoding",
                 skipped: list[tuple[str, str]] | None = None) -> torch.Tensor:
    """uint8 ``[N, 3, crop, crop]``, above the limit in an unlinked memmap in ``spill_dir`` (default: the temp folder);
    an undecodable file is left out and, with ``skipped``, appended there as (path, reason)."""
    shape = (len(files), 3, crop, crop)
    if int(np.prod(shape)) <= memory_limit_bytes:
        out = np.empty(shape, dtype=np.uint8)
    else:
        folder = Path(spill_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        # Unlinked at once: the mapping keeps the data until the crops are freed; nothing is left behind.
        out = np.memmap(tempfile.TemporaryFile(dir=folder), dtype=np.uint8, mode="w+", shape=shape)
    # The one decoder (zoo/imaging.py): a model registered by `zoo renorm` is served as it was scored.
    spec = DecodeSpec((3, crop, crop), resize=resize, max_pixels_hint="remove the file or resize it")
    kept, errors, _ = decode_files(out, [str(f) for f in files], spec, workers, desc)
    if skipped is not None:
        skipped += errors
    return torch.from_numpy(out[: len(kept)])
