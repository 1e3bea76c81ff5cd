"""Train K runs that differ only in their input normalization as one computation (``--batch-trials``).

What training.train.fit logs for one run, fit_batch logs for each of K runs given by id (MLflow's active run is
one per thread). The K weight sets are stacked along a new first dimension (StackedTrials); the network runs on
the K normalized copies of a batch through ``torch.func.vmap`` + ``functional_call``, and one optimizer steps the
stack: every optimizer here updates each weight from its own gradient and state, so it is K independent ones,
and summing the members' losses only joins their graphs for one ``backward``. Dropout draws one mask per batch
(``randomness="same"``), the one a lone trial would draw. A member that diverges or is pruned leaves the stack
at the end of the epoch. On a CPU the batched convolutions run slower than K separate ones
(benchmarks/RESULTS.md); on a GPU K small networks fill the device.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from training import tracking
from training.engine import (
    EVAL_BATCH_SIZE, EpochResult, TrainingDiverged, batches, evaluate_batches, make_optimizer, resolve_device,
    splits_on, summed_loss,
)
from training.epochs import BestEpoch, EpochBookkeeping
from training.outage import Outbox
from training.train import log_test_results, patiently, seeded_network
from training.train_config import TrainConfig, run_params
from zoo.data import Dataset, Split
from zoo.errors import UsageError
from zoo.normalization import Normalization


def check_batchable(network: nn.Module, trainer: str, name: str) -> None:
    """Refuse networks the stacked computation cannot train like a lone one, saying why."""
    if trainer != "autograd":
        raise UsageError(f"--batch-trials trains with autograd; {name} has its own {trainer!r} trainer: "
                         "run it without --batch-trials")
    if any(True for _ in network.buffers()):
        raise UsageError(f"--batch-trials needs a network without buffers (batch norm running statistics); "
                         f"{name} has some: run it without --batch-trials")


class StackedTrials:
    """K members: stacked weights, their normalizations, one optimizer and lr schedule; ``members`` are the
    indices (0..K-1) of those still trained."""

    def __init__(self, network: nn.Module, normalizations: list[Normalization], *, optimizer: str, lr: float,
                 gamma: float, weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        self.base = network  # its own weights are only the starting point every member copies
        self.members = list(range(len(normalizations)))
        self.normalizations = list(normalizations)
        k = len(normalizations)
        self.params = {name: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_()
                       for name, p in network.named_parameters()}
        self._new_optimizer = lambda params: make_optimizer(optimizer, params, lr, weight_decay, momentum)
        self.optimizer = self._new_optimizer(list(self.params.values()))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=gamma)
        self._stats = self._normalization_stats()
        self._logits = vmap(lambda params, x: functional_call(self.base, params, (x,)), randomness="same")

    def _normalization_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(iter(self.params.values())).device
        active = [self.normalizations[m] for m in self.members]
        return tuple(torch.tensor([getattr(n, stat) for n in active], device=device).view(len(active), 1, -1, 1, 1)
                     for stat in ("mean", "std"))

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[K, N, C, H, W]``: the batch under each active member's normalization (as Normalization.apply)."""
        x = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels
        mean, std = self._stats
        return (x.unsqueeze(0) - mean) / std

    def train_epoch(self, split: Split, batch_size: int, generator: torch.Generator,
                    on_batch: Callable[[int], None] | None = None, max_batches: int | None = None) -> list[float]:
        """One shuffled pass (the batches a lone trial gets from ``generator``); each active member's mean loss."""
        self.base.train()
        total, count = torch.zeros(len(self.members), dtype=torch.float64, device=split.images.device), 0
        for i, (images, labels) in enumerate(batches(split, batch_size, shuffle=True, generator=generator)):
            if max_batches is not None and i >= max_batches:
                break
            self.optimizer.zero_grad(set_to_none=True)
            summed = summed_loss(self._logits(self.params, self.normalized(images)), labels)
            # Each member's loss is the mean over its batch, as a lone trial's; summing the members
            # only joins their independent graphs for one backward call.
            (summed / len(labels)).sum().backward()
            self.optimizer.step()
            total.add_(summed.detach())
            count += len(labels)
            if on_batch:
                on_batch(len(labels))
        return (total / max(count, 1)).tolist()  # one host sync per epoch

    def end_epoch(self) -> None:
        self.scheduler.step()

    def evaluate(self, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> tuple[list[float], list[float], torch.Tensor]:
        """Each active member's mean loss and accuracy on ``split``, and its predictions ``[K, N]`` (CPU)."""
        self.base.eval()
        k = len(self.members)
        loss, accuracy, predicted = evaluate_batches(lambda x: self._logits(self.params, self.normalized(x)), split, batch_size)
        return loss.expand(k).tolist(), accuracy.expand(k).tolist(), predicted.expand(k, -1)

    def position(self, member: int) -> int:
        return self.members.index(member)

    def network_of(self, member: int) -> nn.Module:
        """A lone network holding the member's weights (on the CPU, in eval mode)."""
        network = copy.deepcopy(self.base).cpu()
        network.load_state_dict(Member(self, member).state_dict())
        return network.eval()

    def trainer_state_of(self, member: int) -> dict[str, Any]:
        """The member's optimizer and lr schedule as its lone trainer's ``state_dict`` (training.engine)."""
        i = self.position(member)
        state = self.optimizer.state_dict()
        state["state"] = {index: {key: (value[i].clone() if _stacked(value, len(self.members)) else value)
                                  for key, value in entry.items()}
                          for index, entry in state["state"].items()}
        return {"optimizer": state, "lr_scheduler": self.scheduler.state_dict()}

    def drop(self, dropped: list[int]) -> None:
        """Stop training ``dropped`` members (diverged or pruned): their slices leave the stack."""
        keep = [m for m in self.members if m not in dropped]
        if keep == self.members:
            return
        rows = torch.tensor([self.position(m) for m in keep], device=next(iter(self.params.values())).device)
        optimizer_state, scheduler_state = self.optimizer.state_dict(), self.scheduler.state_dict()
        for entry in optimizer_state["state"].values():
            for key, value in entry.items():
                if _stacked(value, len(self.members)):
                    entry[key] = value.index_select(0, rows)
        self.params = {name: p.detach().index_select(0, rows).requires_grad_() for name, p in self.params.items()}
        self.members = keep
        self.optimizer = self._new_optimizer(list(self.params.values()))
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.0)
        self.scheduler.load_state_dict(scheduler_state)
        self._stats = self._normalization_stats()


def _stacked(value: Any, k: int) -> bool:
    """An optimizer state entry that holds one slice per member (not a shared step counter)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == k


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


class Member:
    """One member seen as a lone network (training.epochs.Weights): its weights' slices, copied out or in."""

    def __init__(self, stack: StackedTrials, member: int) -> None:
        self.stack, self.member = stack, member

    def state_dict(self) -> dict[str, torch.Tensor]:
        i = self.stack.position(self.member)
        return {name: p[i].detach().clone() for name, p in self.stack.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        i = self.stack.position(self.member)
        for name, p in self.stack.params.items():
            p[i].copy_(state[name])


def fit_batch(configs: list[TrainConfig], dataset: Dataset, run_ids: list[str], *,
              on_epoch: Callable[[int, EpochResult], None] | None = None, stops: tuple[type[BaseException], ...] = (),
              outboxes: list[Outbox] | None = None) -> list[MemberResult]:
    """Train ``configs[i]`` into run ``run_ids[i]``, all K at once; ``on_epoch(i, result)`` after each member's
    epoch, a member stopping at TrainingDiverged or one of ``stops`` (a pruned trial). Writes to run i go through
    ``outboxes[i]`` when given: training goes on while the tracking server is away."""
    configs = [c.resolved() for c in configs]
    if any(replace(c, mean=None, std=None) != replace(configs[0], mean=None, std=None) for c in configs):
        raise ValueError("runs trained together must differ only in their normalization (mean, std)")
    config, spec = configs[0], configs[0].spec()
    normalizations = [c.normalization(dataset) for c in configs]
    device = resolve_device(config.device)
    boxes: list[Outbox | None] = list(outboxes) if outboxes else [None] * len(run_ids)
    for c, normalization, run_id, box in zip(configs, normalizations, run_ids, boxes):
        patiently(box, tracking.log_params, run_params(c, normalization, dataset), run_id=run_id)
        patiently(box, tracking.log_dataset_inputs, dataset.name, dataset.source,
                  {"train": dataset.train, "validation": dataset.val, "test": dataset.test}, run_id=run_id)

    network = seeded_network(config, dataset).to(device)  # the initial weights and dropout masks of a lone run
    generator = torch.Generator().manual_seed(config.seed)
    check_batchable(network, spec.trainer, config.model)
    stack = StackedTrials(network, normalizations, optimizer=config.optimizer.lower(), lr=config.lr,
                          gamma=config.gamma, weight_decay=config.weight_decay, momentum=config.momentum)
    train_split, val_split, test_split = splits_on(dataset, device)
    results = [MemberResult(run_id) for run_id in run_ids]
    books = [EpochBookkeeping(  # what an epoch leaves is fit's; training/epochs.py says why the loops differ
        Member(stack, m), c, normalizations[m], generator, lambda m=m: stack.trainer_state_of(m), results[m].history,
        BestEpoch(keep_weights=c.keep_best), c.kept_checkpoints(), boxes[m], run_id=results[m].run_id)
        for m, c in enumerate(configs)]
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


def _test(stack: StackedTrials, test_split: Split, dataset: Dataset, results: list[MemberResult],
          normalizations: list, config: TrainConfig, boxes: list[Outbox | None]) -> None:
    """Test metrics and figures of every member still trained, from one batched pass over the test split."""
    losses, accuracies, predicted = stack.evaluate(test_split)
    for position, member in enumerate(stack.members):
        out = results[member]
        out.test_loss, out.test_accuracy = losses[position], accuracies[position]
        out.network = stack.network_of(member)
        patiently(boxes[member], log_test_results, out.test_loss, out.test_accuracy, dataset, predicted[position],
                  normalizations[member], config, run_id=out.run_id)
