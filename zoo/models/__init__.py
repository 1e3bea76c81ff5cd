"""Model families, one module each, and their registry (timm:NAME imports timm when used); importing anything
here registers every family."""

from zoo.models import alexnet, lenet, mlp, mnist_cnn, resnet, scratch_mlp, timm_models  # noqa: F401
