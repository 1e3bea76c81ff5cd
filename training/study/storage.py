"""Where a study is stored and locked: its Optuna storage, the lock over every worker (StudyLock), opening
the study and the search it stores, ending the runs of trials whose process died (heartbeats). A restarting
database server is waited for up to ``--tracking-timeout``: new connections wait (SQLAlchemy's ``do_connect``
event), and calls that may be made twice go through :func:`repeatable`; a commit in flight (``tell``) fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import warnings
import weakref
from contextlib import contextmanager, suppress
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote

import optuna
from alembic.util import CommandError as AlembicCommandError
from optuna.exceptions import StorageInternalError
from mlflow import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from training import tracking
from training.outage import Patience, retrying, timeout_from_env, unreachable
from training.study.config import CONFIG_ATTR, OBJECTIVE_NAME, RUN_ATTR, StudyConfig, is_finished, make_sampler
from zoo.access import masked_url, storage_refused_hint
from zoo.errors import UsageError

T = TypeVar("T")
RETRY_S = 1.0  # how often a waiting connection tries the database again
DATABASE = Patience(0.0, what="the study's database")  # this process's one; SQLite (a file) never waits
_storage_of: weakref.WeakKeyDictionary[optuna.Study, RDBStorage] = weakref.WeakKeyDictionary()  # Optuna has no public getter


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's ExperimentalWarning, and "heartbeat is supposed to be used with optimize" (heartbeats() does it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        yield


def absolute_storage_url(url: str) -> str:
    """A relative SQLite path made absolute, so the recorded URL names the same file from any folder."""
    with suppress(ArgumentError, ValueError):  # not a URL: make_storage says what is wrong with it
        parsed = make_url(url)
        if (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
                and not os.path.isabs(parsed.database) and parsed.query.get("uri") != "true"):
            query = url.partition("?")[2]
            return f"{url.partition(':///')[0]}:///{quote(os.path.abspath(parsed.database))}" + (f"?{query}" if query else "")
    return url


def make_storage(url: str, heartbeat: int, wait_s: float | None = None) -> RDBStorage:
    """RDB storage with heartbeats: trials of a dead process are failed, their runs ended, and retried once.
    A database server that restarts is waited for up to ``wait_s`` (default: ZOO_TRACKING_TIMEOUT)."""
    if "://" not in url or make_url(url).get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise UsageError(f"--storage must be a database URL such as sqlite:///optuna.db (one machine) or "
                         f"postgresql://USER@HOST:PORT/DB (several), got {masked_url(url) if '://' in url else url!r}")
    # Several threads and processes write one SQLite file: wait for its lock instead of failing.
    # A database server that does not answer fails in 5 s instead of the OS's minutes.
    sqlite = url.startswith("sqlite")
    engine_kwargs = ({"connect_args": {"timeout": 60}} if sqlite else
                     {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}})
    if not sqlite:  # one attempt first: an unreachable server fails at once with one line, not after the retries
        probe = create_engine(url, **engine_kwargs)
        try:
            probe.connect().close()
        except OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            if hint := storage_refused_hint(reason):
                raise PermissionError(f"the Optuna storage {masked_url(url)} refused the login ({reason}): {hint}") from None
            raise ConnectionError(f"cannot reach the Optuna storage {masked_url(url)} ({reason}): check that the database "
                                  "server runs there and accepts connections, or fix --storage / ZOO_OPTUNA_STORAGE") from None
        finally:
            probe.dispose()

    def connect() -> RDBStorage:
        with quiet_optuna():  # a trial whose process died is retried once (end_orphaned_runs ends its run)
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        if not sqlite:  # a file: nothing restarts
            wait_for_database(storage.engine, timeout_from_env() if wait_s is None else wait_s)
        return storage

    # Processes started together on a fresh database race to create its schema: the losers retry.
    return retrying(10.0, lambda exc: isinstance(exc, (SQLAlchemyError, AlembicCommandError)), wait_s=1.0)(connect)


def wait_for_database(engine: Engine, wait_s: float) -> None:
    """New connections of ``engine`` wait up to ``wait_s`` for a database server that does not answer."""
    DATABASE.what = f"the study's database at {masked_url(engine.url.render_as_string(hide_password=False))}"
    DATABASE.timeout_s = wait_s

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: tuple, cparams: dict) -> Any:
        refused = dialect.loaded_dbapi.OperationalError
        connection = retrying(wait_s, lambda exc: isinstance(exc, refused), DATABASE.went_away, RETRY_S)(
            dialect.connect, *cargs, **cparams)
        DATABASE.came_back()
        return connection


def repeatable(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call``, made again when a database restart dropped its connection: only for idempotent calls."""
    def dropped(exc: BaseException) -> bool:
        return isinstance(exc if not isinstance(exc, StorageInternalError) else exc.__cause__, OperationalError)

    return retrying(DATABASE.timeout_s, dropped, wait_s=RETRY_S)(call, *args, **kwargs)


@contextmanager
def heartbeats(storage: RDBStorage, study: optuna.Study, trials: list[optuna.Trial]) -> Iterator[None]:
    """Record the trials' heartbeats while they train, as ``study.optimize`` does."""
    study_id = repeatable(storage.get_study_id_from_name, study.study_name)
    ids = [repeatable(storage.get_trial_id_from_study_id_trial_number, study_id, t.number) for t in trials]
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in ids:
                repeatable(storage.record_heartbeat, trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class StudyLock:
    """A lock over every thread, process and machine working on one study, for short bookkeeping: a PostgreSQL
    advisory lock, MySQL's GET_LOCK, or flock beside a SQLite file (each released when its holder dies)."""

    def __init__(self, url: str, study_name: str, wait_s: float) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.name = f"zoo-study:{study_name}"
        self.key = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big", signed=True)
        self.threads = threading.Lock()  # flock and advisory locks are per connection, not per thread
        self.engine = None if self.dialect == "sqlite" else create_engine(url, pool_pre_ping=True)
        database = parsed.database if self.dialect == "sqlite" else None
        self.path = f"{database}.zoo-lock" if database and database != ":memory:" else None
        if self.engine is not None:
            wait_for_database(self.engine, wait_s)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.threads:
            if self.engine is not None:
                take, give = (("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
                              if self.dialect == "postgresql" else
                              ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"))
                params = {"key": self.key, "name": self.name[:64]}
                with self.engine.connect() as connection:
                    connection.execute(text(take), params)
                    try:
                        yield
                    finally:
                        with suppress(OperationalError):  # a restart under us ended the lock with its session
                            connection.execute(text(give), params)
                            connection.commit()
            elif self.path is None:  # an in-memory database lives in this process only
                yield
            else:
                with open(self.path, "a") as handle:  # closing it releases the lock
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    yield


def open_study(config: StudyConfig, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study or load it; (study, created). The unique study name makes one process the creator."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if config.prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(storage=storage, study_name=config.name, direction="maximize",
                                    sampler=make_sampler(config.sampler, config.seed), pruner=pruner)
        _storage_of[study] = storage
        # Kept out of the user attributes, which `optuna studies` prints whole in one table cell.
        storage.set_study_system_attr(storage.get_study_id_from_name(config.name), CONFIG_ATTR, config.identity())
        with quiet_optuna():  # "experimental" since Optuna 3.2, and the only way to name it
            study.set_metric_names([OBJECTIVE_NAME])
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        # Same seed in every process would make them sample the same points: vary it.
        seed = (config.seed * 1_000_003 + os.getpid() + time.time_ns()) % 2**32
        study = optuna.load_study(study_name=config.name, storage=storage,
                                  sampler=make_sampler(config.sampler, seed), pruner=pruner)
        _storage_of[study] = storage
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UsageError(f"study {config.name!r} minimizes; a normalization study maximizes accuracy. "
                         "Use another --study-name.")
    stored = stored_search(study) or {}  # none: its creator has not written it yet, or it was not made by zoo
    if stored and "recipe" not in stored:  # made before recipes: its trials trained the seed recipe, searching nothing else
        stored |= {"recipe": "seed", "search": {}}
    differing = {k: (stored[k], v) for k, v in config.identity().items() if k in stored and stored[k] != v}
    if differing:
        what = "; ".join(f"{k}: study has {old}, command has {new}" for k, (old, new) in differing.items())
        raise UsageError(f"study {config.name!r} was created with other settings ({what}). "
                         "Repeat its settings to resume it, or use another --study-name.")
    return study, False


def stored_search(study: optuna.Study) -> dict[str, Any] | None:
    """What the study searches, as its creator stored it (a user attribute in studies made before 2026-11-30)."""
    storage = _storage_of.get(study)
    stored = (repeatable(storage.get_study_system_attrs, repeatable(storage.get_study_id_from_name, study.study_name))
              .get(CONFIG_ATTR) if storage is not None else None)
    return stored if stored is not None else study.user_attrs.get(CONFIG_ATTR)


def end_orphaned_runs(study: optuna.Study, heartbeat_s: float) -> None:
    """Fail trials whose heartbeat stopped, and end KILLED the child runs of failed trials still RUNNING (left
    to the next call while the tracking server is away)."""
    # Right after a database outage every trial's heartbeat is late: give them two heartbeats to catch up.
    if DATABASE.away_since is None and time.monotonic() - DATABASE.back_at >= 2 * heartbeat_s:
        with quiet_optuna():
            repeatable(optuna.storages.fail_stale_trials, study)
    for trial in repeatable(study.get_trials, deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ATTR)
        if not run_id or is_finished(trial):  # a diverged trial ended its own run
            continue
        try:
            if MlflowClient().get_run(run_id).info.status == "RUNNING":
                tracking.end_run_by_id(run_id, "KILLED", f"trial {trial.number}'s process died (no Optuna heartbeat); "
                                                         "the trial was failed and retried")
        except Exception as exc:
            if not unreachable(exc):
                raise
