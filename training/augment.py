"""Augmentation of the uint8 training batches already in memory (issue 32): per sample and vectorized on the
batch's device, as airbench does, so training keeps its speed. Order: the policy (on uint8), then crop, resized
crop and flip (one affine resampling), random erasing, mixup or cutmix; the result is float32 in [0, 1] and the
trainer normalizes it last. Every random draw comes from the generator that shuffles the batches, so the same
seed gives the same batches and a resumed run continues them exactly."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from zoo.errors import UsageError

if TYPE_CHECKING:
    from training.train_config import TrainConfig

POLICIES = {"none": None, "trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}
CROP_RATIO = (3 / 4, 4 / 3)  # random resized crop aspect ratios, as torchvision's RandomResizedCrop
ERASE_AREA, ERASE_RATIO = (0.02, 1 / 3), (0.3, 3.3)  # as torchvision's RandomErasing
TRIES = 10  # draws per image for a resized crop or an erased rectangle that fits (torchvision's 10)


def parse_scale(scale: str | None) -> tuple[float, float] | None:
    """``--scale "MIN,MAX"``: the random resized crop's area range; None when off ("")."""
    if not scale:
        return None
    try:
        low, high = (float(v) for v in scale.split(","))
    except ValueError:
        low = high = math.nan
    if not 0 < low <= high <= 1:
        raise UsageError(f"--scale {scale!r}: give the crop's share of the image's area as MIN,MAX with "
                         "0 < MIN <= MAX <= 1 (e.g. 0.35,1), or \"\" for no random resized crop")
    return low, high


def check_augmentation(config: TrainConfig) -> None:
    """Fail on a bad augmentation setting before any data loads (settings left None come from the recipe)."""
    parse_scale(config.scale)
    if config.crop_pad is not None and not config.crop_pad >= 0:
        raise UsageError(f"--crop-pad {config.crop_pad}: the padding in pixels, 0 or more (0: no random crop)")
    for name in ("hflip", "reprob"):
        if (value := getattr(config, name)) is not None and not 0 <= value <= 1:
            raise UsageError(f"--{name} {value}: a probability, from 0 to 1")
    for name in ("mixup", "cutmix"):
        if (value := getattr(config, name)) is not None and not value >= 0:
            raise UsageError(f"--{name} {value}: the Beta distribution's alpha, 0 or more (0: off)")
    if config.aa is not None and config.aa not in POLICIES:
        raise UsageError(f"--aa {config.aa!r}: valid policies are {', '.join(POLICIES)}")


class Augment:
    """``Augment(config, num_classes, generator)(images, labels) -> (images, targets)``; see the module's doc."""

    def __init__(self, config: TrainConfig, num_classes: int, generator: torch.Generator) -> None:
        check_augmentation(config)
        self.config, self.num_classes, self.generator = config, num_classes, generator
        self.scale = parse_scale(config.scale)
        self.policy = POLICIES[config.aa]() if POLICIES[config.aa] else None
        self.geometric = bool(config.crop_pad or self.scale or config.hflip)
        self.mixing = bool(config.mixup or config.cutmix)
        self.active = bool(self.geometric or self.policy or config.reprob or self.mixing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:  # the seed recipe: the batch as decoded, bit for bit
            return images, labels
        if self.policy:
            images = self.apply_policy(images)
        images = images.float() / 255
        if self.geometric:
            images = self.crop_and_flip(images)
        if self.config.reprob:
            images = self.erase(images)
        return self.mix(images, labels) if self.mixing else (images, labels)

    def uniform(self, *size: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Uniform draws on the CPU from the batches' generator (moved to the device by the caller)."""
        return low + (high - low) * torch.rand(size, generator=self.generator)

    def seed(self) -> int:
        return int(torch.randint(2**62, (1,), generator=self.generator))

    def apply_policy(self, images: torch.Tensor) -> torch.Tensor:
        # transforms.v2 draws one operation for a whole batch tensor, so each image goes through it alone: the
        # one Python loop over images here. Its draws come from torch's global CPU generator, forked and seeded
        # from ours so runs reproduce and the caller's global state is left as it was (the CPU one only: v2
        # draws its parameters on the CPU whatever the images' device).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed())
            return torch.stack([self.policy(image) for image in images])

    def crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        """Random resized crop, random crop after zero padding and horizontal flip, per image, as one affine
        resampling of the batch: bilinear with a resized crop, else nearest with whole-pixel shifts, which keeps
        every pixel exact."""
        n, _, h, w = images.shape
        size_x, size_y, center_x, center_y = torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
        if self.scale:  # sizes and centers in grid units: the image spans -1..1
            area = self.uniform(n, TRIES, low=self.scale[0], high=self.scale[1])
            ratio = torch.exp(self.uniform(n, TRIES, low=math.log(CROP_RATIO[0]), high=math.log(CROP_RATIO[1])))
            tried_x, tried_y = torch.sqrt(area * ratio * h / w), torch.sqrt(area / ratio * w / h)
            fits = (tried_x <= 1) & (tried_y <= 1)
            first = fits.int().argmax(1, keepdim=True)  # the first try that fits; none: the whole image
            size_x = torch.where(fits.any(1), tried_x.gather(1, first).squeeze(1), 1.0)
            size_y = torch.where(fits.any(1), tried_y.gather(1, first).squeeze(1), 1.0)
            center_x, center_y = (1 - size_x) * self.uniform(n, low=-1), (1 - size_y) * self.uniform(n, low=-1)
        shift_x = shift_y = torch.zeros(n)
        if pad := self.config.crop_pad:  # shifts in whole output pixels; beyond the border: zeros (the padding)
            shift = torch.randint(-pad, pad + 1, (2, n), generator=self.generator)
            shift_x, shift_y = 2 * shift[0] / w, 2 * shift[1] / h
        flip = torch.where(self.uniform(n) < self.config.hflip, -1.0, 1.0)
        zero = torch.zeros(n)
        theta = torch.stack([torch.stack([size_x * flip, zero, size_x * shift_x + center_x], 1),
                             torch.stack([zero, size_y, size_y * shift_y + center_y], 1)], 1)
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear" if self.scale else "nearest", padding_mode="zeros",
                             align_corners=False)

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """Random erasing as torchvision's: with probability reprob a rectangle of 2-33 % of the image, aspect
        0.3-3.3, per image, filled with uniform noise per pixel (timm's "pixel" mode, in [0, 1])."""
        n, _, h, w = images.shape
        area = self.uniform(n, TRIES, low=ERASE_AREA[0], high=ERASE_AREA[1]) * h * w
        ratio = torch.exp(self.uniform(n, TRIES, low=math.log(ERASE_RATIO[0]), high=math.log(ERASE_RATIO[1])))
        tried_h, tried_w = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (tried_h < h) & (tried_w < w)
        first = fits.int().argmax(1, keepdim=True)
        erase_h, erase_w = tried_h.gather(1, first).squeeze(1), tried_w.gather(1, first).squeeze(1)
        erased = (self.uniform(n) < self.config.reprob) & fits.any(1)
        top, left = (self.uniform(n) * (h - erase_h + 1)).floor(), (self.uniform(n) * (w - erase_w + 1)).floor()
        rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        inside = (((rows >= top[:, None, None]) & (rows < (top + erase_h)[:, None, None]))
                  & ((cols >= left[:, None, None]) & (cols < (left + erase_w)[:, None, None])) & erased[:, None, None])
        # The noise is drawn on the images' device (a whole batch of it is costly to draw on the CPU and move),
        # from a generator seeded by ours: still the same noise for the same seed on the same device.
        noise = torch.rand(images.shape, device=images.device,
                           generator=torch.Generator(images.device).manual_seed(self.seed()))
        return torch.where(inside[:, None].to(images.device), noise, images)

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or cutmix as timm's (one lambda per batch from Beta(alpha, alpha), each image mixed with the batch
        reversed; with both on, one of the two per batch with probability 0.5); targets are class probabilities."""
        use_cutmix = bool(self.config.cutmix) and (not self.config.mixup or bool(self.uniform(1) < 0.5))
        alpha = self.config.cutmix if use_cutmix else self.config.mixup
        # numpy's Beta, seeded from our generator: torch.distributions cannot take a generator.
        lam = float(np.random.default_rng(self.seed()).beta(alpha, alpha))
        other = images.flip(0)
        if use_cutmix:  # a box with sides sqrt(1 - lam) of the image's, centered anywhere, clipped to the image
            n, _, h, w = images.shape
            cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            center_y, center_x = (int(torch.randint(size, (), generator=self.generator)) for size in (h, w))
            top, bottom = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, h)
            left, right = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, w)
            images = images.clone()
            images[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)  # the share actually kept, once clipped
        else:
            images = lam * images + (1 - lam) * other
        onehot = F.one_hot(labels, self.num_classes).float()
        return images, lam * onehot + (1 - lam) * onehot.flip(0)
