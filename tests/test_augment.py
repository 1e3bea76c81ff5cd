"""training.augment: what each augmentation does to a batch, its reproducibility, and the settings it refuses."""

import re

import pytest
import torch
import torch.nn.functional as F

from training.augment import Augment, check_augmentation
from training.train_config import TrainConfig
from zoo.errors import UsageError


def augment(seed: int = 0, num_classes: int = 10, **settings) -> Augment:
    """An Augment with the seed recipe (everything off) but the given settings."""
    config = TrainConfig(recipe="seed", **settings).resolved()
    return Augment(config, num_classes, torch.Generator().manual_seed(seed))


def batch(n: int = 16, channels: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images with every pixel 1..255 (so zero padding shows), and labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def test_inactive_returns_the_batch_as_is():
    images, labels = batch()
    out, targets = augment()(images, labels)
    assert not augment().active
    assert out is images and targets is labels


def test_flip_with_probability_one_mirrors_every_image_exactly():
    images, labels = batch()
    out, targets = augment(hflip=1.0)(images, labels)
    assert out.dtype == torch.float32
    assert torch.equal(out, images.flip(-1).float() / 255)
    assert torch.equal(targets, labels)


def shifted(image: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """The image's crop at offset (dy, dx) after zero padding by pad."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (pad, pad, pad, pad))
    return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def test_crop_pad_shifts_each_image_by_at_most_pad_whole_pixels():
    pad = 3
    images, labels = batch(n=32)
    out, _ = augment(crop_pad=pad)(images, labels)
    assert out.shape == images.shape
    pixels = out * 255
    assert torch.equal(pixels, pixels.round())  # exact pixels, no interpolation
    offsets = set()
    for image, result in zip(images, pixels.to(torch.uint8)):
        found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.equal(shifted(image, dy, dx, pad), result)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # per image, not one shift for the batch


def test_the_same_image_gets_different_crops_in_one_batch():
    image, label = batch(n=1)
    out, _ = augment(crop_pad=4, scale="0.35,1", hflip=0.5)(image.repeat(64, 1, 1, 1), label.repeat(64))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 64


def test_scale_one_keeps_the_image_and_a_smaller_scale_zooms_in():
    images, labels = batch()
    out, _ = augment(scale="1,1")(images, labels)  # only the whole image has area 1 at aspect 3/4..4/3
    assert torch.allclose(out, images.float() / 255, atol=1e-5)
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(16, 3, 32, 32)  # brightness grows left to right
    out, _ = augment(scale="0.25,0.25")(ramp, labels)
    span = (out[:, 0, 16].amax(1) - out[:, 0, 16].amin(1)) / (248 / 255)
    # a crop of a quarter of the area at aspect 3/4..4/3 is 0.43-0.58 of the width
    assert ((span > 0.4) & (span < 0.6)).all()
    assert len(set(out[:, 0, 16, 0].tolist())) > 8  # cropped at different places


def test_same_seed_same_batches_another_seed_differs_and_resume_continues_exactly():
    settings = dict(crop_pad=4, scale="0.5,1", hflip=0.5, aa="trivialaugment", reprob=0.5, mixup=0.2, cutmix=1.0)
    images, labels = batch()
    first = augment(seed=1, **settings)
    run = [first(images, labels) for _ in range(3)]
    again = augment(seed=1, **settings)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, [again(images, labels) for _ in range(3)]))
    assert not torch.equal(augment(seed=2, **settings)(images, labels)[0], run[0][0])
    # A resumed run: a new generator from the saved state continues the batches where they were.
    stopped = augment(seed=1, **settings)
    stopped(images, labels)
    resumed = augment(**settings)
    resumed.generator.set_state(stopped.generator.get_state())
    out, targets = resumed(images, labels)
    assert torch.equal(out, run[1][0]) and torch.equal(targets, run[1][1])


def test_mixup_mixes_each_image_with_another_and_its_targets_sum_to_one():
    images, _ = batch(n=8)
    labels = torch.arange(8)
    out, targets = augment(mixup=0.4)(images, labels)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    assert ((targets > 0).sum(1) == 2).all()  # two classes: the image's and its partner's
    lam = targets[0, 0]
    assert 0 < lam < 1 and torch.allclose(targets[0, 7], 1 - lam)
    assert torch.allclose(out[0], lam * images[0] / 255 + (1 - lam) * images[7] / 255, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_target_share_is_the_pasted_area(seed):
    images = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 255.0)]).to(torch.uint8)
    out, targets = augment(seed=seed, num_classes=2, cutmix=1.0)(images, torch.tensor([0, 1]))
    pasted = (out[0, 0] == 1).float().mean()  # the white image pasted on the black one
    assert torch.allclose(targets[0], torch.stack([1 - pasted, pasted]))
    assert torch.allclose(targets[1], torch.stack([pasted, 1 - pasted]))
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # pasted, not blended


def test_erasing_replaces_one_rectangle_per_image_with_noise():
    images = torch.full((32, 3, 32, 32), 128, dtype=torch.uint8)
    out, _ = augment(reprob=1.0)(images, torch.zeros(32, dtype=torch.int64))
    erased = 0
    for image in out:
        changed = (image != 128 / 255).any(0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and box.sum() == changed.sum()  # exactly one filled rectangle
        assert 0.01 < changed.float().mean() < 0.4  # about 2-33 % of the image
    assert erased >= 30  # probability 1: every image where a rectangle fitted in 10 tries


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_policy_runs_on_grey_and_colour_images(policy, channels):
    images, labels = batch(channels=channels, size=28)
    out, targets = augment(aa=policy)(images, labels)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and torch.equal(targets, labels)
    changed = [not torch.equal(o, i.float() / 255) for o, i in zip(out, images)]
    assert 0 < sum(changed)  # some operations (identity, a zero magnitude) leave an image as it was
    assert torch.equal(augment(aa=policy)(images, labels)[0], out)


@pytest.mark.parametrize("setting, value, valid", [
    ("scale", "1,0.5", "0 < MIN <= MAX <= 1"), ("scale", "0,1", "MIN,MAX"), ("scale", "big", "MIN,MAX"),
    ("crop_pad", -1, "0 or more"), ("hflip", 1.5, "from 0 to 1"), ("reprob", -0.1, "from 0 to 1"),
    ("mixup", -1.0, "0 or more"), ("cutmix", float("nan"), "0 or more"),
    ("aa", "autoaugment", "trivialaugment, randaugment"),
])
def test_bad_settings_are_refused_with_the_valid_form(setting, value, valid):
    with pytest.raises(UsageError, match=re.escape(valid)) as error:
        check_augmentation(TrainConfig(**{setting: value}))
    assert f"--{setting.replace('_', '-')}" in str(error.value)
    with pytest.raises(UsageError):
        augment(**{setting: value})
