"""AlexNet for Fashion-MNIST, as in the LeNet/AlexNet notebook (after d2l). It resizes its 28x28 input to
224x224 itself: 60,000 images at 224x224 would take 3 GB, and its input shape stays the data's."""

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.lenet import xavier_uniform_
from zoo.normalization import Normalization
from zoo.models.registry import register_model

RESIZE = 224  # the side AlexNet's layer sizes were designed for (6400 = 256 x 5 x 5 features)


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.5, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 256@5x5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 5 * 5, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        xavier_uniform_(self)  # d2l's train_ch6 initializes AlexNet as it does LeNet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))


@register_model("alexnet", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity(1),
                optimizer="sgd", lr=0.01, lr_gamma=1.0, recipe={"batch_size": 128})
def alexnet(*, num_classes: int = 10, dropout: float = 0.5, input_shape: tuple[int, int, int] = (1, 28, 28)) -> AlexNet:
    """AlexNet, input resized to 224x224 inside (28x28 grey by default), dropout 0.5 in the classifier (SGD)."""
    return AlexNet(num_classes=num_classes, dropout=dropout, in_channels=input_shape[0])
