"""The pytorch/examples MNIST network (``mnist/main.py``), layer for layer; other data changes only the first
convolution's channels and ``fc1``'s input size."""

import torch
import torch.nn.functional as F
from torch import nn

from zoo.normalization import Normalization
from zoo.models.registry import register_model
from zoo.errors import UsageError


def flattened_features(height: int, width: int) -> int:
    """fc1's input size: two unpadded 3x3 convolutions (-4 pixels), then a 2x2 max pool."""
    if min(height, width) < 6:
        raise UsageError(f"mnist_cnn needs images of at least 6x6 pixels (two 3x3 convolutions and a 2x2 pool), "
                         f"got {height}x{width}; pass a larger --image-size")
    return 64 * ((height - 4) // 2) * ((width - 4) // 2)


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(flattened_features(*image_size), 128)  # 9216 at 28x28
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


@register_model("mnist_cnn", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization((0.1307,), (0.3081,)),
                optimizer="adadelta", lr=1.0, lr_gamma=0.7)
def mnist_cnn(*, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> Net:
    """The pytorch/examples MNIST CNN: two 3x3 convolutions, max pool, dropout, two linear layers."""
    return Net(num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[1:])
