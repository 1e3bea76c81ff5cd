"""Train K runs that differ only in their input normalization as one computation (``--batch-trials``): the K
weight sets stacked, run through ``torch.func.vmap`` + ``functional_call``, one optimizer stepping them all (each
weight updates from its own gradient and state). Each member logs to its run by id, as training.train.fit does.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from training import tracking
from training.engine import (
    EVAL_BATCH_SIZE, EpochResult, TrainingDiverged, check_seed_recipe, evaluate_batches, make_optimizer, resolve_device, run_epoch,
    splits_on, summed_loss,
)
from training.epochs import BestEpoch, EpochBookkeeping
from training.outage import Outbox
from training.train import TrainResult, log_test_results, patiently, seeded_network
from training.train_config import TrainConfig, run_params
from zoo.data import Dataset, Split
from zoo.errors import UsageError
from zoo.normalization import Normalization


def check_batchable(network: nn.Module, trainer: str, name: str) -> None:
    if trainer != "autograd":
        raise UsageError(f"--batch-trials trains with autograd; {name} has its own {trainer!r} trainer: "
                         "run it without --batch-trials")
    if any(True for _ in network.buffers()):
        raise UsageError(f"--batch-trials needs a network without buffers (batch norm running statistics); "
                         f"{name} has some: run it without --batch-trials")


class StackedTrials:
    """K stacked weight sets with one optimizer and lr schedule; ``members``: the indices still trained."""

    def __init__(self, network: nn.Module, normalizations: list[Normalization], *, optimizer: str, lr: float,
                 gamma: float, weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        self.base = network  # its own weights are only the starting point every member copies
        self.members, self.normalizations = list(range(len(normalizations))), list(normalizations)
        self.params = {name: p.detach().unsqueeze(0).repeat(len(normalizations), *[1] * p.dim()).requires_grad_()
                       for name, p in network.named_parameters()}
        self._new_optimizer = lambda params: make_optimizer(optimizer, params, lr, weight_decay, momentum)
        self.optimizer = self._new_optimizer(list(self.params.values()))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=gamma)
        # One dropout mask per batch, the one a lone trial would draw.
        self._logits = vmap(lambda params, x: functional_call(self.base, params, (x,)), randomness="same")

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[K, N, C, H, W]``: the batch under each active member's normalization."""
        return torch.stack([self.normalizations[m].apply(pixels) for m in self.members])

    def train_epoch(self, split: Split, batch_size: int, generator: torch.Generator,
                    on_batch: Callable[[int], None] | None = None, max_batches: int | None = None) -> list[float]:
        """One shuffled pass (a lone trial's batches); each active member's mean loss."""
        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            losses = summed_loss(self._logits(self.params, self.normalized(images)), labels) / len(labels)
            losses.sum().backward()  # summing the members' losses only joins their independent graphs
            self.optimizer.step()
            return losses

        self.base.train()
        return run_epoch(step, split, batch_size, generator, on_batch, max_batches).tolist()

    def end_epoch(self) -> None:
        self.scheduler.step()

    def evaluate(self, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> tuple[list[float], list[float], torch.Tensor]:
        """Each active member's mean loss, accuracy and predictions ``[K, N]`` (CPU)."""
        self.base.eval()
        k = len(self.members)
        loss, accuracy, predicted = evaluate_batches(lambda x: self._logits(self.params, self.normalized(x)), split, batch_size)
        return loss.expand(k).tolist(), accuracy.expand(k).tolist(), predicted.expand(k, -1)

    def position(self, member: int) -> int:
        return self.members.index(member)

    def network_of(self, member: int) -> nn.Module:
        network = copy.deepcopy(self.base).cpu()
        network.load_state_dict(Member(self, member).state_dict())
        return network.eval()

    def trainer_state_of(self, member: int) -> dict[str, Any]:
        """The member's optimizer and lr schedule as a lone AutogradTrainer's ``state_dict``."""
        i = self.position(member)
        state = self.optimizer.state_dict()
        state["state"] = {index: {key: (value[i].clone() if _stacked(value, len(self.members)) else value)
                                  for key, value in entry.items()}
                          for index, entry in state["state"].items()}
        return {"optimizer": state, "lr_scheduler": self.scheduler.state_dict()}

    def drop(self, dropped: list[int]) -> None:
        """Diverged or pruned members leave the stack."""
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


def _stacked(value: Any, k: int) -> bool:
    # An optimizer state entry with one slice per member (not a shared step counter).
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == k


@dataclass
class MemberResult(TrainResult):
    stopped: BaseException | None = None  # TrainingDiverged, or what on_epoch raised


class Member:
    """One member seen as a lone network: its slices of the weights, copied out or in."""

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
    """Train ``configs[i]`` into run ``run_ids[i]``, all at once; a member stops at TrainingDiverged or one of
    ``stops`` raised by ``on_epoch(i, result)``; writes to run i go through ``outboxes[i]`` when given."""
    configs = [c.resolved() for c in configs]
    check_seed_recipe(configs[0], "--batch-trials")  # the stacked loop has no schedule, EMA, augmentation, ...
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
    books = [EpochBookkeeping(  # training/epochs.py says why the loops differ
        Member(stack, m), c, normalizations[m], generator, lambda m=m: stack.trainer_state_of(m), results[m].history,
        BestEpoch(keep_weights=c.keep_best), c.kept_checkpoints(), boxes[m], run_id=results[m].run_id)
        for m, c in enumerate(configs)]
    for epoch in range(1, config.epochs + 1):
        if not stack.members:
            break
        started, lr = time.perf_counter(), stack.optimizer.param_groups[0]["lr"]
        train_losses = stack.train_epoch(train_split, config.batch_size, generator, max_batches=config.max_batches)
        val_losses, val_accuracies, _ = stack.evaluate(val_split)
        stack.end_epoch()
        seconds = time.perf_counter() - started
        stopped = []
        for position, member in enumerate(list(stack.members)):
            result = EpochResult(epoch, train_losses[position], val_losses[position], val_accuracies[position], lr)
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
            box.wait_and_send()  # every member's epochs reach the server before the runs go on (or ServerGone)
    for member in stack.members:
        if config.keep_best:
            patiently(boxes[member], books[member].best.restore, books[member].network, run_id=run_ids[member])
    losses, accuracies, predicted = stack.evaluate(test_split) if stack.members else ([], [], [])
    for position, member in enumerate(stack.members):
        out = results[member]
        out.test_loss, out.test_accuracy = losses[position], accuracies[position]
        out.network = stack.network_of(member)
        patiently(boxes[member], log_test_results, out.test_loss, out.test_accuracy, dataset, predicted[position],
                  normalizations[member], config, run_id=out.run_id)
    return results
