"""Model families, one module each; importing this package registers them all."""

from zoo.models import mnist_cnn  # noqa: F401
from zoo.models import resnet  # noqa: F401
