"""Model families, one module each, and their registry; importing anything here registers every family."""

from zoo.models import mnist_cnn  # noqa: F401
from zoo.models import resnet  # noqa: F401
from zoo.models import mlp  # noqa: F401
from zoo.models import scratch_mlp  # noqa: F401
from zoo.models import lenet  # noqa: F401
from zoo.models import alexnet  # noqa: F401
from zoo.models import timm_models  # noqa: F401  (timm:NAME; imports timm only when used)
