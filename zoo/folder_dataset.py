"""A folder of the user's images as a dataset: class folders in (torchvision's ``ImageFolder`` and timm's layouts,
``PATH/train/CLASS/*`` with optional ``val/`` and ``test/``, or ``PATH/CLASS/*``), uint8 splits out, decoded once
(zoo/imaging.py) and cached under ``$ZOO_CACHE_DIR/datasets/`` (docs/datasets.md).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from bisect import bisect_left
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from zoo.errors import UsageError
from zoo.splits import Dataset, Split, stratified_split
from zoo.imaging import IMAGE_SUFFIXES, SUPPORTED, DecodeSpec, Header, decode_batch_with_headers, probe_batch
from zoo.machine import cache_dir as zoo_cache_dir, usable_cores
from zoo.pool import in_order, start_pool

CACHE_VERSION = 1  # bump when the decoded bytes would differ for the same files and options
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes of decoded images read into memory; above, the cache is memory-mapped
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CHUNK = 256  # files per task sent to a decoding process
PARALLEL_FROM = 2048  # fewer files decode faster in this process than a pool starts
SHOWN_SKIPPED = 5  # skipped files named in the warning
GUESS_FROM = 64  # files whose headers give the shape of the first decoding pass
CROP_MODES = ("squash", "center")  # stretch to the size; or keep the aspect: shorter side resized, center cropped


def looks_like_folder(name: str) -> bool:
    """Whether a ``--dataset`` value names a folder rather than a catalog entry."""
    return os.sep in name or name.startswith((".", "~")) or Path(name).is_dir()


def parse_image_size(value: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """``32`` or ``"32"`` -> (32, 32); ``"48x64"`` -> (48, 64) (height x width); None stays None."""
    if value is None or value == "":
        return None
    try:
        parts = [int(v) for v in (str(value).lower().split("x") if isinstance(value, (str, int)) else value)]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f"image size {value!r} is not SIDE or HEIGHTxWIDTH in pixels (e.g. 32 or 48x64)")
    return parts[0], parts[1]


class ListedFile(NamedTuple):
    path: str  # its size and modification time key the cache
    size: int
    mtime_ns: int


@dataclass
class _Listing:  # the folder's images in split order, before decoding
    root: Path
    classes: list[str]
    files: list[ListedFile]
    labels: list[int]
    bounds: dict[str, tuple[int, int]]  # split -> [start, stop) in files
    not_images: list[str]  # files in class folders whose suffix is no image's


def load_image_folder(path: str | Path, *, val_fraction: float = 0.1, test_fraction: float | None = None, seed: int = 0,
                      image_size: tuple[int, int] | None = None, default_size: tuple[int, int] = (28, 28),
                      cache_dir: str | Path | None = None, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
                      workers: int | None = None, progress: bool = True, crop_mode: str = "squash") -> Dataset:
    """The folder at ``path`` as a :class:`zoo.data.Dataset` (see the module docstring), each image stretched to the
    size (``crop_mode`` squash) or resized and center-cropped as :func:`center_resize` says (center)."""
    if crop_mode not in CROP_MODES:
        raise UsageError(f"unknown crop mode {crop_mode!r}; valid: {', '.join(CROP_MODES)}")
    test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    listing = list_folder(Path(path).expanduser(), val_fraction, test_fraction, seed)
    cache = Path(cache_dir) if cache_dir else zoo_cache_dir("datasets")
    # What the folder's earlier caches share with this one: the same folder, split the same way.
    source = {"root": str(listing.root), "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    size = image_size or _size_found(cache, listing, default_size)
    folder = cache_folder(cache, listing, size, crop_mode) if size else None
    if folder is None or not (folder / "meta.json").is_file():
        folder = _decode_into(cache, listing, size, default_size, workers, progress, source, crop_mode)
    return _from_cache(folder, listing.root, memory_limit_bytes)


def list_folder(root: Path, val_fraction: float, test_fraction: float, seed: int) -> _Listing:
    """Class folders and their files in split order, missing splits carved (stratified) from train; a UsageError
    for a folder that is no dataset."""
    if not root.is_dir():
        raise UsageError(f"no such dataset folder: {root} (a folder of class folders of images, or a catalog "
                         "name: see zoo datasets)")
    given, root = root, root.resolve()
    layout = _split_folders(root)
    per_split = {split: class_files(folder) for split, folder in layout.items()}
    classes = per_split["train"][0]
    _check_folder_of_datasets(given / layout["train"].relative_to(root), classes)
    _check_classes(root, layout, per_split, classes)
    ordered = {split: (files, labels) for split, (_, files, labels, _) in per_split.items()}
    train_files, train_labels = ordered["train"][0], torch.tensor(ordered["train"][1], dtype=torch.int64)
    carve = [s for s in ("val", "test") if s not in ordered]
    fractions = {"val": val_fraction, "test": test_fraction}
    # Only the fractions carved from train/ count: with a test/ folder, --val-fraction may take up to all of train/.
    parts = stratified_split(train_labels, [1 - sum(fractions[s] for s in carve), *(fractions[s] for s in carve)], seed,
                             names=["train", *carve])
    for split, index in zip(["train", *carve], parts):
        ordered[split] = ([train_files[i] for i in index.tolist()], train_labels[index].tolist())
    files, labels, bounds = [], [], {}
    for split in ("train", "val", "test"):
        bounds[split] = (len(files), len(files) + len(ordered[split][0]))
        files += ordered[split][0]
        labels += ordered[split][1]
    not_images = [f for _, _, _, others in per_split.values() for f in others]
    return _Listing(root, classes, files, labels, bounds, not_images)


def _split_folders(root: Path) -> dict[str, Path]:
    """{"train": ..., "val": ..., "test": ...} for the split layout (the ones present), or {"train": root}."""
    found = {split: root / name for split, names in SPLIT_FOLDERS.items()
             if (name := next((n for n in names if (root / n).is_dir()), None))}
    if "train" not in found:
        if found:
            raise UsageError(f"{root} has {', '.join(p.name + '/' for p in found.values())} but no train/ folder; "
                             "give train/ (with optional val/ and test/), each holding one folder per class")
        return {"train": root}
    return found


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_files(folder: Path) -> tuple[list[str], list[ListedFile], list[int], list[str]]:
    """Sorted class folder names, the image files under each (at any depth, in name order, hidden ones passed over)
    with their class index, and the other files found there."""
    classes = [p.name for p in _visible(folder) if p.is_dir()]
    files, labels, others = [], [], []
    for index, name in enumerate(classes):
        found = []
        for top, dirs, names in os.walk(folder / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(top, n) for n in names if not n.startswith(".")]
        for path in sorted(found):  # by path parts: depth first, in name order
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                others.append(str(path))
            elif path.is_file():
                stat = path.stat()
                files.append(ListedFile(str(path), stat.st_size, stat.st_mtime_ns))
                labels.append(index)
    return classes, files, labels, others


def _check_folder_of_datasets(train: Path, classes: list[str]) -> None:
    """Refuse a folder of datasets (its classes would be the dataset names); only warn when the class folders hold
    just sub-folders (cat/2019/*.jpg, which torchvision's ImageFolder takes too)."""
    if not classes or any(not p.is_dir() for name in classes for p in _visible(train / name)):
        return  # no classes: _check_classes says what a dataset folder holds
    shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
    for name in classes:
        if split := next((s for s in SPLIT_FOLDERS["train"] if (train / name / s).is_dir()), None):
            raise UsageError(f"{train} looks like a folder of datasets, not of class folders: {name}/ holds a {split}/ "
                             f"folder and no class folder ({shown}) holds an image of its own; train on one dataset, "
                             f"e.g. --dataset {train / name}")
    print(f"warning: the class folders of {train} ({shown}) hold no images directly, only folders: each class "
          f"takes every image below it. If {train} is a folder of datasets, train on one, e.g. --dataset "
          f"{train / classes[0]}", file=sys.stderr)


def _check_classes(root: Path, layout: dict[str, Path], per_split: dict, classes: list[str]) -> None:
    train = layout["train"]
    if not classes:
        raise UsageError(f"{train} holds no class folders: expected {train}/CLASS/IMAGE files, one folder per class "
                         "(or train/, val/ and test/ folders holding them)")
    if len(classes) < 2:
        raise UsageError(f"{train} holds one class folder ({classes[0]}); a classifier needs at least two")
    for split, (names, files, labels, _) in per_split.items():
        if names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise UsageError(f"{layout[split]} has other classes than {train}: "
                             + "; ".join(filter(None, [missing and f"missing {', '.join(missing[:5])}",
                                                       extra and f"extra {', '.join(extra[:5])}"]))
                             + ". Every split needs the same class folders")
        if empty := [name for name, n in zip(names, np.bincount(labels, minlength=len(names))) if n == 0]:
            raise UsageError(f"class folder {layout[split] / empty[0]} holds no images ({SUPPORTED}); "
                             "add images or remove the folder")


def center_resize(image_size: Sequence[int]) -> int:
    """Crop mode center's shorter side for an HxW target: the longer of the two, so the crop always fits in the
    image (torchvision's Resize(R) then CenterCrop((H, W)); the logged model's ``resize``)."""
    return max(image_size)


def served_resize(dataset: str, crop_mode: str, image_shape: Sequence[int]) -> int | None:
    """The logged model's ``resize`` (zoo/model_format), so that it is served decoded as it was trained: R for a
    folder center-cropped to ``image_shape`` ([C,] H, W), None (stretched) otherwise (crop modes are for folders)."""
    return center_resize(image_shape[-2:]) if crop_mode == "center" and looks_like_folder(dataset) else None


def cache_folder(cache: Path, listing: _Listing, image_size: tuple[int, int] | None, crop_mode: str = "squash") -> Path:
    """Where this listing decoded at ``image_size`` with ``crop_mode`` is cached: a digest of every file's relative
    path, size and modification time, in split order, and of the options (``None``: the record of the images' own
    size, which every crop mode reads)."""
    options = {"version": CACHE_VERSION, "image_size": image_size and list(image_size), "bounds": listing.bounds,
               "classes": listing.classes, **_center(crop_mode)}
    digest = hashlib.sha256(json.dumps(options).encode())
    prefix = len(str(listing.root)) + 1
    digest.update("".join(f"{f.path[prefix:]}\0{f.size}\0{f.mtime_ns}\n" for f in listing.files).encode())
    return cache / f"{listing.root.name}-{digest.hexdigest()[:20]}"


def _center(crop_mode: str) -> dict:
    """What a center crop adds to a cache's key and source; squash adds nothing, so its caches stay as they were."""
    return {"crop_mode": crop_mode} if crop_mode != "squash" else {}


def _size_found(cache: Path, listing: _Listing, default_size: tuple[int, int]) -> tuple[int, int] | None:
    """The size the first decode without --image-size found (the images' own, else ``default_size``), or None."""
    try:
        own = json.loads((cache_folder(cache, listing, None) / "meta.json").read_text())["own_size"]
    except (OSError, ValueError, KeyError):
        return None
    return tuple(own) if own else tuple(default_size)


def _decode_into(cache: Path, listing: _Listing, image_size: tuple[int, int] | None, default_size: tuple[int, int],
                 workers: int | None, progress: bool, source: dict, crop_mode: str) -> Path:
    """Decode every file into the cache folder of the size used, returned (written beside, then renamed)."""
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=listing.root.name + ".partial-", dir=cache))
    try:
        # One pass over the files in the usual case: decode at the shape the first files have, read every
        # file's own size and mode as it is decoded, and decode again only if they disagree.
        guess = _input_shape(probe_batch([f.path for f in listing.files[:GUESS_FROM]]), listing, image_size,
                             default_size, quiet=True)
        kept, errors, headers = _decode_all(listing, guess, work / "images.npy", workers, progress, crop_mode)
        shape = _input_shape(headers, listing, image_size, default_size)
        if shape != guess:
            kept, errors, _ = _decode_all(listing, shape, work / "images.npy", workers, progress, crop_mode)
        skipped = [(p, f"not an image file (image suffixes: {SUPPORTED})") for p in listing.not_images] + errors
        labels = [listing.labels[i] for i in kept]
        bounds = {split: (bisect_left(kept, a), bisect_left(kept, b)) for split, (a, b) in listing.bounds.items()}
        # The crop mode in the source too: a center cache does not supersede the squash one of the same folder.
        decoded = {**source, "image_size": list(shape[1:]), **_center(crop_mode)}
        meta = {"classes": listing.classes, "labels": labels, "bounds": bounds, "shape": list(shape),
                "skipped": skipped, "files": len(listing.files) + len(listing.not_images), "source": decoded}
        (work / "meta.json").write_text(json.dumps(meta))
        folder = cache_folder(cache, listing, shape[1:], crop_mode)
        try:
            work.rename(folder)
        except OSError:  # another process cached the same folder first: theirs is as good
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _drop_superseded(folder, decoded)
    if image_size is None:  # the images' own size (None: they differ), under the size-free key, for _size_found
        record = cache_folder(cache, listing, None)
        record.mkdir(exist_ok=True)
        own = _one_size(headers)
        meta = {"own_size": list(own) if own else None, "source": {**source, "image_size": None}}
        written = record / f"meta.json.{os.getpid()}"  # renamed whole: a reader never sees half a record
        written.write_text(json.dumps(meta))
        written.replace(record / "meta.json")
        _drop_superseded(record, meta["source"])
    return folder


def _drop_superseded(folder: Path, source: dict) -> None:
    """Delete the caches ``folder`` replaces (same folder and options, from before its files changed): nothing
    would read them again. A process training from a deleted memory-mapped cache keeps its pages."""
    for other in folder.parent.glob(f"{glob.escape(folder.name.rsplit('-', 1)[0])}-*"):
        if other == folder or ".partial-" in other.name:
            continue
        try:
            if json.loads((other / "meta.json").read_text()).get("source") == source:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError):  # another kind of entry, or one being written
            pass


def _input_shape(headers: Sequence[Header | None], listing: _Listing, image_size: tuple[int, int] | None,
                 default_size: tuple[int, int], quiet: bool = False) -> tuple[int, int, int]:
    """(C, H, W): grey when every readable image is grey, else RGB; the images' size when they all agree."""
    known = [h for h in headers if h is not None]
    channels = 1 if known and all(mode in GREY_MODES for _, _, mode in known) else 3
    if image_size is None:
        image_size = _one_size(known) or tuple(default_size)
        if len({(h, w) for w, h, _ in known}) > 1 and not quiet:
            print(f"note: the images of {listing.root} differ in size; resizing all to {image_size[0]}x{image_size[1]} "
                  "(the model's input size; --image-size sets another)", file=sys.stderr)
    return channels, image_size[0], image_size[1]


def _one_size(headers: Sequence[Header | None]) -> tuple[int, int] | None:
    """(H, W) of the readable images when they all have that size; None when they differ (or none is readable)."""
    sizes = {(h, w) for w, h, _ in filter(None, headers)}
    return next(iter(sizes)) if len(sizes) == 1 else None


def decode_files(out: np.ndarray, paths: Sequence[str], spec: DecodeSpec, workers: int | None, desc: str,
                progress: bool = True) -> tuple[list[int], list[tuple[str, str]], list[Header | None]]:
    """Decode ``paths`` into ``out``, the unreadable leaving no gap: the indices kept, (path, reason) for the others,
    every file's (width, height, mode). By ``workers`` processes (default: up to 8 from PARALLEL_FROM files on)."""
    if workers is None:
        workers = min(usable_cores(), 8) if len(paths) >= PARALLEL_FROM else 0
    chunks = [list(paths[i : i + CHUNK]) for i in range(0, len(paths), CHUNK)]
    kept, errors, headers = [], [], []
    pool = start_pool(workers) if workers > 1 else None
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for chunk, (pixels, reasons, found) in in_order(chunks, partial(decode_batch_with_headers, spec=spec), pool,
                                                        depth=2 * workers):
            good = [i for i, reason in enumerate(reasons) if reason is None]
            out[len(kept) : len(kept) + len(good)] = pixels if len(good) == len(chunk) else pixels[good]
            kept += [len(headers) + i for i in good]
            errors += [(path, reason) for path, reason in zip(chunk, reasons) if reason is not None]
            headers += found
            bar.update(len(chunk))
    return kept, errors, headers


def _decode_all(listing: _Listing, shape: tuple[int, int, int], target: Path, workers: int | None, progress: bool,
                crop_mode: str) -> tuple[list[int], list[tuple[str, str]], list[Header | None]]:
    """:func:`decode_files` a .npy file, in split order."""
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(listing.files), *shape))
    spec = DecodeSpec(shape, max_pixels_hint="remove the file or resize it",
                      resize=center_resize(shape[1:]) if crop_mode == "center" else None)
    kept, errors, headers = decode_files(out, [f.path for f in listing.files], spec, workers,
                                        f"decoding {listing.root.name}", progress)
    out.flush()
    del out
    if errors:  # drop the unused tail rows
        np.save(target.with_suffix(".tmp.npy"), np.load(target, mmap_mode="r")[: len(kept)])
        target.with_suffix(".tmp.npy").replace(target)
    return kept, errors, headers


def warn_skipped(root: Path, skipped: Sequence[tuple[str, str]], files: int) -> None:
    """One warning naming the first few files skipped under ``root``, and why, with the count."""
    if skipped:
        shown = "; ".join(f"{Path(p).relative_to(root) if Path(p).is_relative_to(root) else p} ({reason})"
                          for p, reason in skipped[:SHOWN_SKIPPED])
        print(f"warning: skipped {len(skipped)} of {files:,} files in {root} that are not readable images: "
              f"{shown}{', ...' if len(skipped) > SHOWN_SKIPPED else ''}", file=sys.stderr)


def _from_cache(folder: Path, root: Path, memory_limit_bytes: int) -> Dataset:
    meta = json.loads((folder / "meta.json").read_text())
    path = folder / "images.npy"
    mapped = path.stat().st_size > memory_limit_bytes
    # Mapped copy-on-write: writable for torch, read page by page, the file untouched.
    images = torch.from_numpy(np.load(path, mmap_mode="c" if mapped else None))
    labels = torch.tensor(meta["labels"], dtype=torch.int64)
    if len(labels) != len(images):
        raise ValueError(f"the dataset cache {folder} is damaged (labels and images differ); delete it and run again")
    splits = {name: Split(images[a:b], labels[a:b], mapped) for name, (a, b) in meta["bounds"].items()}
    warn_skipped(root, meta["skipped"], meta["files"])
    counts = np.bincount(splits["train"].labels.numpy(), minlength=len(meta["classes"]))
    if unreadable := [c for c, n in zip(meta["classes"], counts) if n == 0]:
        raise UsageError(f"class {unreadable[0]} of {root} has no readable training image (its files were skipped, "
                         "see above); add images or remove the folder")
    if empty := next((name for name, split in splits.items() if len(split) == 0), None):
        raise UsageError(f"the {empty} split of {root} holds no readable image; add images or change the fractions")
    return Dataset(root.name, meta["classes"], splits["train"], splits["val"], splits["test"], str(root),
                   skipped=len(meta["skipped"]))
