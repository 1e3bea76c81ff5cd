"""Model families, one module each; importing this package registers them all."""

from zoo.models import mnist_cnn  # noqa: F401
from zoo.models import resnet  # noqa: F401
from zoo.models import mlp  # noqa: F401
from zoo.models import scratch_mlp  # noqa: F401
from zoo.models import lenet  # noqa: F401
from zoo.models import alexnet  # noqa: F401
