"""torchvision ResNet-18 and ResNet-50, registered with ImageNet's input shape, classes and normalization.

Pretrained weights come through torchvision's weights API (see :mod:`zoo.pretrained`);
the builders here make the architecture only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoo.normalization import IMAGENET
from zoo.registry import register_model

# torchvision references/classification recipe: SGD, lr 0.1, x0.1 every 30 epochs (here StepLR per epoch).
_RECIPE = dict(optimizer="sgd", lr=0.1, lr_gamma=0.9)

if TYPE_CHECKING:
    from torchvision import models as tv
# Otherwise torchvision is imported by the builders: importing it (its models and ops, and with
# them torch._dynamo) is a fixed cost of every `zoo` command that never builds a ResNet.


@register_model("resnet18", input_shape=(3, 224, 224), num_classes=1000, normalization=IMAGENET, **_RECIPE)
def resnet18(*, num_classes: int = 1000) -> tv.ResNet:
    """torchvision ResNet-18 (11.7 M parameters); pretrained weights: IMAGENET1K_V1."""
    from torchvision import models as tv

    return tv.resnet18(weights=None, num_classes=num_classes)


@register_model("resnet50", input_shape=(3, 224, 224), num_classes=1000, normalization=IMAGENET, **_RECIPE)
def resnet50(*, num_classes: int = 1000) -> tv.ResNet:
    """torchvision ResNet-50 (25.6 M parameters); pretrained weights: IMAGENET1K_V1, IMAGENET1K_V2."""
    from torchvision import models as tv

    return tv.resnet50(weights=None, num_classes=num_classes)
