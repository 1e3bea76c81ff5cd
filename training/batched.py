"""K copies of one network trained at once, each under its own input normalization (``--batch-trials``).

A study's trials differ only in their normalization: same network, initial weights (seed), optimizer and
shuffled batches. So the K weight sets are stacked along a new first dimension, the network runs on the K
normalized copies of a batch through ``torch.func.vmap`` + ``functional_call``, and one optimizer steps the
stack: every optimizer here updates each weight from its own gradient and state, so it is K independent
ones, and summing the members' losses only joins their graphs for one ``backward``. Dropout draws one mask
per batch (``randomness="same"``), the one a lone trial would draw. A member that diverges or is pruned
leaves the stack at the end of the epoch. On a CPU the batched convolutions run slower than K separate
ones (benchmarks/RESULTS.md); on a GPU K small networks fill the device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from training.engine import EVAL_BATCH_SIZE, batches, evaluate_batches, make_optimizer, summed_loss
from zoo.data import Split
from zoo.normalization import Normalization
from zoo.errors import UsageError


def check_batchable(network: nn.Module, trainer: str, name: str) -> None:
    """Refuse networks the stacked computation cannot train like a lone one, saying why."""
    if trainer != "autograd":
        raise UsageError(f"--batch-trials trains with autograd; {name} has its own {trainer!r} trainer: "
                         "run it without --batch-trials")
    if any(True for _ in network.buffers()):
        raise UsageError(f"--batch-trials needs a network without buffers (batch norm running statistics); "
                         f"{name} has some: run it without --batch-trials")


class StackedTrials:
    """K members: stacked weights, their normalizations, one optimizer and one lr schedule.

    ``members`` are the indices (0..K-1, in the order given) of the members still trained.
    """

    def __init__(self, network: nn.Module, normalizations: list[Normalization], *, optimizer: str, lr: float,
                 gamma: float, weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        self.base = network  # its own weights are only the starting point every member copies
        self.members = list(range(len(normalizations)))
        self.normalizations = list(normalizations)
        k = len(normalizations)
        self.params = {name: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_()
                       for name, p in network.named_parameters()}
        self._settings = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        self.optimizer = make_optimizer(params=list(self.params.values()), name=optimizer, lr=lr,
                                        weight_decay=weight_decay, momentum=momentum)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=gamma)
        self._stats = self._normalization_stats()

        self._logits = vmap(lambda params, x: functional_call(self.base, params, (x,)), randomness="same")

    def _normalization_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(iter(self.params.values())).device
        active = [self.normalizations[m] for m in self.members]
        mean = torch.tensor([n.mean for n in active], device=device).view(len(active), 1, -1, 1, 1)
        std = torch.tensor([n.std for n in active], device=device).view(len(active), 1, -1, 1, 1)
        return mean, std

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

    def state_dict_of(self, member: int) -> dict[str, torch.Tensor]:
        """The member's weights as its lone network's ``state_dict`` (copies)."""
        i = self.position(member)
        return {name: p[i].detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def load_state_of(self, member: int, state: dict[str, torch.Tensor]) -> None:
        """Put a lone network's weights (e.g. its best epoch's) into the member's slice."""
        i = self.position(member)
        for name, p in self.params.items():
            p[i].copy_(state[name])

    def network_of(self, member: int) -> nn.Module:
        """A lone network holding the member's weights (on the CPU, in eval mode)."""
        import copy

        network = copy.deepcopy(self.base).cpu()
        network.load_state_dict(self.state_dict_of(member))
        return network.eval()

    def trainer_state_of(self, member: int) -> dict[str, Any]:
        """The member's optimizer and lr schedule as its lone trainer's ``state_dict`` (training.trainers)."""
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
        settings = self._settings
        self.optimizer = make_optimizer(params=list(self.params.values()), name=settings["optimizer"],
                                        lr=settings["lr"], weight_decay=settings["weight_decay"],
                                        momentum=settings["momentum"])
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.0)
        self.scheduler.load_state_dict(scheduler_state)
        self._stats = self._normalization_stats()


def _stacked(value: Any, k: int) -> bool:
    """An optimizer state entry that holds one slice per member (not a shared step counter)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == k
