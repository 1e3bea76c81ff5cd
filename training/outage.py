"""Riding out a tracking server or study database that goes away mid-run (a restart, an upgrade): one
tenacity policy (:func:`retrying`) waits up to ``--tracking-timeout`` with one line when it goes and one when
it is back; past the bound, :class:`tracking.ServerGone` says what to do next. :class:`Outbox` keeps a run's
epochs on local disk meanwhile (MLflow's async logging would drop a failed batch) and sends them in order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import mlflow
import tenacity

from training import tracking
from training.tracking import ServerGone
from zoo.errors import UsageError
from zoo.machine import cache_dir

TIMEOUT_ENV = "ZOO_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a server restart or upgrade takes seconds to minutes
PENDING = "pending.json"
T = TypeVar("T")


def retrying(bound_s: float, retry_on: Callable[[BaseException], bool],
             went_away: Callable[[BaseException], Any] | None = None, wait_s: float = 2.0) -> tenacity.Retrying:
    """The one waiting policy: retry what ``retry_on`` accepts every ``wait_s`` for up to ``bound_s``, then raise."""
    def before_sleep(state: tenacity.RetryCallState) -> None:
        if went_away is not None and state.attempt_number == 1:
            went_away(state.outcome.exception())

    return tenacity.Retrying(stop=tenacity.stop_after_delay(max(0.0, bound_s)), wait=tenacity.wait_fixed(wait_s),
                             retry=tenacity.retry_if_exception(retry_on), before_sleep=before_sleep, reraise=True)


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_S)
    with suppress(ValueError):
        if (value := float(raw)) >= 0:
            return value
    raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not valid: give the seconds to wait for a tracking server "
                     f"that goes away mid-run, a number >= 0 (default {DEFAULT_TIMEOUT_S:g})")


def local_checkpoint(run_id: str) -> Path | None:
    """The run's last checkpoint kept on this machine until the server holds it, or None."""
    path = cache_dir("runs", run_id) / tracking.CHECKPOINTS / "last.pt"
    return path if path.is_file() else None


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` or what it wraps says the server did not answer (refused, reset, timed out, 5xx)."""
    from requests.exceptions import ConnectionError as Refused, RetryError, Timeout

    while exc is not None and not isinstance(exc, ServerGone):
        if isinstance(exc, (Refused, Timeout, RetryError, ConnectionError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Patience:
    """Calls to a server (``what``, by default the tracking server) that wait for it when it stops answering, with
    one line when it does and one when it is back; past the bound, ServerGone whose line ends with ``then``."""

    back_note = ""

    def __init__(self, timeout_s: float | None = None, then: str = "run the same command again",
                 what: str | None = None) -> None:
        if what is None:
            parts = urlsplit(mlflow.get_tracking_uri())
            what = f"the MLflow tracking server at {parts.scheme}://{parts.hostname}" + (
                f":{parts.port}" if parts.port else "")
        self.what, self.then = what, then
        self.timeout_s = timeout_from_env() if timeout_s is None else timeout_s
        self.away_since: float | None = None
        self.back_at = -float("inf")
        self._state = threading.Lock()  # a study's threads share its database's outage

    def went_away(self, exc: BaseException) -> None:
        with self._state:
            if self.away_since is not None:
                return
            self.away_since = time.monotonic()
        errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        first = str(exc).strip().partition("\n")[0]
        reason = errno.group(1) if errno else first if 0 < len(first) <= 160 else type(exc).__name__
        self.say(f"zoo: {self.what} stopped answering ({reason}); {self.waiting()}")

    def waiting(self) -> str:
        return f"waiting for it up to {self.timeout_s:g} s (--tracking-timeout)"

    def came_back(self) -> None:
        with self._state:
            if self.away_since is None:
                return
            away, self.away_since, self.back_at = time.monotonic() - self.away_since, None, time.monotonic()
        self.say(f"zoo: {self.what} answers again after {away:.0f} s{self.back_note}")

    def bound_left(self) -> float:
        return self.timeout_s - (0.0 if self.away_since is None else time.monotonic() - self.away_since)

    @staticmethod
    def say(line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # above a progress bar, not through it

    def patiently(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.within(self.bound_left(), call, *args, **kwargs)

    def within(self, bound_s: float, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            result = retrying(bound_s, unreachable, self.went_away)(call, *args, **kwargs)
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.went_away(exc)
            raise ServerGone(self.gone_message()) from None
        self.came_back()
        return result

    def gone_message(self) -> str:
        return f"{self.what} did not answer for {self.timeout_s:g} s (--tracking-timeout); once it is back, {self.then}"


class Outbox(Patience):
    """One run's epoch results kept on local disk until the tracking server holds them. ``then``: what to do
    past the bound (default: ``zoo train --resume RUN_ID``)."""

    back_note = "; what was kept has been sent"

    def __init__(self, run_id: str, timeout_s: float | None = None, then: str | None = None) -> None:
        super().__init__(timeout_s, then or "")
        self.run_id = run_id
        self.folder = cache_dir("runs", run_id)
        self.epoch = 0
        path = self.folder / PENDING
        pending = json.loads(path.read_text()) if path.is_file() else {}
        self.metrics: list[dict[str, Any]] = pending.get("metrics", [])
        self.checkpoints: list[str] = pending.get("checkpoints", [])

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
        """Send what is pending if the server answers now; keep it otherwise (ServerGone past the bound)."""
        if not self.pending:
            return
        try:
            if self.away_since is not None:
                tracking.check_tracking_server()  # cheaper than a send that fails
            self.within(0.0, self._send_pending)
        except (ServerGone, ConnectionError):
            if self.bound_left() < 0:
                raise ServerGone(self.gone_message()) from None

    def wait_and_send(self) -> None:
        if self.pending:
            self.patiently(self._send_pending)

    def _send_pending(self) -> None:
        tracking.log_metric_records(self.run_id, self.metrics)  # metrics first: a checkpoint never runs ahead
        self.metrics = []
        self._write_pending()
        tracking.upload_checkpoints(self.run_id, self.folder / tracking.CHECKPOINTS, self.checkpoints)
        self.checkpoints = []
        self._write_pending()

    def close(self) -> None:
        if not self.pending:
            self.discard()

    def discard(self) -> None:
        """The local folder goes, sent or not (a failed study trial is retried, never resumed)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def pending(self) -> bool:
        return bool(self.metrics or self.checkpoints)

    def waiting(self) -> str:
        return (f"training goes on and keeps what it logs in {self.folder} until the server is back, waiting up to "
                f"{self.timeout_s:g} s (--tracking-timeout)")

    def gone_message(self) -> str:
        if self.then:
            return super().gone_message()
        checkpoint = local_checkpoint(self.run_id)
        kept = f"its checkpoint kept at {checkpoint}" if checkpoint else f"what it logged kept in {self.folder}"
        if checkpoint is None:
            epoch = self.epoch
        else:
            import torch

            epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
        return (f"{self.what} did not answer for {self.timeout_s:g} s (--tracking-timeout): run {self.run_id} stopped "
                f"after epoch {epoch}, {kept}; once the server is back, finish the run with: "
                f"zoo train --resume {self.run_id}")

    def _write_pending(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / PENDING
        temporary = path.with_suffix(".tmp")  # replaced in one step: a kill never leaves half a file
        temporary.write_text(json.dumps({"metrics": self.metrics, "checkpoints": self.checkpoints}))
        temporary.replace(path)
