"""Which checkpoints a run keeps (--keep-checkpoints: ``last``, all --resume needs, overwritten every
epoch; ``best``, the best validation epoch's weights; ``all``, both plus ``epoch_NNN.pt``; ``none``), who
trains a run, and stopping cleanly: SIGTERM acts as Ctrl-C, both held while an epoch is written."""

from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from training import tracking
from zoo.errors import UsageError

LAST, BEST, EPOCHS = "last", "best", "epochs"
WORKER_TAG = "zoo.worker"  # HOST:PID of the process that trains the run (zoo train, a study trial)
# When that process started (clock ticks after boot): a dead process's PID goes to a later one.
WORKER_START_TAG = "zoo.worker_start"
KEEP_CHOICES = ("last", "best", "all", "none")
DEFAULT_KEEP = "last,best"


def parse_keep(value: str) -> frozenset[str]:
    parts = {p.strip().lower() for p in value.split(",") if p.strip()}
    if not parts or not parts <= set(KEEP_CHOICES) or ("none" in parts and len(parts) > 1):
        raise UsageError(f"--keep-checkpoints {value!r} is not valid: give last, best, all or none, or a "
                         f"comma-separated list such as {DEFAULT_KEEP} (the default); see zoo train --help")
    return frozenset({LAST, BEST, EPOCHS} if "all" in parts else parts - {"none"})


def checkpoint_path(name: str) -> str:  # last, best, epoch_003
    return f"{tracking.CHECKPOINTS}/{name}.pt"


def worker_tags() -> dict[str, str]:
    started = process_start(os.getpid())
    return {WORKER_TAG: f"{socket.gethostname()}:{os.getpid()}", **({WORKER_START_TAG: started} if started else {})}


def process_start(pid: int) -> str | None:
    """Process ``pid``'s starttime (/proc/PID/stat), or None."""
    with suppress(OSError):  # field 22; the command name, spaces and all, ends at ")"
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[22 - 3]
    return None


def worker_alive_here(worker: str | None, started: str | None = None) -> bool:
    """Whether ``worker`` (WORKER_TAG) is another live process on this machine, started when ``started`` says."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    if started and process_start(int(pid)) not in (None, started):
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def rng_state(generator: torch.Generator) -> dict[str, Any]:
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
    """``{name: state}`` of the checkpoints ``keep`` asks for after ``epoch``."""
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


@contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: Callable) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, on the main thread only (Python allows no other)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in signals} if main else {}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """SIGTERM (kill, a scheduler's time limit) takes Ctrl-C's path: the run ends KILLED, checkpoints kept."""
    return _handling((signal.SIGTERM,), signal.default_int_handler)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while an epoch's metrics and checkpoints are written."""
    received: list[int] = []
    with _handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)
