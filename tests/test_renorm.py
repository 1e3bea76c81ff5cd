"""The renorm job: fold and BN recalibration on real images, the class-folder rules, the tracked job, classify."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

from serving.cli import ZooGroup
from serving.cli import cli as zoo_cli
from serving.cli_renorm import renorm as renorm_command
from training.renorm_demo import as_rgb, save_checkpoint, train_small_resnet, write_image_folder
from zoo.data import Split, load_dataset
from zoo.image_folder import map_folders
from zoo.normalization import IMAGENET, Normalization, fold_normalization, parse_spec, recalibrate_batchnorm

SIZE = 28  # Fashion-MNIST's own size: no resize, the cheapest input a ResNet-18 still takes
FOLD_TOLERANCE = 1e-4  # max |logit difference| relative to the largest |logit|: float32 rounding only


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def real_batch(fashion) -> torch.Tensor:
    """64 real Fashion-MNIST images as uint8 RGB crops."""
    return as_rgb(fashion.test.subset(64), SIZE).images


def calibrated_resnet(real_batch: torch.Tensor, normalization: Normalization) -> nn.Module:
    """A random-weight resnet18 whose BatchNorm statistics come from real images (not the trivial 0/1 defaults)."""
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10)
    recalibrate_batchnorm(network, [normalization.apply(real_batch)])
    return network.eval()


def logits(network: nn.Module, pixels: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    with torch.inference_mode():
        return network(normalization.apply(pixels))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fold_is_exact_without_padding(real_batch):
    target = parse_spec("0.5:0.5", 3)
    original = calibrated_resnet(real_batch, IMAGENET)
    original.conv1.padding = (0, 0)  # every conv1 output sees image pixels only
    folded = fold_normalization(copy.deepcopy(original), IMAGENET, target)
    assert not torch.equal(folded.bn1.running_mean, original.bn1.running_mean)
    assert relative_difference(logits(folded, real_batch, target), logits(original, real_batch, IMAGENET)) < FOLD_TOLERANCE
    # Unfolded, the same network under the new normalization is far off.
    assert relative_difference(logits(original, real_batch, target), logits(original, real_batch, IMAGENET)) > 0.01


def test_fold_with_zero_padding_is_exact_for_a_std_change_only(real_batch):
    original = calibrated_resnet(real_batch, IMAGENET)
    reference = logits(original, real_batch, IMAGENET)
    same_mean = Normalization(IMAGENET.mean, (0.5, 0.5, 0.5))
    folded = fold_normalization(copy.deepcopy(original), IMAGENET, same_mean)
    assert relative_difference(logits(folded, real_batch, same_mean), reference) < FOLD_TOLERANCE
    # A mean change moves what the padded zeros stand for: the border outputs differ, measurably.
    shifted = parse_spec("0:1", 3)
    folded = fold_normalization(copy.deepcopy(original), IMAGENET, shifted)
    border_effect = relative_difference(logits(folded, real_batch, shifted), reference)
    assert border_effect > 10 * FOLD_TOLERANCE
    unfolded = relative_difference(logits(original, real_batch, shifted), reference)
    assert border_effect < unfolded


@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_a_convolution_without_batchnorm(real_batch, bias):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 8, 5, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).eval()
    target = parse_spec("-1:2", 3)
    folded = fold_normalization(copy.deepcopy(network), IMAGENET, target)
    assert folded[0].bias is not None  # the constant term needs a bias when there is no BatchNorm to take it
    assert relative_difference(logits(folded, real_batch, target), logits(network, real_batch, IMAGENET)) < FOLD_TOLERANCE


def test_bn_recalibrate_moves_statistics_to_the_new_normalization(real_batch):
    network = calibrated_resnet(real_batch[:32], IMAGENET)
    before = network.bn1.running_mean.clone()
    target = parse_spec("0:1", 3)
    calibration = real_batch[32:]
    seen = recalibrate_batchnorm(network, [target.apply(calibration[:16]), target.apply(calibration[16:])])
    assert seen == 32
    with torch.inference_mode():  # bn1's statistics are now those of conv1's output on the calibration images
        conv_out = network.conv1(target.apply(calibration))
    assert torch.allclose(network.bn1.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert (network.bn1.running_mean - before).abs().max() > 0.05
    assert not network.training and network.bn1.momentum == 0.1  # eval mode and the momentum restored


def test_class_folders_map_by_synset_index_by_name_or_by_sorted_index():
    synsets = [f"n{i:08d}" for i in (3, 1, 2)]
    assert map_folders(synsets, ["a", "b", "c"]) == ({"n00000001": 0, "n00000002": 1, "n00000003": 2}, "imagenet-synsets")
    classes = ["T-shirt/top", "Trouser", "Ankle boot"]
    assert map_folders(["ankle_boot", "T-shirt_top"], classes) == ({"T-shirt_top": 0, "ankle_boot": 2}, "class-names")
    assert map_folders(["x", "y", "z"], classes)[1] == "sorted-index"
    with pytest.raises(ValueError, match="name no class"):
        map_folders(["x", "y"], classes)
    with pytest.raises(ValueError, match="all of them must be present"):
        map_folders(synsets[:2], classes)
