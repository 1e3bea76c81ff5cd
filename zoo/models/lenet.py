"""LeNet-5 as in the LeNet/AlexNet notebook (after d2l): sigmoid activations, max pooling. Images under
32x32 are zero-padded up to that geometry by the first convolution (padding 2 at 28x28, as d2l does)."""

import torch
from torch import nn

from zoo.normalization import Normalization
from zoo.models.registry import register_model
from zoo.errors import UsageError


def xavier_uniform_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)


LENET_SIDE = 32  # the input side LeNet-5's layers were designed for


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        height, width = image_size
        if min(height, width) < 12:
            raise UsageError(f"lenet5 needs images of at least 12x12 pixels, got {height}x{width}; pass a larger --image-size")
        pad = max(0, (LENET_SIDE - min(height, width) + 1) // 2)  # 2 at 28x28: LeNet's 32x32 geometry
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=pad),  # 6@28x28 for 28x28 and for 32x32 input
            nn.Sigmoid(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),  # 16@10x10
            nn.Sigmoid(),
            nn.MaxPool2d(kernel_size=2, stride=2),  # 16@5x5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.features(torch.zeros(1, in_channels, height, width)).numel(), 120),  # 16x5x5 at 28 and 32
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )
        xavier_uniform_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# The notebook feeds ToTensor() pixels in [0, 1], and picked its best epoch on the test set: here, on validation.
@register_model("lenet5", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity(1),
                optimizer="sgd", lr=0.9, lr_gamma=1.0, recipe={"batch_size": 256, "keep_best": True})
def lenet5(*, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> LeNet5:
    """LeNet-5: two 5x5 sigmoid convolutions with max pooling, then 120-84-10 sigmoid layers (SGD)."""
    return LeNet5(num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[1:])
