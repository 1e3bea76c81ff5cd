"""What a training run's checkpoints hold, which ones are kept, and stopping a run cleanly.

Keep policy (``zoo train --keep-checkpoints``, a comma-separated list):

- ``last``: ``checkpoints/last.pt``, everything ``zoo train --resume`` needs (weights, optimizer,
  lr scheduler, the RNG states behind shuffling and dropout, epoch, config, metric history),
  overwritten every epoch;
- ``best``: ``checkpoints/best.pt``, the weights alone of the epoch with the best validation
  accuracy, overwritten when an epoch beats it;
- ``all``: ``last`` and ``best`` plus every epoch's full checkpoint as ``checkpoints/epoch_NNN.pt``;
- ``none``: nothing (the run cannot be resumed).

Fixed names that are logged again rather than deleted work with every artifact store.
Ctrl-C and SIGTERM take the same path (KeyboardInterrupt); they are held back while an
epoch's metrics and checkpoints are written, so a stop never leaves a torn checkpoint.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from training import tracking
from zoo.errors import UsageError

LAST, BEST, EPOCHS = "last", "best", "epochs"
KEEP_CHOICES = ("last", "best", "all", "none")
DEFAULT_KEEP = "last,best"


def parse_keep(value: str) -> frozenset[str]:
    """``"last,best"`` -> {"last", "best"}; ``"all"`` adds every epoch; ``"none"`` keeps nothing."""
    parts = {p.strip().lower() for p in value.split(",") if p.strip()}
    if not parts or not parts <= set(KEEP_CHOICES) or ("none" in parts and len(parts) > 1):
        raise UsageError(f"--keep-checkpoints {value!r} is not valid: give last, best, all or none, or a "
                         f"comma-separated list such as {DEFAULT_KEEP} (the default); see zoo train --help")
    if "all" in parts:
        return frozenset({LAST, BEST, EPOCHS})
    return frozenset(parts - {"none"})


def checkpoint_path(name: str) -> str:
    """The artifact path of checkpoint ``name`` (last, best, epoch_003) in a run."""
    return f"{tracking.CHECKPOINTS}/{name}.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The RNG states a resumed run needs to draw the same batches and dropout masks."""
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def states_to_keep(keep: frozenset[str], epoch: int, improved: bool, full: Callable[[], dict[str, Any]],
                   weights: Callable[[], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{name: state}`` of the checkpoints ``keep`` asks for after ``epoch`` (``improved``: its val accuracy is the
    best so far), to log with ``tracking.log_checkpoints``."""
    states: dict[str, dict[str, Any]] = {}
    if keep & {LAST, EPOCHS}:
        state = full()
        if LAST in keep:
            states[LAST] = state
        if EPOCHS in keep:
            states[f"epoch_{epoch:03d}"] = state
    if BEST in keep and improved:
        states[BEST] = weights()
    return states


def _in_main_thread() -> bool:
    # Signal handlers can only be set there; study trials in worker threads go without.
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a scheduler's time limit, docker stop) takes Ctrl-C's path: the run ends KILLED,
    its checkpoints kept."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while an epoch's metrics and checkpoints are written; raise
    KeyboardInterrupt once they are, so the run never has metrics its checkpoint lacks."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)
