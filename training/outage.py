"""Riding out a tracking server that goes away in the middle of a run (a restart, an upgrade).

zoo keeps MLflow's HTTP retries short (zoo/cli/main.py), and ``tracking.check_tracking_server``
fails in seconds when the server is down before anything is logged. Once a run has started,
a server that stops answering is waited for instead, up to a bound (``--tracking-timeout``,
``ZOO_TRACKING_TIMEOUT``, default 10 minutes), with one line on stderr when it goes away and
one when it is back:

- each epoch's checkpoints are written to the run's local folder (:func:`local_run_dir`) and its
  metrics recorded there (``pending.json``) before they are sent; while the server is away they
  stay there and training goes on; once it answers they are sent in order, the metrics with
  MLflow's ``log_batch``, each with the timestamp it was first given;
- what follows training (test metrics, figures, the model) waits for the server; the model is
  logged and registered once however often that is retried (``tracking.log_model``);
- past the bound, :class:`tracking.ServerGone`: the local folder is kept and
  ``zoo train --resume RUN_ID`` reads its checkpoint and sends its metrics.

:class:`Patience` is the waiting alone, for calls that keep nothing locally (a study's parent
run, a trial's start and end); :class:`Outbox` adds a run's epoch results kept on disk.

What MLflow does not cover, and why this module exists: its asynchronous logging
(``synchronous=False``) sends from a background thread, but a batch whose request fails is
logged as an error and dropped (``AsyncLoggingQueue``), and artifacts have no asynchronous
path at all; its HTTP retries (urllib3) block the caller and then give up. What it does cover
is used: resending a metric it already holds is harmless (its SQL store drops an exact
duplicate), so a batch whose answer was lost in the outage is still logged once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from training import tracking
from training.tracking import ServerGone
from zoo.errors import UsageError
from zoo.machine import cache_dir

TIMEOUT_ENV = "ZOO_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a server restart or upgrade takes seconds to minutes
POLL_S = 2.0  # how often a waiting command asks whether the server is back
PENDING = "pending.json"
T = TypeVar("T")


def timeout_from_env() -> float:
    """The bound on waiting for the tracking server, from ZOO_TRACKING_TIMEOUT (seconds), else 10 minutes."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not valid: give the seconds to wait for a tracking server "
                         f"that goes away mid-run, a number >= 0 (default {DEFAULT_TIMEOUT_S:g})")
    return value


def local_run_dir(run_id: str) -> Path:
    """Where a run's checkpoints and unsent metrics live on this machine until the server holds them."""
    return cache_dir("runs", run_id)


def local_checkpoint(run_id: str, name: str = "last") -> Path | None:
    """The run's checkpoint ``name`` kept on this machine, or None."""
    path = local_run_dir(run_id) / tracking.CHECKPOINTS / f"{name}.pt"
    return path if path.is_file() else None


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server did not answer (refused, reset, timed out, 5xx while
    it restarts), rather than that it answered with an error. MLflow wraps these in an MlflowException
    whose cause or context is the requests error."""
    import requests

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
             ConnectionError)
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ServerGone):
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def server_answers() -> bool:
    try:
        tracking.check_tracking_server()
    except ConnectionError:
        return False
    return True


def say(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)  # above a progress bar, not through it


class Patience:
    """Calls to the tracking server that wait for it when it stops answering, up to the bound
    (``timeout_s``), with one line on stderr when it goes away and one when it is back. Past the
    bound, :class:`ServerGone`, whose line ends with ``then`` (what to do once the server is back).

    A study uses one for its parent run's writes and each trial's start and end; :class:`Outbox`
    adds a run's epoch results kept on local disk."""

    def __init__(self, timeout_s: float | None = None, then: str = "run the same command again") -> None:
        self.timeout_s = timeout_from_env() if timeout_s is None else timeout_s
        self.then = then
        self.away_since: float | None = None

    def patiently(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)``, called again once the server is back if it did not answer."""
        while True:
            answered, result = self._attempt(call, *args, **kwargs)
            if answered:
                return result
            self._wait_for_server()

    def _attempt(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[bool, T | None]:
        """(True, what ``call`` returned), or (False, None) when the server did not answer (the outage noted);
        any other error is raised."""
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._went_away(exc)
            return False, None
        self._came_back()
        return True, result

    # --- the outage -----------------------------------------------------------------------------
    def _went_away(self, exc: BaseException) -> None:
        if self.away_since is not None:
            return
        self.away_since = time.monotonic()
        errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        say(self._away_line(errno.group(1) if errno else type(exc).__name__))

    def _away_line(self, reason: str) -> str:
        return (f"zoo: the MLflow tracking server at {_server()} stopped answering ({reason}); waiting for it "
                f"up to {self.timeout_s:g} s (--tracking-timeout)")

    def _came_back(self) -> None:
        if self.away_since is None:
            return
        say(f"zoo: the MLflow tracking server at {_server()} answers again after "
            f"{time.monotonic() - self.away_since:.0f} s{self._back_note()}")
        self.away_since = None

    def _back_note(self) -> str:
        return ""

    def _wait_for_server(self) -> None:
        while not server_answers():
            self._check_bound()
            time.sleep(POLL_S)

    def _check_bound(self) -> None:
        if self.away_since is not None and time.monotonic() - self.away_since > self.timeout_s:
            raise ServerGone(self._gone_message())

    def _gone_message(self) -> str:
        return (f"the MLflow tracking server at {_server()} did not answer for {self.timeout_s:g} s "
                f"(--tracking-timeout); once it is back, {self.then}")


class Outbox(Patience):
    """One run's epoch results on their way to the tracking server, kept on local disk until it holds them.

    ``then``: what the line past the bound says to do (default: ``zoo train --resume RUN_ID``, which
    reads the kept checkpoint); a study trial, which is retried rather than resumed, gives its own."""

    def __init__(self, run_id: str, timeout_s: float | None = None, then: str | None = None) -> None:
        super().__init__(timeout_s, then or "")
        self.run_id = run_id
        self.folder = local_run_dir(run_id)
        self.epoch = 0
        pending = self._read_pending()
        self.metrics: list[dict[str, Any]] = pending.get("metrics", [])
        self.checkpoints: list[str] = pending.get("checkpoints", [])

    # --- an epoch's results -------------------------------------------------------------------
    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)  # kept with the record: a resend is then an exact duplicate
        self.metrics += [{"key": k, "value": float(v), "timestamp": timestamp, "step": step} for k, v in metrics.items()]
        self.epoch = max(self.epoch, step)
        self._write_pending()

    def add_checkpoints(self, states: dict[str, dict[str, Any]]) -> None:
        tracking.write_checkpoints(states, self.folder / tracking.CHECKPOINTS)
        self.checkpoints += [name for name in states if name not in self.checkpoints]
        self._write_pending()

    def send(self) -> None:
        """Send what is pending if the server answers; keep it otherwise (ServerGone past the bound)."""
        if not self.pending:
            return
        if self.away_since is not None and not server_answers():
            self._check_bound()
            return
        if not self._attempt(self._send_pending)[0]:
            self._check_bound()

    def _send_pending(self) -> None:
        tracking.log_metric_records(self.run_id, self.metrics)  # metrics first: a checkpoint never runs ahead
        self.metrics = []
        self._write_pending()
        tracking.upload_checkpoints(self.run_id, self.folder / tracking.CHECKPOINTS, self.checkpoints)
        self.checkpoints = []
        self._write_pending()

    def wait_and_send(self) -> None:
        """Block until everything pending is sent, or raise ServerGone past the bound."""
        self.send()
        while self.pending:
            time.sleep(POLL_S)
            self.send()

    def close(self) -> None:
        """The run is over and the server holds everything: the local folder goes."""
        if not self.pending:
            self.discard()

    def discard(self) -> None:
        """The local folder goes, sent or not (a study trial that failed is retried, never resumed)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def pending(self) -> bool:
        return bool(self.metrics or self.checkpoints)

    # --- the outage -----------------------------------------------------------------------------
    def _away_line(self, reason: str) -> str:
        return (f"zoo: the MLflow tracking server at {_server()} stopped answering ({reason}); training goes on and "
                f"keeps what it logs in {self.folder} until the server is back, waiting up to {self.timeout_s:g} s "
                f"(--tracking-timeout)")

    def _back_note(self) -> str:
        return "; what was kept has been sent"

    def _gone_message(self) -> str:
        if self.then:
            return super()._gone_message()
        checkpoint = local_checkpoint(self.run_id)
        kept = f"its checkpoint kept at {checkpoint}" if checkpoint else f"what it logged kept in {self.folder}"
        return (f"the MLflow tracking server at {_server()} did not answer for {self.timeout_s:g} s (--tracking-timeout): "
                f"run {self.run_id} stopped after epoch {self._last_epoch(checkpoint)}, {kept}; once the server is back, "
                f"finish the run with: zoo train --resume {self.run_id}")

    def _last_epoch(self, checkpoint: Path | None) -> int:
        if checkpoint is None:
            return self.epoch
        import torch

        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])

    # --- on disk --------------------------------------------------------------------------------
    def _read_pending(self) -> dict[str, Any]:
        path = self.folder / PENDING
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_pending(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / PENDING
        temporary = path.with_suffix(".tmp")  # replaced in one step: a kill never leaves half a file
        temporary.write_text(json.dumps({"metrics": self.metrics, "checkpoints": self.checkpoints}))
        temporary.replace(path)


def _server() -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(tracking.tracking_uri())
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
