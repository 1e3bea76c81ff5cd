"""How a model takes its training steps, by its registry entry's ``trainer`` name: "autograd" (training.engine)
or "scratch" (the hand-written backpropagation of ``zoo.models.scratch_mlp``). A trainer runs and closes an
epoch and reports its state for checkpoints; fit owns the rest."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import StepLR

from training.engine import make_optimizer, run_epoch, score_loss, train_one_epoch
from zoo.data import Split
from zoo.models.scratch_mlp import ScratchMLP, ScratchSGD
from zoo.normalization import Normalization
from zoo.errors import UsageError


class EpochTrainer(Protocol):
    def train_epoch(self, split: Split, normalization: Normalization, batch_size: int, generator: torch.Generator,
                    on_batch: Callable[[int], None] | None = None, max_batches: int | None = None) -> float:
        """One pass over ``split``; returns the mean training loss."""

    def end_epoch(self) -> None:
        """After validation: the learning-rate schedule."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries besides the weights (optimizer, lr_scheduler), for ``load_state_dict`` on resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AutogradTrainer:
    """training.engine's loop with one of its optimizers and a StepLR(step_size=1) schedule."""

    def __init__(self, network: nn.Module, *, optimizer: str, lr: float, gamma: float, weight_decay: float, momentum: float,
                 precision: str = "fp32"):
        self.network, self.precision = network, precision
        self.optimizer = make_optimizer(optimizer, network.parameters(), lr, weight_decay, momentum)
        self.scheduler = StepLR(self.optimizer, step_size=1, gamma=gamma)

    def train_epoch(self, split, normalization, batch_size, generator, on_batch=None, max_batches=None) -> float:
        return train_one_epoch(self.network, self.optimizer, split, normalization, batch_size, generator, on_batch, max_batches,
                               self.precision)

    def end_epoch(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])


class ScratchTrainer:
    """Hand-written forward, backward and SGD step, no autograd (zoo.models.scratch_mlp)."""

    def __init__(self, network: nn.Module, *, optimizer: str, lr: float, gamma: float, weight_decay: float, momentum: float,
                 precision: str = "fp32"):
        if precision != "fp32":
            raise UsageError(f"the scratch trainer computes in float32 only; got precision {precision!r}: use --precision fp32")
        if not isinstance(network, ScratchMLP):
            raise UsageError(f"the scratch trainer trains ScratchMLP networks, not {type(network).__name__}")
        if optimizer != "sgd" or weight_decay:
            raise UsageError(
                f"scratch_mlp trains with its own SGD (lr, momentum); got optimizer={optimizer!r}, "
                f"weight_decay={weight_decay}: use --optimizer sgd (the default) and no weight decay"
            )
        self.network, self.gamma = network, gamma
        self.sgd = ScratchSGD(network.parameter_list(), lr, momentum)

    @torch.no_grad()
    def train_epoch(self, split, normalization, batch_size, generator, on_batch=None, max_batches=None) -> float:
        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            zs, activations = self.network.layers(images)
            self.sgd.step(self.network.gradients(activations, labels))
            # Reported with the same cross-entropy of the scores as val_loss, so the curves compare.
            return score_loss(zs[-1], labels)

        return run_epoch(step, split, normalization, batch_size, generator, on_batch, max_batches)

    def end_epoch(self) -> None:
        self.sgd.lr *= self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.sgd.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizer"]
        self.sgd.lr, self.sgd.momentum = saved["lr"], saved["momentum"]
        for velocity, value in zip(self.sgd.velocity, saved["velocity"]):
            velocity.copy_(value)


TRAINERS: dict[str, type] = {"autograd": AutogradTrainer, "scratch": ScratchTrainer}


def make_trainer(name: str, network: nn.Module, **settings: Any) -> EpochTrainer:
    """The trainer a registry entry names; ``settings``: optimizer, lr, gamma, weight_decay, momentum, precision."""
    if name not in TRAINERS:
        raise UsageError(f"unknown trainer {name!r}; valid trainers: {', '.join(sorted(TRAINERS))}")
    return TRAINERS[name](network, **settings)
