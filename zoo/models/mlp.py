"""The course's 784-256-256-10 ReLU network. Dropout and BatchNorm are builder switches, not separate
models, so regularized runs stay comparable under one model name."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.normalization import Normalization
from zoo.models.registry import register_model
from zoo.errors import UsageError


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, hidden: int = 256, dropout: float = 0.0, batchnorm: bool = False,
                 in_features: int = 28 * 28):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout is a probability in [0, 1), got {dropout}")
        self.fc1 = nn.Linear(in_features, hidden)  # C x H x W pixels: 784 for MNIST
        # One BatchNorm per hidden layer (the course's mlp_bn reused bn1 for both, sharing its statistics).
        self.bn1 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout1(F.relu(self.bn1(self.fc1(x))))  # BatchNorm before the activation, as in the course
        x = self.dropout2(F.relu(self.bn2(self.fc2(x))))
        return self.fc3(x)


# The course feeds ToTensor() pixels in [0, 1], with an 80/20 train/validation split.
@register_model("mlp", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity(1),
                optimizer="adam", lr=1e-3, lr_gamma=1.0, recipe={"batch_size": 64, "val_fraction": 0.2})
def mlp(*, num_classes: int = 10, dropout: float = 0.0, batchnorm: bool = False,
        input_shape: tuple[int, int, int] = (1, 28, 28)) -> MLP:
    """784-256-256-10 ReLU MLP (Adam 1e-3); switches: dropout=P after each hidden layer, batchnorm=true."""
    return MLP(num_classes=num_classes, dropout=dropout, batchnorm=batchnorm, in_features=math.prod(input_shape))
