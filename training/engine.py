"""The one training loop shared by every model that trains with autograd.

Data stay uint8 on the device and are normalized per batch (see zoo/data/__init__.py for why and
benchmarks/RESULTS.md for the measurement); the same decoded tensors serve every
normalization a study tries.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zoo.data import Split
from zoo.normalization import Normalization
from zoo.errors import UsageError

OPTIMIZERS = ("adadelta", "sgd", "adam", "adamw")

# Evaluation batches small enough that a convolution's output stays in the CPU's caches: the MNIST
# CNN evaluated faster on the 2-core CPU in batches of 128 than of 1000 (channels-last;
# benchmarks/bench_evaluation.py). Results do not depend on it beyond float summation order.
EVAL_BATCH_SIZE = 128

# "fp32": float32 throughout (the default). "bf16-mixed": the forward pass under bfloat16 autocast,
# weights, gradients and optimizer state in float32 (as Lightning's precision="bf16-mixed"). It trained
# the MNIST CNN faster on a CPU with native bfloat16 (AVX512-BF16 or AMX; benchmarks/RESULTS.md, "`zoo train`
# against the published notebook's protocol"),
# but bfloat16 keeps 8 significant bits: a normalized input near 40 is rounded to a multiple of 0.25,
# coarser than one grey level under std 0.05, so studies of the normalization itself train in fp32.
PRECISIONS = ("fp32", "bf16-mixed")


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
        else:  # oneDNN's own check for AVX512-BF16 / AMX (a private op: where it is missing, say nothing)
            is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
            native = device.type == "cpu" and (is_supported is None or is_supported())
        if not native:
            warnings.warn(f"bf16-mixed: this {device.type} has no native bfloat16 arithmetic, so it is emulated "
                          "and slower than fp32", stacklevel=2)


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which epoch."""


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0):
    name = name.lower()
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer {name!r}; only {', '.join(OPTIMIZERS)} are supported")


def batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``split`` in order, or in a new random order drawn from ``generator``.

    A shuffled epoch is gathered once into contiguous tensors and then sliced: one copy per
    epoch rather than one small gather per batch, and the same batches as gathering per batch.
    A memory-mapped split (an image folder above the memory budget) is gathered batch by batch
    instead, so that only one batch of it is ever read into memory.
    """
    images, labels = split.images, split.labels
    order = torch.randperm(len(split), generator=generator, device="cpu").to(images.device) if shuffle else None
    if order is not None and split.mapped:
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            yield images[index], labels[index]
        return
    if order is not None:
        images, labels = images[order], labels[order]
    for start in range(0, len(labels), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


def _loss(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Networks may end in log_softmax (pytorch/examples Net) or in raw logits;
    # cross_entropy applies log_softmax, which leaves log-probabilities unchanged.
    # Always in float32: under bf16-mixed the logits are bfloat16, and a loss taken outside
    # autocast (evaluation) would be computed and summed with 8 significant bits.
    return F.cross_entropy(output.float(), target, reduction=reduction)


score_loss = _loss  # the public name, for trainers outside this module


# One optimization step on a batch of normalized images; returns the batch's mean loss.
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_epoch(
    step: Step,
    split: Split,
    normalization: Normalization,
    batch_size: int,
    generator: torch.Generator,
    on_batch: Callable[[int], None] | None = None,
    max_batches: int | None = None,
) -> float:
    """One shuffled pass of ``step`` over ``split``; returns the mean training loss.

    Every trainer (autograd or hand-written) goes through here, so batching, the
    ``max_batches`` cut and the loss bookkeeping are the same for all models.
    """
    # Summed on the device and read once per epoch: loss.item() every batch would wait for the
    # device (a GPU) to finish each step before queueing the next.
    total, count = torch.zeros((), dtype=torch.float64, device=split.images.device), 0
    for i, (images, labels) in enumerate(batches(split, batch_size, shuffle=True, generator=generator)):
        if max_batches is not None and i >= max_batches:
            break
        loss = step(normalization.apply(images), labels)
        total.add_(loss.detach(), alpha=len(labels))
        count += len(labels)
        if on_batch:
            on_batch(len(labels))
    return total.item() / max(count, 1)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    normalization: Normalization,
    batch_size: int,
    generator: torch.Generator,
    on_batch: Callable[[int], None] | None = None,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> float:
    """One autograd pass over ``split``; returns the mean training loss."""
    device = split.images.device

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = _loss(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    model.train()
    return run_epoch(step, split, normalization, batch_size, generator, on_batch, max_batches)


def evaluate(model: nn.Module, split: Split, normalization: Normalization, batch_size: int = EVAL_BATCH_SIZE,
             precision: str = "fp32") -> tuple[float, float]:
    """Mean loss and accuracy (a fraction in [0, 1]) of ``model`` on ``split``."""
    loss, accuracy, _ = evaluate_predictions(model, split, normalization, batch_size, precision)
    return loss, accuracy


@contextmanager
def channels_last(model: nn.Module) -> Iterator[None]:
    """Convolution weights in channels-last while inside: the MNIST CNN's inference ran faster
    so on the 2-core CPU (oneDNN; benchmarks/RESULTS.md, "`zoo train` against the published notebook's protocol"). The same parameter objects are converted back after, so
    the optimizer and training are untouched (convert outside inference mode, or they become
    inference tensors that autograd refuses)."""
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def evaluate_predictions(model: nn.Module, split: Split, normalization: Normalization,
                         batch_size: int = EVAL_BATCH_SIZE, precision: str = "fp32") -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and the predicted class of every image (on the CPU), in one pass."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.images.device)
    predictions = []
    device = split.images.device
    with channels_last(model), torch.inference_mode():  # converted outside inference mode: the weights train on
        for images, labels in batches(split, batch_size, shuffle=False):
            with autocast(precision, device):
                output = model(normalization.apply(images))
            loss_sum.add_(_loss(output, labels, reduction="sum"))
            predictions.append(output.argmax(dim=1))
    n = max(len(split), 1)
    if not predictions:
        return 0.0, 0.0, torch.empty(0, dtype=torch.long)
    predicted = torch.cat(predictions)  # read back once, not per batch
    correct = int((predicted == split.labels).sum())
    return loss_sum.item() / n, correct / n, predicted.cpu()


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float

    def metrics(self) -> dict[str, float]:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "val_accuracy": self.val_accuracy}


def check_finite(result: EpochResult) -> None:
    if not all(math.isfinite(v) for v in (result.train_loss, result.val_loss)):
        raise TrainingDiverged(
            f"training diverged at epoch {result.epoch}: train_loss={result.train_loss}, val_loss={result.val_loss}"
        )
