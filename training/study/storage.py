"""Where a study is stored and locked: its Optuna storage (SQLite or a database server), the lock over
every worker (StudyLock), opening the study and the search it stores, and ending the runs of trials
whose process died (heartbeats)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import quote

import optuna
from alembic.util import CommandError as AlembicCommandError
from mlflow import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from training import tracking
from training.outage import timeout_from_env, unreachable
from training.study.config import CONFIG_ATTR, OBJECTIVE_NAME, RUN_ATTR, StudyConfig, is_finished, make_sampler
from training.study.storage_outage import PatientRDBStorage, recently_back, wait_for_database
from zoo.access import masked_url, storage_refused_hint
from zoo.errors import UsageError


STORAGE_DIALECTS = ("sqlite", "postgresql", "mysql")  # those StudyLock can lock
DB_CONNECT_TIMEOUT_S = 5  # PostgreSQL connect timeout (psycopg's connect_timeout)



def absolute_storage_url(url: str) -> str:
    """``sqlite:///optuna.db`` as ``sqlite:////FOLDER/optuna.db``, FOLDER the current one: the study then records,
    and its ``--jobs`` workers open, a URL that names the same file from any folder (``optuna-dashboard URL``
    started elsewhere would otherwise create an empty database there). A re-run from another folder with the
    same relative URL still means that folder's file, as SQLite has it. Other URLs are returned as written:
    database servers, an absolute or in-memory SQLite database, SQLite's ``file:`` URIs (``?uri=true``)."""
    try:
        parsed = make_url(url) if "://" in url else None
    except (ArgumentError, ValueError):
        parsed = None  # not a URL: make_storage says what is wrong with it
    if (parsed is None or parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:")
            or os.path.isabs(parsed.database) or parsed.query.get("uri") == "true"):
        return url
    scheme, _, written = url.partition(":///")
    query = written.partition("?")[2]
    return f"{scheme}:///{quote(os.path.abspath(parsed.database))}" + (f"?{query}" if query else "")


def make_storage(url: str, heartbeat: int, wait_s: float | None = None) -> RDBStorage:
    """RDB storage with heartbeats: trials of a dead process are failed, their runs ended, and retried once.
    A database server that restarts is waited for up to ``wait_s`` (default: ZOO_TRACKING_TIMEOUT, else
    600 s; see training/study/storage_outage.py)."""
    if "://" not in url or make_url(url).get_backend_name() not in STORAGE_DIALECTS:
        raise UsageError(f"--storage must be a database URL such as sqlite:///optuna.db (one machine) or "
                         f"postgresql://USER@HOST:PORT/DB (several), got {masked_url(url) if '://' in url else url!r}")
    # Several threads and processes write one SQLite file: wait for its lock instead of failing.
    # A database server that does not answer fails in DB_CONNECT_TIMEOUT_S instead of the OS's minutes.
    engine_kwargs = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite") else
                     {"pool_pre_ping": True, "connect_args": {"connect_timeout": DB_CONNECT_TIMEOUT_S}})
    if not url.startswith("sqlite"):
        check_database_server(url, engine_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        _end_orphaned_run(trial)
        retry(study, trial)

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if url.startswith("sqlite"):  # a file: nothing restarts
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                  heartbeat_stale_trial_callback=on_stale_trial)
            return PatientRDBStorage(url, wait_s=timeout_from_env() if wait_s is None else wait_s,
                                     engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                     heartbeat_stale_trial_callback=on_stale_trial)

    for attempt in range(4):
        try:
            return connect()
        except (SQLAlchemyError, AlembicCommandError):
            # Processes started together on a fresh database race to create its schema:
            # the losers retry once the winner's tables exist.
            time.sleep(1.0 + attempt)
    return connect()


def check_database_server(url: str, engine_kwargs: dict[str, Any]) -> None:
    """One connection attempt, so an unreachable server fails at once with one line (not after the schema retries)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    engine = create_engine(url, **engine_kwargs)
    try:
        engine.connect().close()
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        if hint := storage_refused_hint(reason):
            raise PermissionError(f"the Optuna storage {masked_url(url)} refused the login ({reason}): {hint}") from None
        raise ConnectionError(f"cannot reach the Optuna storage {masked_url(url)} ({reason}): check that the database "
                              "server runs there and accepts connections, or fix --storage / ZOO_OPTUNA_STORAGE") from None
    finally:
        engine.dispose()


class StudyLock:
    """A lock over every thread, process and machine working on one study, held in its storage.

    PostgreSQL: a session advisory lock (released by the server if the holder dies); MySQL:
    ``GET_LOCK``; SQLite (one machine): ``flock`` on a file beside the database. Taken only for
    short bookkeeping (claiming a trial slot, naming the parent run, the final summary), never
    while a trial trains.
    """

    def __init__(self, url: str, study_name: str, wait_s: float | None = None) -> None:
        """``wait_s``: how long taking the lock waits for a database server that restarts (None: not at all)."""
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.key = int.from_bytes(hashlib.sha256(f"zoo-study:{study_name}".encode()).digest()[:8], "big", signed=True)
        self.name = f"zoo-study:{study_name}"[:64]
        self.threads = threading.Lock()  # flock and advisory locks are per connection, not per thread
        self.engine = None if self.dialect == "sqlite" else create_engine(url, pool_pre_ping=True)
        database = parsed.database if self.dialect == "sqlite" else None
        self.path = f"{database}.zoo-lock" if database and database != ":memory:" else None
        if self.engine is not None and wait_s is not None:
            wait_for_database(self.engine, wait_s)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.threads:
            if self.dialect == "sqlite":
                with self._file_lock():
                    yield
            else:
                take, give = (("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
                              if self.dialect == "postgresql" else
                              ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"))
                with self.engine.connect() as connection:
                    connection.execute(text(take), {"key": self.key, "name": self.name})
                    try:
                        yield
                    finally:
                        self._release(connection, give)

    def _release(self, connection: Any, give: str) -> None:
        try:
            connection.execute(text(give), {"key": self.key, "name": self.name})
            connection.commit()
        except OperationalError:
            pass  # the database restarted under us: the lock ended with the session that held it

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self.path is None:  # an in-memory database lives in this process only
            yield
            return
        with open(self.path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)



def open_study(config: StudyConfig, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study or load it; returns (study, created). The database's unique study
    name makes exactly one of several processes started at once the creator."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if config.prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(storage=storage, study_name=config.name, direction="maximize",
                                    sampler=make_sampler(config.sampler, config.seed), pruner=pruner)
        # Kept out of the user attributes, which `optuna studies` prints whole in one table cell.
        storage.set_study_system_attr(study._study_id, CONFIG_ATTR, config.identity())
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and the only way to name it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE_NAME])
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        # Same seed in every process would make them sample the same points: vary it.
        seed = (config.seed * 1_000_003 + os.getpid() + time.time_ns()) % 2**32
        study = optuna.load_study(study_name=config.name, storage=storage,
                                  sampler=make_sampler(config.sampler, seed), pruner=pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UsageError(f"study {config.name!r} minimizes; a normalization study maximizes accuracy. "
                         "Use another --study-name.")
    check_same_search(study, config)
    return study, False


def stored_search(study: optuna.Study) -> dict[str, Any] | None:
    """What the study searches, as its creator stored it (a user attribute in studies made before 2026-11-30)."""
    stored = study._storage.get_study_system_attrs(study._study_id).get(CONFIG_ATTR)
    return stored if stored is not None else study.user_attrs.get(CONFIG_ATTR)


def check_same_search(study: optuna.Study, config: StudyConfig) -> None:
    stored = stored_search(study)
    if stored is None:
        return  # its creator has not written it yet, or it was not made by zoo
    differing = {k: (stored.get(k), v) for k, v in config.identity().items() if stored.get(k) != v}
    if differing:
        what = "; ".join(f"{k}: study has {old}, command has {new}" for k, (old, new) in differing.items())
        raise UsageError(f"study {config.name!r} was created with other settings ({what}). "
                         "Repeat its settings to resume it, or use another --study-name.")



def _end_orphaned_run(trial: FrozenTrial) -> None:
    """A trial failed by Optuna because its process died left its child run RUNNING: end it KILLED."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    try:
        if run_id and MlflowClient().get_run(run_id).info.status == "RUNNING":
            tracking.end_run_by_id(run_id, "KILLED", f"trial {trial.number}'s process died (no Optuna heartbeat); "
                                                     "the trial was failed and retried")
    except Exception as exc:
        if not unreachable(exc):
            raise
        # The tracking server is away: the next claim, or the study's end, ends the run.


def end_orphaned_runs(study: optuna.Study) -> None:
    """Fail trials whose heartbeat stopped, and end the child runs of every failed trial still RUNNING."""
    # Right after a database outage every trial's heartbeat is late: give them two heartbeats to catch up.
    if not recently_back(2 * (study._storage.get_heartbeat_interval() or 0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if not is_finished(trial):  # a diverged trial ended its own run
            _end_orphaned_run(trial)
