"""Riding out a restart of a study's database server (PostgreSQL, MySQL) in the middle of a study.

SQLAlchemy's ``pool_pre_ping`` (on in :func:`training.study.storage.make_storage`) replaces a pooled
connection the restart closed, but only if a new one can be made: while the server is down,
every storage call (a trial's heartbeat, ``ask``, ``tell``, the lock) would fail at once. Here
a new connection waits for the server instead, up to a bound (``--tracking-timeout``, the
same as for the MLflow server), with one line on stderr when it goes away and one when it is back.

What this does not cover: a statement already running on the server at the instant it stops
fails. The calls that may simply be made again (reads, attributes, the heartbeat) are retried
(:class:`PatientRDBStorage`); ``ask`` and ``tell`` are not, since a commit whose answer was
lost may have happened.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, TypeVar

from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from training.outage import say
from zoo.access import masked_url

RETRY_S = 1.0  # how often a waiting connection tries the database again
T = TypeVar("T")

_state = threading.Lock()
_away_since: float | None = None  # this process saw the database go away (time.monotonic())
_back_at = -float("inf")  # ... and come back


def recently_back(seconds: float) -> bool:
    """Whether this process saw the database come back less than ``seconds`` ago: a trial's heartbeat
    missed during the outage is not yet a sign that its process died."""
    return time.monotonic() - _back_at < seconds or _away_since is not None


def wait_for_database(engine: Engine, wait_s: float) -> None:
    """New connections of ``engine`` wait up to ``wait_s`` for a database server that does not answer."""
    where = masked_url(engine.url.render_as_string(hide_password=False))

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: tuple, cparams: dict) -> Any:
        first_failure = None
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                first_failure = first_failure or time.monotonic()
                if time.monotonic() - first_failure > wait_s:
                    raise
                _went_away(where, exc, wait_s)
                time.sleep(RETRY_S)
                continue
            _came_back(where)
            return connection


def _went_away(where: str, exc: BaseException, wait_s: float) -> None:
    global _away_since
    with _state:
        if _away_since is not None:
            return
        _away_since = time.monotonic()
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    say(f"zoo: the study's database at {where} stopped answering ({reason}); waiting for it up to {wait_s:g} s "
        "(--tracking-timeout)")


def _came_back(where: str) -> None:
    global _away_since, _back_at
    with _state:
        if _away_since is None:
            return
        away, _away_since, _back_at = time.monotonic() - _away_since, None, time.monotonic()
    say(f"zoo: the study's database at {where} answers again after {away:.0f} s")


def _retried(call: Callable[..., T], wait_s: Callable[[Any], float]) -> Callable[..., T]:
    """``call``, made again when the database dropped the connection under it (the next attempt
    reconnects, waiting for the server), for up to ``wait_s(storage)`` seconds."""

    @functools.wraps(call)
    def retried(self: Any, *args: Any, **kwargs: Any) -> T:
        started = time.monotonic()
        while True:
            try:
                return call(self, *args, **kwargs)
            except (StorageInternalError, OperationalError) as exc:
                dropped = isinstance(exc, OperationalError) or isinstance(exc.__cause__, OperationalError)
                if not dropped or time.monotonic() - started > wait_s(self):
                    raise
                time.sleep(RETRY_S)

    return retried


# Calls that may be made twice with the same effect: reads, attributes set to a value, the heartbeat.
REPEATABLE = ("record_heartbeat", "get_all_trials", "get_trial", "get_study_user_attrs", "get_study_system_attrs",
              "set_trial_user_attr", "set_trial_system_attr", "set_trial_intermediate_value", "_get_stale_trial_ids",
              "get_study_id_from_name", "get_trial_id_from_study_id_trial_number", "get_best_trial")


class PatientRDBStorage(RDBStorage):
    """Optuna's RDB storage whose connections wait for a database that restarts (:func:`wait_for_database`),
    and whose repeatable calls are retried when a restart cut them off."""

    def __init__(self, url: str, *, wait_s: float, **kwargs: Any) -> None:
        self.wait_s = wait_s
        super().__init__(url, **kwargs)
        wait_for_database(self.engine, wait_s)


for _name in REPEATABLE:
    setattr(PatientRDBStorage, _name, _retried(getattr(RDBStorage, _name), lambda storage: storage.wait_s))
