"""Class-folder image collections (ImageNet val, any ImageFolder) decoded once into uint8 crops.

Re-evaluating a network under many normalizations only changes ``(x - mean) / std``: the
images are decoded, resized and center-cropped once, kept as uint8 (in memory, or in a
numpy memmap on disk when they do not fit), and normalized on the device per batch.

How folder names map to the model's classes, in this order:

1. every folder is a WordNet synset id (``n01440764``): ImageNet's layout; the sorted
   folders map by index to the model's classes, so there must be as many as classes;
2. every folder names one of the model's classes (case, spaces and punctuation ignored:
   ``T-shirt_top`` matches ``T-shirt/top``): by name, any subset of the classes;
3. as many folders as classes: sorted folders map by index;
4. otherwise: a ValueError that lists both.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class LabelledFiles:
    root: Path
    files: list[Path]
    labels: torch.Tensor  # int64 [N], indices into the model's classes
    class_mapping: str  # which rule of the module docstring applied

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: torch.Tensor) -> "LabelledFiles":
        return LabelledFiles(self.root, [self.files[i] for i in indices.tolist()], self.labels[indices], self.class_mapping)


def image_folder_root(path: str | Path) -> Path:
    """``path`` itself, or ``path/val`` for torchvision's ``ImageNet`` layout (``meta.bin`` beside ``val/``)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root} (expected one sub-folder of images per class)")
    if (root / "meta.bin").is_file() and (root / "val").is_dir():
        return root / "val"
    return root


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def map_folders(folders: list[str], class_names: list[str]) -> tuple[dict[str, int], str]:
    """Folder name -> class index, and the rule used (see the module docstring)."""
    folders = sorted(folders)
    if folders and all(SYNSET.match(f) for f in folders):
        if len(folders) != len(class_names):
            raise ValueError(
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
    raise ValueError(
        f"cannot map the {len(folders)} folders of the data to the model's {len(class_names)} classes: folders such as "
        f"{', '.join(unknown[:5])} name no class (classes: {', '.join(class_names[:10])}"
        f"{', ...' if len(class_names) > 10 else ''}); name the folders after the classes, or give one folder per class"
    )


def list_labelled_files(path: str | Path, class_names: list[str] | None) -> tuple[LabelledFiles, list[str]]:
    """Image files under ``path``'s class folders with their class index; ``class_names`` None: the sorted folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = image_folder_root(path)
    try:
        folders, folder_index = find_classes(str(root))
    except FileNotFoundError as exc:
        raise ValueError(f"{root} holds no class folders; expected one sub-folder of images per class") from exc
    names = class_names if class_names is not None else folders
    mapping, rule = map_folders(folders, names)
    samples = make_dataset(str(root), folder_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {root}")
    labels = torch.tensor([mapping[folders[i]] for _, i in samples], dtype=torch.int64)
    return LabelledFiles(root, [Path(p) for p, _ in samples], labels, rule), list(names)


class _CenterCrops(torch.utils.data.Dataset):
    """The weights' evaluation preprocessing minus its normalization: RGB, resize, center crop, uint8 CHW."""

    def __init__(self, files: list[Path], resize: int, crop: int):
        self.files, self.resize, self.crop = files, resize, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as F

        with Image.open(self.files[i]) as img:
            img = F.resize(img.convert("RGB"), [self.resize], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        return F.pil_to_tensor(F.center_crop(img, [self.crop]))


def decode_crops(
    files: list[Path],
    *,
    resize: int,
    crop: int,
    workers: int = 0,
    memory_limit_bytes: int = 4 << 30,
    spill_dir: str | Path | None = None,
    desc: str = "decoding",
) -> torch.Tensor:
    """uint8 ``[N, 3, crop, crop]``; above the limit, backed by an (unlinked) memmap file in ``spill_dir`` (default: the temp folder)."""
    shape = (len(files), 3, crop, crop)
    if int(np.prod(shape)) <= memory_limit_bytes:
        out = np.empty(shape, dtype=np.uint8)
    else:
        folder = Path(spill_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f"zoo-crops-{len(files)}x{crop}-", suffix=".npy", dir=folder)
        os.close(handle)
        path = Path(name)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        path.unlink()  # the mapping keeps the data until the crops are freed; nothing is left behind
    loader = torch.utils.data.DataLoader(_CenterCrops(files, resize, crop), batch_size=64, num_workers=workers)
    start = 0
    with tqdm(total=len(files), unit="img", desc=desc, leave=False) as bar:
        for batch in loader:
            out[start : start + len(batch)] = batch.numpy()
            start += len(batch)
            bar.update(len(batch))
    return torch.from_numpy(out)
