"""What every finished epoch leaves behind (history, best epoch, metrics, checkpoints), for training.train.fit and
each member of training.train_batch.fit_batch. The loops stay two: fit resumes and waits for a server (one failure
ends the run); fit_batch drops a member that diverges or is pruned and never resumes (a study retries the trial).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import mlflow
import torch

from training import checkpoints, tracking
from training.engine import EpochResult, check_finite
from training.outage import Outbox
from training.train_config import TrainConfig
from zoo.normalization import Normalization


class BestEpoch:
    """The epoch with the best validation accuracy, with a copy of its weights when ``keep_weights``."""

    def __init__(self, keep_weights: bool = True) -> None:
        self.epoch, self.val_accuracy, self.state = 0, float("-inf"), None
        self.keep_weights = keep_weights

    def update(self, result: EpochResult, network: Any) -> bool:  # a network, or a train_batch.Member
        if not result.val_accuracy > self.val_accuracy:
            return False
        self.epoch, self.val_accuracy = result.epoch, result.val_accuracy
        if self.keep_weights:
            self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return True

    def restore(self, network: Any, run_id: str | None = None) -> None:
        """Put the best epoch's weights back and log which it was."""
        if self.state is not None:
            network.load_state_dict(self.state)
            mlflow.log_metrics({"best_epoch": self.epoch, "best_val_accuracy": self.val_accuracy}, run_id=run_id)


@dataclass
class EpochBookkeeping:
    """One run's record of its finished epochs."""

    network: Any  # state_dict() and load_state_dict(): a network, or a train_batch.Member
    config: TrainConfig
    normalization: Normalization
    generator: torch.Generator  # the shuffling generator, saved in the ``last`` checkpoint
    trainer_state: Callable[[], dict[str, Any]]  # optimizer and lr scheduler, for the ``last`` checkpoint
    history: list[EpochResult]
    best: BestEpoch
    keep: frozenset[str]  # the checkpoints to keep (training.checkpoints.parse_keep)
    outbox: Outbox | None = None  # keeps the writes while the tracking server is away
    run_id: str | None = None  # None: the active run

    def record(self, result: EpochResult, seconds: float) -> None:
        self.history.append(result)
        improved = self.best.update(result, self.network)

        metrics = {k: v for k, v in asdict(result).items() if k != "epoch"} | {"epoch_seconds": seconds}
        best, outbox = self.best, self.outbox
        resume = {"rng": checkpoints.rng_state(self.generator), "history": [asdict(r) for r in self.history],
                  "best": {"epoch": best.epoch, "val_accuracy": best.val_accuracy},
                  **({"best_model": best.state} if best.state is not None else {})}  # keep_best restores it

        def states() -> dict[str, dict[str, Any]]:
            return checkpoints.states_to_keep(
                self.keep, result.epoch, improved, full=lambda: {**self.weights(result.epoch), **self.trainer_state(), **resume},
                weights=lambda: {**self.weights(result.epoch), "val_accuracy": result.val_accuracy})

        # The metrics, then the checkpoints unless check_finite raises (both or neither), through the outbox if any.
        with checkpoints.interrupts_held():
            if outbox is None:
                mlflow.log_metrics(metrics, step=result.epoch, run_id=self.run_id)
                check_finite(result)
                tracking.log_checkpoints(states(), run_id=self.run_id)
                return
            outbox.add_metrics(metrics, step=result.epoch)
            try:
                check_finite(result)
                outbox.add_checkpoints(states())
            finally:
                outbox.send()

    def weights(self, epoch: int) -> dict[str, Any]:
        """What every checkpoint holds (all the ``best`` one holds)."""
        return {"model": self.network.state_dict(), "epoch": epoch, "args": asdict(self.config),
                "normalization": self.normalization.to_dict()}
