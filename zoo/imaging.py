"""The one image decoder: a file or its bytes -> the model's input, uint8 [C, H, W], or an ImageError saying why.
Shipped inside every logged model so a served model decodes as `zoo classify` does: imports only numpy and Pillow."""

import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SUPPORTED = ", ".join(sorted(IMAGE_SUFFIXES))
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own Image.MAX_IMAGE_PIXELS


class ImageError(Exception):
    """One input cannot be classified; the message says why (the caller adds which input)."""


@dataclass(frozen=True)
class DecodeSpec:
    """What a decoder needs (picklable). ``resize`` None stretches; R resizes the shorter side to R, then center-crops."""
    input_shape: tuple[int, int, int]
    invert: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_pixels_hint: str = "raise --max-pixels if the image is genuine"  # how the caller lifts the limit
    resize: int | None = None


Header = tuple[int, int, str]  # (width, height, mode) of an image file, as Pillow reads it


def decode_image(source: str | Path | bytes, spec: DecodeSpec) -> np.ndarray:
    """uint8 [C, H, W] for one file or encoded image."""
    with _quiet_pillow(spec):
        return _decode(source, spec, None)


@contextmanager
def _quiet_pillow(spec: DecodeSpec) -> Iterator[None]:
    Image.MAX_IMAGE_PIXELS = spec.max_pixels  # Pillow's own guard, behind the explicit check in _pixels
    with warnings.catch_warnings():  # palette-transparency and bomb warnings: the size is checked in _pixels
        warnings.simplefilter("ignore")
        yield


def _decode(source: str | Path | bytes, spec: DecodeSpec, header: list[Header] | None) -> np.ndarray:
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError("empty image (0 bytes)")
            source = io.BytesIO(source)
        with Image.open(source) as img:
            if header is not None:
                header.append((img.size[0], img.size[1], img.mode))
            return _pixels(img, spec)
    except ImageError:
        raise
    except UnidentifiedImageError:
        # Asked only now: a stat per file up front cost more than the message is worth on the good ones.
        if not isinstance(source, io.BytesIO) and os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ImageError("empty file (0 bytes)") from None
        raise ImageError(f"not an image Pillow can read (unknown format); supported: {SUPPORTED}") from None
    except Image.DecompressionBombError as exc:  # Pillow's guard, above twice the limit
        raise ImageError(f"refused before decoding, a possible decompression bomb ({exc}); "
                         f"the limit is {spec.max_pixels:,} pixels") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageError(f"cannot open: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        # What Pillow raises for truncated or corrupt data (e.g. "image file is truncated").
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _pixels(img, spec: DecodeSpec) -> np.ndarray:
    channels, height, width = spec.input_shape
    w, h = img.size
    if w * h > spec.max_pixels:  # Image.open read only the header: refuse before decoding anything
        raise ImageError(f"declares {w}x{h} = {w * h:,} pixels, above the limit of {spec.max_pixels:,} "
                         f"(a decompression bomb?); {spec.max_pixels_hint}")
    mode = "L" if channels == 1 else "RGB"
    size, side = (width, height), spec.resize
    if side is not None:  # the shorter side to ``side``, rounded down as torchvision's Resize([side]) does
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    img.draft(mode, size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers the target
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = _flatten(img, channels, background=255 if spec.invert else 0)
    if img.mode != mode:
        img = (img if img.mode in ("L", "RGB") else img.convert("RGB")).convert(mode)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    if size != (width, height):  # the center crop, placed as torchvision's CenterCrop places it
        left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
        img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return 255 - arr if spec.invert else arr


INK_SPREAD = 8  # grey levels: colour channels that vary less than this where alpha > 0 carry no drawing


def _flatten(img, channels: int, background: int):
    """Composite transparency onto ``background``; strokes drawn as alpha over one colour become the alpha itself."""
    rgba = np.asarray(img.convert("RGBA"))
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # an alpha channel with nothing transparent in it
        return img.convert("RGB")
    inked = rgba[..., :3][alpha > 0]
    if channels == 1 and inked.size and int(inked.max()) - int(inked.min()) < INK_SPREAD:
        return Image.fromarray(255 - alpha if background else alpha, mode="L")
    a = alpha[..., None].astype(np.uint32)
    composite = (rgba[..., :3] * a + background * (255 - a) + 127) // 255
    return Image.fromarray(composite.astype(np.uint8), mode="RGB")


def _to_8bit(img):
    """16- and 32-bit integer images (16-bit PNG, TIFF): scale to 8 bits; Pillow's convert("L") would clip at 255."""
    if not img.mode.startswith("I"):
        return img
    arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def decode_batch(paths: Sequence[str | None], spec: DecodeSpec) -> tuple[np.ndarray, list[str | None]]:
    """uint8 [N, C, H, W] and one error per file (None: decoded); a None path is skipped."""
    return decode_batch_with_headers(paths, spec)[:2]


def decode_batch_with_headers(paths: Sequence[str | None], spec: DecodeSpec
                              ) -> tuple[np.ndarray, list[str | None], list[Header | None]]:
    """:func:`decode_batch`, plus each decoded file's own (width, height, mode)."""
    out = np.zeros((len(paths), *spec.input_shape), dtype=np.uint8)
    errors: list[str | None] = []
    headers: list[Header | None] = []
    with _quiet_pillow(spec):
        for i, path in enumerate(paths):
            header: list[Header] = []
            if path is None:
                errors.append("skipped")
            else:
                try:
                    out[i] = _decode(path, spec, header)
                    errors.append(None)
                except ImageError as exc:
                    errors.append(str(exc))
            headers.append(header[0] if header and errors[-1] is None else None)
    return out, errors, headers


def probe_batch(paths: Sequence[str]) -> list[tuple[int, int, str] | None]:
    """(width, height, mode) from each file's header, None for a file Pillow cannot open."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append((img.size[0], img.size[1], img.mode))
        except Exception:  # any unreadable file: decoding names the reason
            out.append(None)
    return out
