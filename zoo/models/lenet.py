"""LeNet-5 as in the LeNet/AlexNet notebook (after d2l): sigmoid activations, max pooling, no final Gaussian layer."""

from __future__ import annotations

import torch
from torch import nn

from zoo.normalization import Normalization
from zoo.registry import register_model


def xavier_uniform_(module: nn.Module) -> None:
    """Xavier-uniform weights for every convolution and linear layer (biases keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),  # 6@28x28: the padding keeps 28x28 input at LeNet's 32x32 geometry
            nn.Sigmoid(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),  # 16@10x10
            nn.Sigmoid(),
            nn.MaxPool2d(kernel_size=2, stride=2),  # 16@5x5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )
        xavier_uniform_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "lenet5",
    input_shape=(1, 28, 28),
    num_classes=10,
    normalization=Normalization.identity(1),  # the notebook feeds ToTensor() pixels in [0, 1]
    optimizer="sgd",
    lr=0.9,
    lr_gamma=1.0,
    # Keep the epoch with the best *validation* accuracy (the notebook picked it on the test set).
    recipe={"batch_size": 256, "keep_best": True},
)
def lenet5(*, num_classes: int = 10) -> LeNet5:
    """LeNet-5: two 5x5 sigmoid convolutions with max pooling, then 120-84-10 sigmoid layers (SGD)."""
    return LeNet5(num_classes=num_classes)
