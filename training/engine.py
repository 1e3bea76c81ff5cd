"""The one training and evaluation loop, and the trainers a registry entry names: "autograd", or "scratch"
(zoo.models.scratch_mlp's hand-written backpropagation). Data stay uint8 on the device, normalized per batch."""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR
from torch.optim.swa_utils import AveragedModel

from training.recipes import SEED
from zoo.data import Dataset, Split
from zoo.errors import UsageError
from zoo.models.scratch_mlp import ScratchMLP, ScratchSGD
from zoo.normalization import Normalization

OPTIMIZERS = ("adadelta", "sgd", "adam", "adamw")

EVAL_BATCH_SIZE = 128  # a convolution's output stays in the CPU's caches (benchmarks/bench_evaluation.py)

# "bf16-mixed": the forward pass under bfloat16 autocast, weights and optimizer state in float32. bfloat16 is
# coarser than one grey level under a small std, so studies of the normalization itself train in fp32.
PRECISIONS = ("fp32", "bf16-mixed")
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # torch.cpu.get_capabilities keys (x86, ARM)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse an unknown precision; warn where bfloat16 is emulated (slower than fp32, not faster)."""
    autocast(precision, device)  # refuses an unknown one
    if precision == "bf16-mixed":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:  # torch.cpu.get_capabilities is newer than torch 2.4: where it is missing, say nothing
            caps = getattr(torch.cpu, "get_capabilities", lambda: None)()
            native = device.type == "cpu" and (caps is None or any(caps.get(k) for k in BF16_CPU_FEATURES))
        if not native:
            warnings.warn(f"bf16-mixed: this {device.type} has no native bfloat16 arithmetic, so it is emulated "
                          "and slower than fp32", stacklevel=2)


def autocast(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0):
    name = name.lower()
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; only {', '.join(OPTIMIZERS)} are supported")
    optimizer = {"adadelta": torch.optim.Adadelta, "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return optimizer(params, lr=lr, weight_decay=weight_decay, **({"momentum": momentum} if name == "sgd" else {}))


def splits_on(dataset: Dataset, device: torch.device) -> tuple[Split, Split, Split]:
    """The splits moved to ``device`` once (a memory-mapped split stays mapped on the CPU)."""
    return tuple(Split(s.images.to(device), s.labels.to(device), s.mapped and device.type == "cpu")
                 for s in (dataset.train, dataset.val, dataset.test))


def batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``split`` in order, or shuffled by ``generator``: gathered once, or per batch when memory-mapped
    (only one batch of it is then read into memory)."""
    images, labels = split.images, split.labels
    order = torch.randperm(len(split), generator=generator, device="cpu").to(images.device) if shuffle else None
    if order is not None and not split.mapped:
        images, labels, order = images[order], labels[order], None
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        yield images[rows], labels[rows]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch, per leading index of ``logits`` [..., N, classes], in float32."""
    flat = logits.float().reshape(-1, *logits.shape[-2:])
    return torch.stack([F.cross_entropy(x, labels, reduction="sum") for x in flat]).view(logits.shape[:-2])


def run_epoch(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], split: Split, batch_size: int,
              generator: torch.Generator, on_batch: Callable[[int], None] | None = None,
              max_batches: int | None = None) -> torch.Tensor:
    """One shuffled pass of ``step(uint8 images, labels) -> mean loss`` (one per stacked member); the mean loss."""
    total, count = torch.zeros((), dtype=torch.float64), 0  # on the device, read once: .item() per batch would wait
    for images, labels in itertools.islice(batches(split, batch_size, shuffle=True, generator=generator), max_batches):
        total = total + step(images, labels).detach().double() * len(labels)
        count += len(labels)
        if on_batch:
            on_batch(len(labels))
    return total / max(count, 1)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split, normalization: Normalization,
                    batch_size: int, generator: torch.Generator, on_batch: Callable[[int], None] | None = None,
                    max_batches: int | None = None, precision: str = "fp32", *,
                    augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                    label_smoothing: float = 0.0, after_step: Callable[[], None] | None = None) -> float:
    """One autograd pass over ``split``; returns the mean training loss. ``augment(uint8 images, labels)`` gives
    the images and targets (class indices or probabilities) trained on; ``after_step`` follows each optimizer step
    (a per-batch schedule, the weights' moving average)."""
    device = split.images.device

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        images, targets = augment(images, labels) if augment else (images, labels)
        with autocast(precision, device):  # the loss in float32: bf16 logits
            loss = F.cross_entropy(model(normalization.apply(images)).float(), targets, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        if after_step:
            after_step()
        return loss

    model.train()
    return run_epoch(step, split, batch_size, generator, on_batch, max_batches).item()


def evaluate_batches(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int = EVAL_BATCH_SIZE,
                     *, device: torch.device | None = None,
                     on_logits: Callable[[slice, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, ...]:
    """The one evaluation loop: uint8 batches moved to ``device`` and through ``forward`` to logits [..., N, classes].
    Returns mean loss and accuracy (one per leading index) and the predictions [..., N] on the CPU."""
    device = device or split.images.device
    loss, correct, predictions = torch.zeros((), dtype=torch.float64, device=device), 0, []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            rows = slice(start, start + batch_size)
            labels = split.labels[rows].to(device, non_blocking=True)
            logits = forward(split.images[rows].to(device, non_blocking=True))
            loss = loss + summed_loss(logits, labels)
            predicted = logits.argmax(dim=-1)
            correct = correct + (predicted == labels).sum(dim=-1)
            predictions.append(predicted)
            if on_logits:
                on_logits(rows, logits)
    if not predictions:
        return loss, loss, torch.empty(0, dtype=torch.long)
    n = len(split)
    return loss / n, correct.double() / n, torch.cat(predictions, dim=-1).cpu()


def evaluate_predictions(model: nn.Module, split: Split, normalization: Normalization,
                         batch_size: int = EVAL_BATCH_SIZE, precision: str = "fp32") -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy in [0, 1] and every image's predicted class (CPU)."""
    device = split.images.device

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return model(normalization.apply(images))

    # Channels-last while evaluating (oneDNN's faster layout), back after and outside inference mode, to train on.
    model.eval().to(memory_format=torch.channels_last)
    try:
        loss, accuracy, predicted = evaluate_batches(forward, split, batch_size)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return loss.item(), accuracy.item(), predicted


def evaluate(model: nn.Module, split: Split, normalization: Normalization, batch_size: int = EVAL_BATCH_SIZE,
             precision: str = "fp32") -> tuple[float, float]:
    return evaluate_predictions(model, split, normalization, batch_size, precision)[:2]


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float | None = None  # the learning rate the epoch started at (None: not recorded, as in older checkpoints)


def check_finite(result: EpochResult) -> None:
    if not all(math.isfinite(v) for v in (result.train_loss, result.val_loss)):
        raise TrainingDiverged(
            f"training diverged at epoch {result.epoch}: train_loss={result.train_loss}, val_loss={result.val_loss}"
        )


SCHEDULES = ("step", "cosine", "onecycle")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, gamma: float, warmup_epochs: float,
                   steps_per_epoch: int, epochs: int):
    """step: StepLR(step_size=1, gamma), stepped per epoch; cosine (linear warmup from lr/100, then cosine to 0)
    and onecycle (torch's, warmup_epochs its rise): stepped per batch."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "step":
        return StepLR(optimizer, step_size=1, gamma=gamma)
    total = max(steps_per_epoch * epochs, 1)
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)  # at least one step left to decay over
    if schedule == "onecycle":  # the optimizer's own momentum stays: cycling it would give plain SGD momentum
        rise = warmup if warmup >= 2 else 0  # OneCycleLR divides by the rise's length in steps, less one
        lr = optimizer.param_groups[0]["lr"]
        return OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=rise / total, cycle_momentum=False)

    def cosine(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return LambdaLR(optimizer, cosine)


def ema_average(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """AveragedModel's multi_avg_fn: decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates, so a short
    run's average is not dominated by the initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        weight = 1 - ((1 + n) / (10 + n)).clamp(max=decay)  # a tensor on the device: no wait for the GPU
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight.to(a.dtype))
            else:  # integer buffers (batch norm's batch counter)
                a.copy_(c)

    return update


class AutogradTrainer:
    """train_one_epoch with a make_optimizer optimizer, a make_scheduler schedule, and when ``ema`` > 0 a moving
    average of the weights (then ``model``: the one validated, kept as best, tested and logged); every trainer has
    ``model``, ``lr`` and the four methods below."""

    def __init__(self, network: nn.Module, *, optimizer: str, lr: float, gamma: float, weight_decay: float, momentum: float,
                 precision: str = "fp32", schedule: str = "step", warmup_epochs: float = 0.0,
                 label_smoothing: float = 0.0, ema: float = 0.0, steps_per_epoch: int = 1, epochs: int = 1,
                 augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.network, self.precision, self.label_smoothing, self.augment = network, precision, label_smoothing, augment
        self.optimizer = make_optimizer(optimizer, network.parameters(), lr, weight_decay, momentum)
        self.scheduler = make_scheduler(self.optimizer, schedule, gamma, warmup_epochs, steps_per_epoch, epochs)
        self.per_batch = schedule != "step"
        self.ema = AveragedModel(network, multi_avg_fn=ema_average(ema), use_buffers=True) if ema else None
        self.model = network if self.ema is None else self.ema.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_step(self) -> None:
        if self.per_batch:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.network)

    def train_epoch(self, split, normalization, batch_size, generator, on_batch=None, max_batches=None) -> float:
        return train_one_epoch(self.network, self.optimizer, split, normalization, batch_size, generator, on_batch, max_batches,
                               self.precision, augment=self.augment, label_smoothing=self.label_smoothing,
                               after_step=self.after_step)

    def end_epoch(self) -> None:
        if not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule; with EMA, the trained weights and the count of updates too (a checkpoint's
        ``model`` holds the average, ``model`` here)."""
        ema = {} if self.ema is None else {"trained_model": self.network.state_dict(), "ema_updates": self.ema.n_averaged}
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(), **ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.network.load_state_dict(state["trained_model"])
            self.ema.n_averaged.copy_(state["ema_updates"])


class ScratchTrainer:
    """Hand-written forward, backward and SGD step (zoo.models.scratch_mlp)."""

    def __init__(self, network: nn.Module, *, optimizer: str, lr: float, gamma: float, weight_decay: float, momentum: float,
                 precision: str = "fp32"):
        if precision != "fp32":
            raise UsageError(f"the scratch trainer computes in float32 only; got precision {precision!r}: use --precision fp32")
        if not isinstance(network, ScratchMLP):
            raise UsageError(f"the scratch trainer trains ScratchMLP networks, not {type(network).__name__}")
        if optimizer != "sgd" or weight_decay:
            raise UsageError(f"scratch_mlp trains with its own SGD (lr, momentum); got optimizer={optimizer!r}, "
                             f"weight_decay={weight_decay}: use --optimizer sgd (the default) and no weight decay")
        self.network = self.model = network
        self.gamma = gamma
        self.sgd = ScratchSGD(network.parameter_list(), lr, momentum)

    @property
    def lr(self) -> float:
        return self.sgd.lr

    @torch.no_grad()
    def train_epoch(self, split, normalization, batch_size, generator, on_batch=None, max_batches=None) -> float:
        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            zs, activations = self.network.layers(normalization.apply(images))
            self.sgd.step(self.network.gradients(activations, labels))
            return F.cross_entropy(zs[-1], labels)  # the val_loss measure, so the curves compare

        return run_epoch(step, split, batch_size, generator, on_batch, max_batches).item()

    def end_epoch(self) -> None:
        self.sgd.lr *= self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.sgd.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizer"]
        self.sgd.lr, self.sgd.momentum = saved["lr"], saved["momentum"]
        for velocity, value in zip(self.sgd.velocity, saved["velocity"]):
            velocity.copy_(value)


def check_seed_recipe(config: Any, who: str) -> None:
    """Refuse a resolved TrainConfig (schedule, label smoothing, EMA, patience, augmentation) other than the seed
    recipe's: ``who`` trains that recipe only."""
    other = [f"--{k.replace('_', '-')} {getattr(config, k)}" for k, v in SEED.items()
             if k != "weight_decay" and getattr(config, k) != v]  # weight decay: the trainers check their own
    if other:
        recipe = "use --recipe seed and " if config.recipe != "seed" else ""
        raise UsageError(f"{who} trains the seed recipe only, not {', '.join(other)}: {recipe}leave those options out")


TRAINERS: dict[str, type] = {"autograd": AutogradTrainer, "scratch": ScratchTrainer}


def make_trainer(name: str, network: nn.Module, **settings: Any) -> AutogradTrainer | ScratchTrainer:
    if name not in TRAINERS:
        raise UsageError(f"unknown trainer {name!r}; valid trainers: {', '.join(sorted(TRAINERS))}")
    return TRAINERS[name](network, **settings)
