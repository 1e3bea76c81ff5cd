"""torchvision ResNet-18 and ResNet-50 with ImageNet's input shape, classes and normalization (architecture
only: pretrained weights are zoo.pretrained's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from zoo.normalization import IMAGENET
from zoo.models.registry import register_model

# SGD at lr 0.1 as torchvision's references recipe; its x0.1 every 30 epochs becomes 0.9 per epoch (StepLR).
_RECIPE = dict(optimizer="sgd", lr=0.1, lr_gamma=0.9)

if TYPE_CHECKING:  # imported by the builders: a fixed cost for every command that never builds a ResNet
    from torchvision import models as tv


IMAGENET_SHAPE = (3, 224, 224)


def _for_channels(network: tv.ResNet, channels: int) -> tv.ResNet:
    """A ResNet whose stem takes ``channels`` planes (any image size works: a global pool ends it)."""
    if channels != network.conv1.in_channels:
        old = network.conv1
        network.conv1 = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(network.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return network


@register_model("resnet18", input_shape=IMAGENET_SHAPE, num_classes=1000, normalization=IMAGENET, **_RECIPE)
def resnet18(*, num_classes: int = 1000, input_shape: tuple[int, int, int] = IMAGENET_SHAPE) -> tv.ResNet:
    """torchvision ResNet-18 (11.7 M parameters); pretrained weights: IMAGENET1K_V1."""
    from torchvision import models as tv
    return _for_channels(tv.resnet18(weights=None, num_classes=num_classes), input_shape[0])


@register_model("resnet50", input_shape=IMAGENET_SHAPE, num_classes=1000, normalization=IMAGENET, **_RECIPE)
def resnet50(*, num_classes: int = 1000, input_shape: tuple[int, int, int] = IMAGENET_SHAPE) -> tv.ResNet:
    """torchvision ResNet-50 (25.6 M parameters); pretrained weights: IMAGENET1K_V1, IMAGENET1K_V2."""
    from torchvision import models as tv
    return _for_channels(tv.resnet50(weights=None, num_classes=num_classes), input_shape[0])
