"""The pytorch/examples MNIST network (``mnist/main.py``), layer for layer."""

import torch
import torch.nn.functional as F
from torch import nn

from zoo.normalization import Normalization
from zoo.registry import register_model

MNIST_NORMALIZATION = Normalization((0.1307,), (0.3081,))


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
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


@register_model(
    "mnist_cnn",
    input_shape=(1, 28, 28),
    num_classes=10,
    normalization=MNIST_NORMALIZATION,
    optimizer="adadelta",
    lr=1.0,
    lr_gamma=0.7,
)
def mnist_cnn(*, num_classes: int = 10) -> Net:
    """The pytorch/examples MNIST CNN: two 3x3 convolutions, max pool, dropout, two linear layers."""
    return Net(num_classes=num_classes)
