"""Train K runs that differ only in their input normalization as one batched computation.

What :func:`training.train.fit` logs for one run, this logs for each of K runs given by id (they
need not be active: MLflow's active run is one per thread): params, dataset inputs, per-epoch
metrics, checkpoints, test metrics and figures. The weights are trained together by
:class:`training.batched.StackedTrials`. A member that diverges, or whose ``on_epoch`` raises
one of ``stops`` (a pruned trial), stops there; the others go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import mlflow
import torch
from torch import nn

from training import tracking
from training.batched import StackedTrials, check_batchable
from training.engine import EpochResult, TrainingDiverged, resolve_device
from training.epochs import BestEpoch, EpochBookkeeping
from training.outage import Outbox
from training.train import build_network, log_test_figures, patiently
from training.train_config import TrainConfig, run_params
from zoo.data import Dataset, Split
from zoo.normalization import Normalization


@dataclass
class MemberResult:
    run_id: str
    history: list[EpochResult] = field(default_factory=list)
    stopped: BaseException | None = None  # TrainingDiverged, or what on_epoch raised
    test_loss: float | None = None
    test_accuracy: float | None = None
    network: nn.Module | None = None  # the trained network (CPU, eval mode) when not stopped

    @property
    def val_accuracy(self) -> float:
        return self.history[-1].val_accuracy if self.history else float("nan")


class _Member:
    """One member seen as a lone network, for BestEpoch and its checkpoints (training.epochs.Weights)."""

    def __init__(self, stack: StackedTrials, member: int) -> None:
        self.stack, self.member = stack, member

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stack.state_dict_of(self.member)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.stack.load_state_of(self.member, state)


def check_same_but_normalization(configs: list[TrainConfig]) -> None:
    first = replace(configs[0], mean=None, std=None)
    for config in configs[1:]:
        if replace(config, mean=None, std=None) != first:
            raise ValueError("runs trained together must differ only in their normalization (mean, std)")


def fit_batch(
    configs: list[TrainConfig],
    dataset: Dataset,
    run_ids: list[str],
    *,
    on_epoch: Callable[[int, EpochResult], None] | None = None,
    stops: tuple[type[BaseException], ...] = (),
    outboxes: list[Outbox] | None = None,
) -> list[MemberResult]:
    """Train ``configs[i]`` into run ``run_ids[i]``, all K at once; ``on_epoch(i, result)`` after each member's epoch.

    With ``outboxes`` (one per run, as :func:`training.train.fit` takes one), every write to run i goes
    through ``outboxes[i]``: training goes on while the tracking server is away."""
    configs = [c.resolved() for c in configs]
    check_same_but_normalization(configs)
    config, spec = configs[0], configs[0].spec()
    normalizations = [c.normalization(dataset) for c in configs]
    device = resolve_device(config.device)
    boxes: list[Outbox | None] = list(outboxes) if outboxes else [None] * len(run_ids)
    for c, normalization, run_id, box in zip(configs, normalizations, run_ids, boxes):
        patiently(box, tracking.log_params, run_params(c, normalization, dataset), run_id=run_id)
        patiently(box, tracking.log_dataset_inputs, dataset.name, dataset.source,
                  {"train": dataset.train, "validation": dataset.val, "test": dataset.test}, run_id=run_id)

    torch.manual_seed(config.seed)  # the initial weights and dropout masks of a lone run
    generator = torch.Generator().manual_seed(config.seed)
    network = build_network(config, dataset).to(device)
    check_batchable(network, spec.trainer, config.model)
    stack = StackedTrials(network, normalizations, optimizer=config.optimizer.lower(), lr=config.lr,
                          gamma=config.gamma, weight_decay=config.weight_decay, momentum=config.momentum)
    train_split, val_split, test_split = (
        Split(s.images.to(device), s.labels.to(device), s.mapped and device.type == "cpu")
        for s in (dataset.train, dataset.val, dataset.test)
    )
    results = [MemberResult(run_id) for run_id in run_ids]
    # What an epoch leaves behind is fit's; training/epochs.py says why the loops differ.
    books = [_bookkeeping(stack, member, c, normalizations[member], generator, results[member], boxes[member])
             for member, c in enumerate(configs)]
    for epoch in range(1, config.epochs + 1):
        if not stack.members:
            break
        started = time.perf_counter()
        train_losses = stack.train_epoch(train_split, config.batch_size, generator, max_batches=config.max_batches)
        val_losses, val_accuracies, _ = stack.evaluate(val_split)
        stack.end_epoch()
        seconds = time.perf_counter() - started
        stopped = []
        for position, member in enumerate(list(stack.members)):
            result = EpochResult(epoch, train_losses[position], val_losses[position], val_accuracies[position])
            try:
                books[member].record(result, seconds)
                if on_epoch:
                    on_epoch(member, result)
            except (TrainingDiverged, *stops) as exc:
                results[member].stopped = exc
                stopped.append(member)
        stack.drop(stopped)

    for box in boxes:
        if box is not None:
            box.wait_and_send()  # the server holds every member's epochs before the runs go on (or ServerGone)
    for member in stack.members:
        if config.keep_best:
            patiently(boxes[member], books[member].best.restore, books[member].network, run_id=run_ids[member])
    if stack.members:
        _test(stack, test_split, dataset, results, normalizations, config, boxes)
    return results


def _bookkeeping(stack: StackedTrials, member: int, config: TrainConfig, normalization: Normalization,
                 generator: torch.Generator, out: MemberResult, outbox: Outbox | None) -> EpochBookkeeping:
    """The record of one member's epochs, kept in ``out.history`` and logged to ``out.run_id`` (through ``outbox``);
    ``normalization`` is the member's for the dataset's channels (not the model's default channel count)."""
    return EpochBookkeeping(
        _Member(stack, member), config, normalization, generator, lambda: stack.trainer_state_of(member),
        out.history, BestEpoch(keep_weights=config.keep_best), config.kept_checkpoints(), outbox, run_id=out.run_id,
    )


def _test(stack: StackedTrials, test_split: Split, dataset: Dataset, results: list[MemberResult],
          normalizations: list, config: TrainConfig, boxes: list[Outbox | None]) -> None:
    """Test metrics and figures of every member still trained, from one batched pass over the test split."""
    losses, accuracies, predicted = stack.evaluate(test_split)
    for position, member in enumerate(stack.members):
        out = results[member]
        out.test_loss, out.test_accuracy = losses[position], accuracies[position]
        out.network = stack.network_of(member)
        patiently(boxes[member], mlflow.log_metrics, {"test_loss": out.test_loss, "test_accuracy": out.test_accuracy},
                  run_id=out.run_id)
        patiently(boxes[member], log_test_figures, dataset.test, predicted[position], normalizations[member],
                  dataset.classes, config.model, config.dataset, run_id=out.run_id)
