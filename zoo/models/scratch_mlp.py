"""A 784-30-20-10 logistic network trained without autograd (the lab's ``z = a @ w + b``, logistic cross-entropy
summed over outputs); its forward returns the output pre-activations, like any other model."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.normalization import Normalization
from zoo.models.registry import register_model
from zoo.errors import UsageError

INITS = ("xavier", "normal")


class ScratchMLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (784, 30, 20, 10), init: str = "xavier"):
        super().__init__()
        if init not in INITS:
            raise UsageError(f"unknown init {init!r}; valid: {', '.join(INITS)} (Xavier/Glorot normal, or N(0, 1))")
        self.sizes = tuple(sizes)
        weights, biases = [], []
        for n_in, n_out in zip(self.sizes, self.sizes[1:]):
            # Xavier/Glorot keeps pre-activations small enough that the logistic's slope is not ~0.
            std = math.sqrt(2.0 / (n_in + n_out)) if init == "xavier" else 1.0
            weights.append(nn.Parameter(torch.randn(n_in, n_out) * std))
            biases.append(nn.Parameter(torch.zeros(n_out)))
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases)

    def parameter_list(self) -> list[torch.Tensor]:
        return [p for w, b in zip(self.weights, self.biases) for p in (w, b)]

    def layers(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-activations ``z[1..L]`` and activations ``a[0..L]`` (``a[0]`` is the flattened input)."""
        a = torch.flatten(x, 1)
        zs, activations = [], [a]
        for w, b in zip(self.weights, self.biases):
            z = a @ w + b
            a = torch.sigmoid(z)
            zs.append(z)
            activations.append(a)
        return zs, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)[0][-1]

    def gradients(self, activations: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """Batch-mean gradients of :func:`logistic_cross_entropy`, in :meth:`parameter_list` order."""
        m = len(labels)
        delta = activations[-1] - F.one_hot(labels, self.sizes[-1]).to(activations[-1].dtype)
        grads: list[torch.Tensor] = []
        for layer in reversed(range(len(self.weights))):
            a_prev = activations[layer]
            grads[:0] = [a_prev.T @ delta / m, delta.sum(dim=0) / m]
            if layer > 0:
                # The logistic's derivative L'(z) = a (1 - a) at the previous layer.
                delta = (delta @ self.weights[layer].T) * a_prev * (1 - a_prev)
        return grads


def logistic_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each logistic output against its one-hot target, summed over outputs, mean over the batch."""
    target = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(scores, target, reduction="sum") / len(labels)


class ScratchSGD:
    """SGD with momentum, ``u = momentum * u + lr * g; p -= u``: the lab's update, and torch.optim.SGD's."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.0):
        if lr <= 0 or not 0.0 <= momentum < 1.0:
            raise UsageError(f"need lr > 0 and momentum in [0, 1); got lr={lr}, momentum={momentum}")
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        for p, u, g in zip(self.params, self.velocity, grads):
            u.mul_(self.momentum).add_(g, alpha=self.lr)
            p.sub_(u)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "velocity": [u.clone() for u in self.velocity]}


@register_model("scratch_mlp", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity(1),
                optimizer="sgd", lr=0.5, lr_gamma=1.0, trainer="scratch", recipe={"batch_size": 12, "momentum": 0.4})
def scratch_mlp(*, num_classes: int = 10, init: str = "xavier", input_shape: tuple[int, int, int] = (1, 28, 28)) -> ScratchMLP:
    """784-30-20-10 logistic MLP with hand-written backprop and SGD (init=xavier or normal)."""
    return ScratchMLP((math.prod(input_shape), 30, 20, num_classes), init=init)
