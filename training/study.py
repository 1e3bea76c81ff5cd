"""One Optuna study over input normalizations = one MLflow parent run, one child run per trial.

The study lives in Optuna storage (SQLite for one machine, PostgreSQL for several) and
names its MLflow parent run in a study user attribute, so every thread, process or
machine running the same command nests its trials under the same parent, and a re-run
resumes the study under that parent. Each trial is trained by :func:`training.train.fit`
(the same code path as ``zoo train``) inside a child run started with an explicit
``parent_run_id``: MLflow's active run is thread-local, so ``nested=True`` would orphan
the trials of worker threads.

Trials are started by this module's own ask/tell loop rather than ``study.optimize``: a trial
starts only under a lock held in the storage (:class:`StudyLock`) while fewer than ``trials``
are finished or running, so any number of workers ends with exactly that many finished trials.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread
from alembic.util import CommandError as AlembicCommandError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from model_format import mlflow_model
from training import registration
from training import checkpoints, tracking
from training.outage import Outbox, Patience, timeout_from_env, unreachable
from training.storage_outage import PatientRDBStorage, recently_back, wait_for_database
from training.engine import EpochResult, TrainingDiverged
from training.batched import check_batchable
from training.train import (
    TrainConfig, build_network, dataset_label, describe_training, fit, load_training_data, resolve_device,
    short_normalization, training_tags,
)
from training.train_batch import MemberResult, fit_batch
from zoo.access import masked_url, storage_refused_hint
from zoo.data import Dataset, Split
from zoo.normalization import Normalization
from zoo.models.registry import create_model

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute naming the parent run
CONFIG_ATTR = "zoo_study_config"  # what the study searches; a re-run must agree (a system attribute, see stored_search)
OBJECTIVE_NAME = "val_accuracy"  # what Optuna's dashboard and tables call the objective
RUN_ATTR = "mlflow_run_id"  # trial user attribute naming its child run
OUTCOME_ATTR = "outcome"  # "diverged" marks a trial whose failure is a result, not an accident
SAMPLERS = ("tpe", "random", "qmc")
LOG_MODELS = ("best", "all", "none")
MODEL_URI_TAG = "zoo.model_uri"
STORAGE_DIALECTS = ("sqlite", "postgresql", "mysql")  # those StudyLock can lock
WORKER_TAG = tracking.WORKER_TAG  # HOST:PID of the process that ran a trial
DB_CONNECT_TIMEOUT_S = 5  # PostgreSQL connect timeout (psycopg's connect_timeout)
SUMMARY_EVERY_S = 10.0  # at most one refresh of the parent's summary per process in this time (about 0.1-0.3 s each)
RESUME_STUDY = "re-run the same command to resume the study (the trials it stopped are run again)"  # past --tracking-timeout
PARENT_WAIT_S = 600.0  # how long a process waits for the study's creator to name the parent run
# (a fresh MLflow SQLite store alone takes ~15 s to create on a busy machine)

# The fields a re-run of an existing study must keep: they define what its trials measure.
_IDENTITY = ("model", "dataset", "epochs", "mean_range", "std_range", "per_channel", "batch_size",
             "train_size", "val_size", "test_size", "max_batches", "image_size", "test_fraction")


@dataclass
class StudyConfig:
    model: str = "mnist_cnn"
    dataset: str = "mnist-5k"
    trials: int = 20  # finished trials the study must hold (complete, pruned or diverged)
    epochs: int = 1
    mean_range: tuple[float, float] = (-1.0, 2.0)  # linear; the published study's range
    std_range: tuple[float, float] = (0.05, 1.0)  # log
    per_channel: bool = False  # one mean/std per channel for RGB models
    sampler: str = "tpe"
    seed: int = 0  # sampler seed; every trial trains from the same initial weights (TrainConfig.seed)
    jobs: int = 1  # trials in parallel threads of this process
    batch_trials: int = 1  # trials trained together in one batched computation (training/batched.py)
    storage: str = "sqlite:///optuna.db"
    study_name: str | None = None  # default: MODEL-DATASET-normalization
    experiment: str | None = None
    prune: bool = False  # median pruning on per-epoch validation accuracy
    batch_size: int | None = None  # None: the model's recipe
    train_size: int | None = None  # use the first N images of each split (None: all)
    val_size: int | None = None
    test_size: int | None = None
    max_batches: int | None = None
    log_models: str = "best"
    register: str | None = None
    alias: str | None = None
    heartbeat: int = 60  # seconds; a RUNNING trial silent for 2 heartbeats belongs to a dead process
    enqueue: list[tuple[str, str]] = field(default_factory=list)  # (mean, std) to try first
    collapse_margin: float = 0.02  # val accuracy <= majority-class share + margin counts as collapsed
    device: str = "auto"
    data_dir: str | None = None
    image_size: str | None = None  # image folders: see TrainConfig.image_size
    test_fraction: float | None = None  # image folders without test/
    progress: bool = True
    tracking_timeout: float | None = None  # seconds to wait for an MLflow server that goes away (None: ZOO_TRACKING_TIMEOUT, else 600)

    @property
    def name(self) -> str:
        return self.study_name or f"{self.model}-{dataset_label(self.dataset)}-normalization"

    def validate(self) -> None:
        lo, hi = self.mean_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"--mean-range needs two finite numbers LOW < HIGH, got {lo} {hi}")
        lo, hi = self.std_range
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"--std-range needs 0 < LOW < HIGH (it is searched on a log scale), got {lo} {hi}")
        if self.trials < 1 or self.jobs < 1 or self.epochs < 1 or self.batch_trials < 1:
            raise ValueError("--trials, --jobs, --batch-trials and --epochs must be at least 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.log_models not in LOG_MODELS:
            raise ValueError(f"--log-models must be one of {', '.join(LOG_MODELS)}, got {self.log_models!r}")
        registration.check_registry_names(self.register, self.alias)
        if self.register and self.log_models == "none":
            raise ValueError("--register needs a logged model; use --log-models best or all")

    def identity(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in _IDENTITY}

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model, dataset=self.dataset, epochs=self.epochs, batch_size=self.batch_size, seed=1,
            device=self.device, data_dir=self.data_dir, max_batches=self.max_batches, progress=False,
            image_size=self.image_size, test_fraction=self.test_fraction,
        )


@dataclass
class StudyResult:
    study_name: str
    parent_run_id: str
    summary: dict[str, Any]
    best_model_uri: str | None


# --- storage, study and parent run -------------------------------------------------------


def make_storage(url: str, heartbeat: int, wait_s: float | None = None) -> RDBStorage:
    """RDB storage with heartbeats: trials of a dead process are failed, their runs ended, and retried once.
    A database server that restarts is waited for up to ``wait_s`` (default: ZOO_TRACKING_TIMEOUT, else
    600 s; see training/storage_outage.py)."""
    if "://" not in url or make_url(url).get_backend_name() not in STORAGE_DIALECTS:
        raise ValueError(f"--storage must be a database URL such as sqlite:///optuna.db (one machine) or "
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


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: a trial still running (in another thread, process, or the same batch)
            # counts as a poor result, so trials sampled while it runs go elsewhere.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)


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
        raise ValueError(f"study {config.name!r} minimizes; a normalization study maximizes accuracy. "
                         "Use another --study-name.")
    _check_same_search(study, config)
    return study, False


def stored_search(study: optuna.Study) -> dict[str, Any] | None:
    """What the study searches, as its creator stored it (a user attribute in studies made before 2026-11-30)."""
    stored = study._storage.get_study_system_attrs(study._study_id).get(CONFIG_ATTR)
    return stored if stored is not None else study.user_attrs.get(CONFIG_ATTR)


def _check_same_search(study: optuna.Study, config: StudyConfig) -> None:
    stored = stored_search(study)
    if stored is None:
        return  # its creator has not written it yet, or it was not made by zoo
    differing = {k: (stored.get(k), v) for k, v in config.identity().items() if stored.get(k) != v}
    if differing:
        what = "; ".join(f"{k}: study has {old}, command has {new}" for k, (old, new) in differing.items())
        raise ValueError(f"study {config.name!r} was created with other settings ({what}). "
                         "Repeat its settings to resume it, or use another --study-name.")


def ensure_parent_run(study: optuna.Study, created: bool, config: StudyConfig, storage_url: str,
                      project_run_id: str | None = None, lock: StudyLock | None = None) -> str:
    """The study's one parent run: created by the process that created the study, adopted by the others.

    Inside ``mlflow run``, ``project_run_id`` (the project's run) becomes the parent of a new study,
    or points at the parent of an existing one.

    The others touch MLflow only once the parent exists, so they never race the creator
    while it initializes a fresh MLflow store.
    """
    if created:
        return _create_parent_run(study, config, storage_url, project_run_id)
    parent = _wait_for_parent(study, PARENT_WAIT_S)
    if parent is None:
        # The creator died before naming a parent: the first process to take the lock names one.
        with (lock or StudyLock(storage_url, config.name))():
            parent = study.user_attrs.get(PARENT_ATTR) or _create_parent_run(study, config, storage_url)
    _check_same_search(study, config)
    if project_run_id and project_run_id != parent:
        tracking.set_tags({"zoo.study_parent_run_id": parent}, run_id=project_run_id)
    if tracking.run_status(parent) != "RUNNING":
        tracking.reopen_run(parent)  # resuming
    return parent


def _wait_for_parent(study: optuna.Study, timeout: float) -> str | None:
    deadline, told = time.monotonic() + timeout, False
    while (parent := study.user_attrs.get(PARENT_ATTR)) is None and time.monotonic() < deadline:
        if not told:
            tqdm.write(f"study {study.study_name}: waiting for the process that created it to create its MLflow parent run",
                       file=sys.stderr)
            told = True
        time.sleep(0.5)
    return parent


def _create_parent_run(study: optuna.Study, config: StudyConfig, storage_url: str,
                       project_run_id: str | None = None) -> str:
    tags = {"optuna.study_name": config.name, "optuna.storage": masked_url(storage_url), tracking.KIND_TAG: "study",
            "zoo.model": config.model, "zoo.dataset": config.dataset}
    if tracking.is_project_run_here(project_run_id, config.experiment):
        run_id = project_run_id
        tracking.set_tags({**tags, "mlflow.runName": f"study {config.name}"}, run_id=run_id)
    else:
        run_id = tracking.create_run(experiment=config.experiment or tracking.default_experiment(),
                                     run_name=f"study {config.name}", tags=tags)
        if project_run_id:
            tracking.link_project_run(project_run_id, run_id)
    tracking.log_params(_parent_params(config, storage_url), run_id=run_id)
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _parent_params(config: StudyConfig, storage_url: str) -> dict[str, Any]:
    return {
        "optuna_study": config.name, "optuna_storage": masked_url(storage_url), "trials": config.trials,
        "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
        "mean_range": "{:g},{:g}".format(*config.mean_range), "std_range": "{:g},{:g}".format(*config.std_range),
        "mean_scale": "linear", "std_scale": "log", "per_channel": config.per_channel,
        "sampler": config.sampler, "seed": config.seed, "pruner": "median" if config.prune else "none",
        "batch_size": config.batch_size, "train_size": config.train_size, "val_size": config.val_size,
        "test_size": config.test_size, "max_batches": config.max_batches, "collapse_margin": config.collapse_margin,
        **({"image_size": config.image_size} if config.image_size else {}),
        **({"test_fraction": config.test_fraction} if config.test_fraction is not None else {}),
    }


# --- trials -------------------------------------------------------------------------------


def suggest_normalization(trial: optuna.Trial, config: StudyConfig, channels: int) -> Normalization:
    """Mean on a linear scale, std on a log scale; one pair for all channels unless per_channel."""
    if config.per_channel and channels > 1:
        means = [trial.suggest_float(f"mean_{c}", *config.mean_range) for c in range(channels)]
        stds = [trial.suggest_float(f"std_{c}", *config.std_range, log=True) for c in range(channels)]
        return Normalization(means, stds)
    mean = trial.suggest_float("mean", *config.mean_range)
    std = trial.suggest_float("std", *config.std_range, log=True)
    return Normalization((mean,), (std,)).for_channels(channels)


def enqueue_params(config: StudyConfig, dataset: Dataset) -> list[dict[str, float]]:
    """``--enqueue MEAN STD`` pairs as Optuna params (values outside the ranges are allowed); ``auto``
    stands for the training split's own statistics, per channel."""
    out = []
    channels = dataset.image_shape[0]
    for mean, std in config.enqueue:
        norm = replace(config.train_config(), mean=mean, std=std).normalization(dataset)
        if config.per_channel and channels > 1:
            out.append({**{f"mean_{c}": m for c, m in enumerate(norm.mean)},
                        **{f"std_{c}": s for c, s in enumerate(norm.std)}})
        else:
            if len(set(norm.mean)) > 1 or len(set(norm.std)) > 1:
                if "auto" in (mean, std):  # the data's statistics, shared: their average over the channels
                    norm = Normalization((sum(norm.mean) / channels,), (sum(norm.std) / channels,))
                else:
                    raise ValueError(f"--enqueue {mean} {std} differs per channel; add --per-channel")
            out.append({"mean": norm.mean[0], "std": norm.std[0]})
    return out


@dataclass
class _Context:
    """What every trial of this process shares."""

    config: StudyConfig
    dataset: Dataset
    parent_run_id: str
    experiment: str
    claim: StudyLock  # across processes and machines: who may start the next trial
    lock: threading.Lock = field(default_factory=threading.Lock)  # this process's progress bar and summary
    stop: threading.Event = field(default_factory=threading.Event)  # a thread failed: start no more trials
    checkpointed_best: str | None = None  # the run of the best trial this process has seen, which keeps its checkpoints
    summary_logged: float = -math.inf  # time.monotonic() of this process's last refresh of the parent's summary
    patience: Patience = field(default_factory=Patience)  # the parent run's writes wait for a server that went away


def _trial_setup(trial: optuna.Trial, ctx: _Context) -> tuple[TrainConfig, Normalization, str, dict[str, str]]:
    """The trial's training config, normalization, child run name and tags."""
    config = ctx.config
    normalization = suggest_normalization(trial, config, ctx.dataset.image_shape[0])
    train_config = replace(config.train_config(), **normalization.as_params())
    tags = {**training_tags(train_config, normalization, "trial"),
            "optuna.study_name": config.name, "optuna.trial_number": str(trial.number)}  # training_tags has WORKER_TAG
    if RUN_ATTR in trial.user_attrs:  # a retry inherits the attributes of the trial whose process died
        tags["zoo.retry_of_run_id"] = trial.user_attrs[RUN_ATTR]
    return train_config, normalization, f"trial {trial.number:03d} {short_normalization(normalization)}", tags


def _trial_params(trial: optuna.Trial, ctx: _Context) -> dict[str, int]:
    return {"trial_number": trial.number, "train_size": len(ctx.dataset.train),
            "val_size": len(ctx.dataset.val), "test_size": len(ctx.dataset.test)}


def _objective(trial: optuna.Trial, ctx: _Context) -> float:
    config = ctx.config
    train_config, normalization, run_name, tags = _trial_setup(trial, ctx)
    outbox = _start_trial_run(trial, ctx, run_name, tags)
    patiently = outbox.patiently  # every write waits for a tracking server that went away (training goes on)
    try:
        with ExitStack() as run:
            patiently(lambda: run.enter_context(tracking.start_run(
                run_id=outbox.run_id, stopped=(optuna.TrialPruned,), patiently=patiently)))
            patiently(tracking.set_description, _describe_trial(trial, ctx, train_config, normalization))
            patiently(tracking.log_params, _trial_params(trial, ctx))
            try:
                result = fit(train_config, ctx.dataset, on_epoch=_pruning_callback(trial) if config.prune else None,
                             outbox=outbox)
            except TrainingDiverged as exc:
                trial.set_user_attr(OUTCOME_ATTR, "diverged")
                trial.set_user_attr("failure", str(exc))
                raise
            trial.set_user_attr("test_accuracy", result.test_accuracy)
            patiently(tracking.set_description, _describe_trial(trial, ctx, train_config, normalization, result))
            if config.log_models == "all":
                uri = patiently(_log_trial_model, result.network, result.normalization, config, ctx.dataset,
                                result.test_accuracy)
                patiently(tracking.set_tags, {MODEL_URI_TAG: uri})
    finally:
        outbox.discard()  # sent, or the trial failed: a trial is retried, never resumed from it
    return result.val_accuracy  # the objective; test accuracy is recorded, never optimized


def _start_trial_run(trial: optuna.Trial, ctx: _Context, run_name: str, tags: dict[str, str]) -> Outbox:
    """Create the trial's child run (waiting for a tracking server that went away) and name it in the trial;
    returns the Outbox its epochs go through."""
    from mlflow.tracking.context.registry import resolve_tags

    patience = Patience(ctx.config.tracking_timeout, RESUME_STUDY)
    # One request, so a retry never leaves a half-made run; with the tags mlflow.start_run would add (user, source).
    run_id = patience.patiently(tracking.create_run, experiment=ctx.experiment, run_name=run_name,
                                parent_run_id=ctx.parent_run_id, tags=resolve_tags(tags))
    trial.set_user_attr(RUN_ATTR, run_id)
    return Outbox(run_id, ctx.config.tracking_timeout, RESUME_STUDY)


def _describe_trial(trial: optuna.Trial, ctx: _Context, train_config: TrainConfig, normalization: Normalization,
                    result=None) -> str:
    """The trial's description: which study it belongs to, then what was trained and its result."""
    text = (f"Trial {trial.number} of the Optuna study **{ctx.config.name}** (the parent run), which searches "
            f"the input normalization.\n\n" + describe_training(train_config, normalization, ctx.dataset, result))
    threshold = one_class_accuracy(ctx.dataset.val) + ctx.config.collapse_margin
    if result is not None and result.val_accuracy <= threshold:
        text += (f"\n\n**Collapsed:** validation accuracy {100 * result.val_accuracy:.2f} % is at most "
                 f"{100 * threshold:.2f} % (predicting the most frequent class, plus a margin).")
    return text


def _pruning_callback(trial: optuna.Trial):
    def on_epoch(result: EpochResult) -> None:
        trial.report(result.val_accuracy, result.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {result.epoch} (val_accuracy {result.val_accuracy:.4f})")

    return on_epoch


def _log_trial_model(network: torch.nn.Module, normalization: Normalization, config: StudyConfig,
                     dataset: Dataset, test_accuracy: float, onnx: bool = False) -> str:
    """``onnx``: ship the ONNX graph too (the model is about to be registered)."""
    return tracking.log_model(
        network, model_name=config.model, normalization=normalization, input_shape=dataset.image_shape,
        class_names=dataset.classes, sample_images=dataset.test.images[:2],
        dataset=config.dataset, test_accuracy=test_accuracy, study_name=config.name, onnx=onnx,
    )


def _objective_batch(trials: list[optuna.Trial], ctx: _Context) -> list[tuple[float | None, TrialState]]:
    """Train ``trials`` together (training.train_batch), each in its own child run; each one's (value, state).

    A trial that diverges or is pruned ends there, its run FAILED or KILLED with the reason; the
    others go on. Any other error ends every run of the batch FAILED (KILLED on Ctrl-C) and is raised.
    """
    config = ctx.config
    setups = [_trial_setup(trial, ctx) for trial in trials]
    together = ",".join(str(t.number) for t in trials)
    run_ids = []
    for trial, (train_config, normalization, run_name, tags) in zip(trials, setups):
        run_id = tracking.create_run(experiment=ctx.experiment, run_name=run_name, parent_run_id=ctx.parent_run_id,
                                     tags={**tags, "zoo.trained_with_trials": together})
        run_ids.append(run_id)
        trial.set_user_attr(RUN_ATTR, run_id)
        tracking.set_description(_describe_trial(trial, ctx, train_config, normalization), run_id=run_id)
        tracking.log_params(_trial_params(trial, ctx), run_id=run_id)
    try:
        results = fit_batch([setup[0] for setup in setups], ctx.dataset, run_ids,
                            on_epoch=_batch_pruning_callback(trials) if config.prune else None,
                            stops=(optuna.TrialPruned,))
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for run_id in run_ids:
            tracking.end_run_by_id(run_id, status, f"{type(exc).__name__}: {exc}")
        raise
    return [_end_batch_trial(trial, result, setup, ctx) for trial, result, setup in zip(trials, results, setups)]


def _end_batch_trial(trial: optuna.Trial, result: MemberResult, setup: tuple[TrainConfig, Normalization, str, Any],
                     ctx: _Context) -> tuple[float | None, TrialState]:
    """Record one trial of a batch as :func:`_objective` records a lone one, and end its run."""
    train_config, normalization = setup[0], setup[1]
    if isinstance(result.stopped, TrainingDiverged):
        trial.set_user_attr(OUTCOME_ATTR, "diverged")
        trial.set_user_attr("failure", str(result.stopped))
        tracking.end_run_by_id(result.run_id, "FAILED", f"TrainingDiverged: {result.stopped}")
        return None, TrialState.FAIL
    if isinstance(result.stopped, optuna.TrialPruned):
        tracking.end_run_by_id(result.run_id, "KILLED", f"TrialPruned: {result.stopped}")
        return None, TrialState.PRUNED
    trial.set_user_attr("test_accuracy", result.test_accuracy)
    with tracking.start_run(run_id=result.run_id):  # ends it FINISHED
        tracking.set_description(_describe_trial(trial, ctx, train_config, normalization, result))
        if ctx.config.log_models == "all":
            uri = _log_trial_model(result.network, normalization, ctx.config, ctx.dataset, result.test_accuracy)
            tracking.set_tags({MODEL_URI_TAG: uri})
    return result.val_accuracy, TrialState.COMPLETE


def _batch_pruning_callback(trials: list[optuna.Trial]):
    one = [_pruning_callback(trial) for trial in trials]

    def on_epoch(member: int, result: EpochResult) -> None:
        one[member](result)

    return on_epoch


def _end_orphaned_run(trial: FrozenTrial) -> None:
    """A trial failed by Optuna because its process died left its child run RUNNING: end it KILLED."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    try:
        if run_id and tracking.run_status(run_id) == "RUNNING":
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


def is_finished(trial: FrozenTrial) -> bool:
    """A trial whose result is known: complete, pruned, or diverged (a failure that is itself a result)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get(OUTCOME_ATTR) == "diverged")


def count_trials(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials over every process working on the study."""
    trials = study.get_trials(deepcopy=False)
    return sum(map(is_finished, trials)), sum(t.state == TrialState.RUNNING for t in trials)


# --- the parent's summary -----------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "sd": None, "min": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def one_class_accuracy(split: Split) -> float:
    """The accuracy of always predicting the most frequent class: 1/classes on a balanced split,
    more on a small subset (e.g. 0.122 on the first 500 Fashion-MNIST validation images)."""
    return float(split.labels.bincount().max()) / max(len(split), 1)


def summarize(study: optuna.Study, one_class: float, collapse_margin: float = 0.02) -> dict[str, Any]:
    """The answer to the study's question: how much accuracy moves over normalizations, and how often
    training collapses to predicting one class (val accuracy at or below ``one_class`` + margin)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    threshold = one_class + collapse_margin
    val = [t.value for t in complete]
    test = [t.user_attrs["test_accuracy"] for t in complete if "test_accuracy" in t.user_attrs]
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_diverged": sum(is_finished(t) and t.state == TrialState.FAIL for t in trials),
        "trials_failed_other": sum(t.state == TrialState.FAIL and not is_finished(t) for t in trials),
        "trials_running": sum(t.state == TrialState.RUNNING for t in trials),
        "collapse_threshold": threshold,
        "trials_collapsed": sum(v <= threshold for v in val),
        "val_accuracy": _stats(val),
        "test_accuracy": _stats(test),
        "best": None,
    }
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary["best"] = {"trial": best.number, "params": best.params, "val_accuracy": best.value,
                           "test_accuracy": best.user_attrs.get("test_accuracy"), "run_id": best.user_attrs.get(RUN_ATTR)}
    return summary


def trials_table(study: optuna.Study) -> str:
    """All trials as CSV: number, state, value (val_accuracy), params, test accuracy, run id, failure."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    frame = frame.rename(columns={"value": "val_accuracy", "user_attrs_test_accuracy": "test_accuracy"})
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    return frame.to_csv(index=False)


def log_summary(study: optuna.Study, parent_run_id: str, one_class: float, collapse_margin: float,
                plots: bool = False) -> dict[str, Any]:
    """Write the summary, the trials table (and, with ``plots``, the contour and importances) to the parent."""
    summary = summarize(study, one_class, collapse_margin)
    tracking.log_dict(summary, "study/summary.json", run_id=parent_run_id)
    tracking.log_text(trials_table(study), "study/trials.csv", run_id=parent_run_id)
    metrics = {"trials_complete": summary["trials_complete"], "trials_collapsed": summary["trials_collapsed"],
               "trials_diverged": summary["trials_diverged"], "trials_pruned": summary["trials_pruned"]}
    for split in ("val", "test"):
        metrics.update({f"{stat}_{split}_accuracy": v for stat, v in summary[f"{split}_accuracy"].items() if v is not None})
    tags = {tracking.NOTE_TAG: describe_study(study, summary)}  # the parent's description
    if summary["best"]:
        best = summary["best"]
        tracking.log_dict(best, "study/best_params.json", run_id=parent_run_id)
        tags.update({"best_trial": best["trial"], "best_run_id": best["run_id"],
                     **{f"best_{k}": f"{v:.6g}" for k, v in best["params"].items()}})
    tracking.log_batch(parent_run_id, metrics=metrics, tags=tags)
    if plots:
        log_plots(study, parent_run_id, summary["collapse_threshold"])
    return summary


PLOTS = ("contour.png", "param_importances.png", "accuracy_vs_normalization.png", "interactive.html")  # under study/


def describe_study(study: optuna.Study, summary: dict[str, Any]) -> str:
    """The parent run's description (markdown): what the study searches and, so far, what it found."""
    searched = stored_search(study) or {}
    lines = [f"Optuna study **{study.study_name}**"]
    if searched:
        lines[0] += (f": trains **{searched['model']}** on **{searched['dataset']}** for {searched['epochs']} epoch(s) "
                     f"per trial, with the input mean searched in [{searched['mean_range'][0]:g}, "
                     f"{searched['mean_range'][1]:g}] and the std in [{searched['std_range'][0]:g}, "
                     f"{searched['std_range'][1]:g}] (log scale)")
    lines[0] += ". Every trial is a child run of this one."
    lines.append("")
    val = summary["val_accuracy"]
    if not summary["trials_complete"]:
        lines.append("**Result:** no trial has completed yet.")
    else:
        best = summary["best"]
        lines.append(
            f"**Result:** {summary['trials_complete']} trials complete ({summary['trials_collapsed']} collapsed to "
            f"predicting one class, {summary['trials_diverged']} diverged, {summary['trials_pruned']} pruned). "
            f"Validation accuracy: median **{100 * val['median']:.2f} %**, sd {100 * val['sd']:.2f} pt, "
            f"range {100 * val['min']:.2f}-{100 * val['max']:.2f} %. Best: trial {best['trial']} "
            f"({', '.join(f'{k} {v:.4g}' for k, v in best['params'].items())}).")
    lines += ["", "Figures under `study/`: " + ", ".join(f"`{p}`" for p in PLOTS) + "; every trial in `study/trials.csv`."]
    return "\n".join(lines)


def log_plots(study: optuna.Study, parent_run_id: str, collapse_threshold: float) -> None:
    """The study's figures (:func:`study_figures`) and Optuna's interactive plotly versions in one
    HTML file, under ``study/`` of the parent run."""
    figures = study_figures(study, collapse_threshold)  # sets the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        tracking.log_figure(figure, f"study/{name}.png", run_id=parent_run_id)
        plt.close(figure)
    tracking.log_text(interactive_html(study), "study/interactive.html", run_id=parent_run_id)


def study_figures(study: optuna.Study, collapse_threshold: float) -> dict[str, Any]:
    """Matplotlib figures by name: Optuna's contour of accuracy over (mean, std) and parameter
    importances, and accuracy against each searched value with the collapsed trials in red. A
    figure that needs more complete trials than the study has is left out, with a line on stderr."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps plotting off GUI event loops
    from optuna.visualization import matplotlib as optuna_plots

    figures = {}
    for name, plot in (("contour", optuna_plots.plot_contour), ("param_importances", optuna_plots.plot_param_importances)):
        # Optuna switches matplotlib's global style to ggplot: undo it for the figures drawn after.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")
            try:
                axes = plot(study, target_name="val_accuracy")
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few complete trials
                tqdm.write(f"study: no {name} plot yet ({exc})", file=sys.stderr)
                continue
        figures[name] = np.asarray(axes).flat[0].figure
        figures[name].set_size_inches(8, 6)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        from training.figures import accuracy_against_figure

        names = sorted(complete[0].params, key=lambda k: (not k.startswith("mean"), k))  # mean(s), then std(s)
        figures["accuracy_vs_normalization"] = accuracy_against_figure(
            {k: [t.params[k] for t in complete] for k in names}, [t.value for t in complete],
            [t.value <= collapse_threshold for t in complete], collapse_threshold,
            f"study {study.study_name}: {len(complete)} complete trials",
        )
    return figures


def interactive_html(study: optuna.Study) -> str:
    """Optuna's plotly contour, slice, importances and history on one page, plotly.js embedded once
    (about 4.7 MB) so the page works offline in the MLflow UI's artifact viewer."""
    from optuna import visualization

    parts, embedded = [], False
    for plot in (visualization.plot_contour, visualization.plot_slice, visualization.plot_param_importances,
                 visualization.plot_optimization_history):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                figure = plot(study, target_name="val_accuracy")
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few complete trials
                parts.append(f"<p>{plot.__name__}: not available yet ({exc})</p>")
                continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not embedded))
        embedded = True
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>study {study.study_name}</title></head>"
            f"<body><h2>Optuna study {study.study_name}</h2>{''.join(parts)}</body></html>")


# --- the best model -----------------------------------------------------------------------


def _tested_network(run_id: str, config: StudyConfig, dataset: Dataset) -> tuple[torch.nn.Module, Normalization]:
    """A trial's network rebuilt from its checkpoint, with the weights it was tested with (its best
    epoch's under the recipe's keep_best, else its last), and its normalization."""
    tested = checkpoints.BEST if config.train_config().resolved().keep_best else checkpoints.LAST
    state = tracking.load_checkpoint(run_id, checkpoints.checkpoint_path(tested))
    network = build_network(config.train_config(), dataset)
    network.load_state_dict(state["model"])
    return network, Normalization.from_dict(state["normalization"])


def publish_best_model(study: optuna.Study, parent_run_id: str, config: StudyConfig, dataset: Dataset) -> str | None:
    """Log the best trial's network as an MLflow model in its child run (rebuilt from its checkpoint,
    so it works whichever process ran it) and register it with ``config.register``."""
    if config.log_models == "none" or not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    run_id = best.user_attrs[RUN_ATTR]
    uri = tracking.run_tags(run_id).get(MODEL_URI_TAG)
    if uri is None:
        network, normalization = _tested_network(run_id, config, dataset)
        with tracking.start_run(run_id=run_id):
            uri = _log_trial_model(network, normalization, config, dataset, best.user_attrs.get("test_accuracy"),
                                   onnx=config.register is not None)
            tracking.set_tags({MODEL_URI_TAG: uri})
    if config.register and tracking.run_tags(parent_run_id).get("zoo.registered_run_id") != run_id:
        if not mlflow_model.ships_onnx(uri):  # logged in its trial (--log-models all), before it was the best
            network, normalization = _tested_network(run_id, config, dataset)
            mlflow_model.ship_onnx(uri, network, normalization, dataset.image_shape, dataset.classes, config.model,
                               source=f"models:/{config.register}")
        version = registration.register(uri, config.register, config.alias)
        tracking.set_tags({"zoo.registered_run_id": run_id, "zoo.registered_version": version}, run_id=parent_run_id)
    tracking.set_tags({"best_model_uri": uri}, run_id=parent_run_id)
    return uri


# --- the driver ---------------------------------------------------------------------------


def load_study_dataset(config: StudyConfig) -> Dataset:
    """The dataset once per process (every trial reuses the decoded tensors), split as the model's
    recipe asks (as ``zoo train`` does), cut to the requested sizes."""
    full = load_training_data(config.train_config())
    return Dataset(full.name, full.classes, full.train.subset(config.train_size),
                   full.val.subset(config.val_size), full.test.subset(config.test_size), full.source, full.skipped)


MAX_AUTO_JOBS = 8  # trials in flight hold a network and its optimizer each: bound the memory of the default


def default_jobs(device: str = "auto") -> int:
    """Trials at once when ``--jobs`` is not given: one per CPU core this process may use (up to
    MAX_AUTO_JOBS) on the CPU, where each then trains with one torch thread; one on a GPU.

    On the 2-core development machine two 1-thread trials finished 1.3x more trials per minute
    than one trial on 2 threads (the MNIST CNN's small layers split poorly across threads);
    two 1-thread processes were as fast as one process with two trial threads
    (benchmarks/RESULTS.md)."""
    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      MAX_AUTO_JOBS))


@contextmanager
def _torch_threads(jobs: int) -> Iterator[None]:
    """Share the cores between trial threads instead of oversubscribing them."""
    before = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(max(1, before // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _best_run_id(study: optuna.Study) -> str | None:
    complete = any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    return study.best_trial.user_attrs.get(RUN_ATTR) if complete else None


def keep_best_trial_checkpoints(study: optuna.Study, trial: FrozenTrial, ctx: _Context) -> None:
    """Only the best trial keeps its checkpoints (full last + weights-only best, ~19 MB for mnist_cnn):
    a finished trial that is not the best loses them, and so does the best it supersedes. Other
    processes' leftovers go in :func:`sweep_checkpoints` when the study ends."""
    run_id, best = trial.user_attrs.get(RUN_ATTR), _best_run_id(study)
    if run_id is None:
        return
    try:
        if run_id != best:
            ctx.patience.patiently(tracking.delete_checkpoints, run_id)
            return
        if ctx.checkpointed_best not in (None, run_id):
            ctx.patience.patiently(tracking.delete_checkpoints, ctx.checkpointed_best)
        ctx.checkpointed_best = run_id
    except tracking.ServerGone:
        raise
    except Exception as exc:  # a failed clean-up must not stop the study; the final sweep retries
        tqdm.write(f"study: could not delete a trial's checkpoints ({_cleanup_failure(exc)})", file=sys.stderr)


def sweep_checkpoints(study: optuna.Study) -> None:
    """Delete the checkpoints of every finished trial but the best (whichever process ran them).
    A deletion that fails is reported, not raised: every trial is recorded, only disk is lost."""
    best, kept, failure = _best_run_id(study), 0, None
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(RUN_ATTR)
        if trial.state.is_finished() and run_id not in (None, best):
            try:
                tracking.delete_checkpoints(run_id)
            except Exception as exc:
                kept, failure = kept + 1, exc
    if failure is not None:
        tqdm.write(f"study: kept the checkpoints of trials that are not the best ({kept}): {_cleanup_failure(failure)}",
                   file=sys.stderr)


def _cleanup_failure(exc: Exception) -> str:
    """Why deleting checkpoints failed, in one line; a locked server's 403 says which permission is missing."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "403" in reason:
        reason += " (MLflow counts deleting artifacts as MANAGE: grant the workers' user MANAGE on the experiment)"
    return reason


def _after_trial(ctx: _Context, bar: tqdm, study: optuna.Study, trial: FrozenTrial) -> None:
    with ctx.lock:  # trial threads share the bar and the best trial's checkpoints
        keep_best_trial_checkpoints(study, trial, ctx)
        _show_progress(bar, count_trials(study)[0])
        if trial.state == TrialState.COMPLETE:
            bar.set_postfix(last=f"{trial.value:.4f}", best=f"{study.best_value:.4f}")
        if not ctx.config.progress:
            tqdm.write(f"study {study.study_name}: trial {trial.number} {trial.state.name.lower()}"
                       + (f", val_accuracy {trial.value:.4f}" if trial.value is not None else ""), file=sys.stderr)
        if time.monotonic() - ctx.summary_logged < SUMMARY_EVERY_S:
            return  # refreshed a moment ago; the study's end always writes the final one
        try:
            ctx.patience.patiently(log_summary, study, ctx.parent_run_id, one_class_accuracy(ctx.dataset.val),
                                   ctx.config.collapse_margin)
            ctx.summary_logged = time.monotonic()
        except tracking.ServerGone:
            raise
        except Exception as exc:  # a refresh that fails (a locked store) must not stop the study
            tqdm.write(f"study: could not refresh the summary on the parent run ({exc})", file=sys.stderr)


def _show_progress(bar: tqdm, finished: int) -> None:
    bar.n = min(finished, bar.total)
    bar.refresh()


def _claim_trials(study: optuna.Study, ctx: _Context, bar: tqdm, most: int = 1) -> list[optuna.Trial]:
    """The next trials (at most ``most``) this thread should run, or none once the study holds
    ``config.trials`` finished trials.

    The race this closes: with ``study.optimize`` each process counts the trials, sees one
    slot left, and starts a trial; N processes doing so at once overshoot by up to N - 1. Here
    counting and starting (``study.ask``, which takes a queued retry first) happen under one
    lock held in the storage, so a trial starts only while finished + running < target, and no
    surplus trial (nor its child run) is ever created. Stale trials are failed under the same
    lock, so a dead trial's slot and its queued retry are accounted together.

    When every slot is taken by a trial in flight, the thread waits instead of leaving: if that
    trial's process dies, this one fails it (after two missed heartbeats) and runs its retry.

    Each trial's normalization is sampled as soon as it is asked for, so that the sampler sees
    it running (TPE's constant liar) when it samples the next one: trials claimed together differ.
    """
    poll_s = min(5.0, max(0.5, ctx.config.heartbeat / 2))
    channels = ctx.dataset.image_shape[0]
    while not ctx.stop.is_set():
        with ctx.claim():
            end_orphaned_runs(study)
            finished, running = count_trials(study)
            if finished >= ctx.config.trials:
                return []
            free = ctx.config.trials - finished - running
            if free > 0:
                trials = []
                with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": _run_trial records it
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    for _ in range(min(most, free)):
                        trials.append(study.ask())
                        suggest_normalization(trials[-1], ctx.config, channels)
                return trials
        _show_progress(bar, finished)
        time.sleep(poll_s)
    return []


def _run_trial(study: optuna.Study, trial: optuna.Trial, ctx: _Context) -> FrozenTrial:
    """Train one claimed trial and tell Optuna its outcome; a diverged trial is a result, any other error is raised."""
    value, state, error = None, TrialState.FAIL, None
    # Optuna's own heartbeat thread, the one study.optimize runs: a trial whose heartbeat stops
    # belongs to a dead process (optuna.storages._heartbeat is not re-exported publicly).
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value, state = _objective(trial, ctx), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrainingDiverged:
            pass
        except BaseException as exc:  # Ctrl-C included: the trial is failed, not left RUNNING
            error = exc
    frozen = study.tell(trial, value, state=state)
    if error is not None:
        raise error
    return frozen


def _run_trial_batch(study: optuna.Study, trials: list[optuna.Trial], ctx: _Context) -> list[FrozenTrial]:
    """:func:`_run_trial` for trials trained together: each has its heartbeat, its outcome and its tell."""
    outcomes, error = [(None, TrialState.FAIL)] * len(trials), None
    with ExitStack() as heartbeats:
        for trial in trials:
            heartbeats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        try:
            outcomes = _objective_batch(trials, ctx)
        except BaseException as exc:  # Ctrl-C included: the trials are failed, not left RUNNING
            error = exc
    frozen = [study.tell(trial, value, state=state) for trial, (value, state) in zip(trials, outcomes)]
    if error is not None:
        raise error
    return frozen


def _work(study: optuna.Study, ctx: _Context, bar: tqdm) -> None:
    together = ctx.config.batch_trials
    while trials := _claim_trials(study, ctx, bar, together):
        try:
            frozen = (_run_trial_batch(study, trials, ctx) if together > 1 else
                      [_run_trial(study, trial, ctx) for trial in trials])
        except BaseException:
            ctx.stop.set()  # the other threads finish their trials and start no more
            raise
        for one in frozen:
            _after_trial(ctx, bar, study, one)


def _work_until_done(study: optuna.Study, ctx: _Context, bar: tqdm) -> None:
    """Run trials in ``config.jobs`` threads until the study holds ``config.trials`` finished trials."""
    if ctx.config.jobs == 1:
        _work(study, ctx, bar)
        return
    with ThreadPoolExecutor(ctx.config.jobs, thread_name_prefix="trial") as pool:
        futures = [pool.submit(_work, study, ctx, bar) for _ in range(ctx.config.jobs)]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            ctx.stop.set()
            raise


class StudyInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the study; the message says how far it got and how to resume."""


def run_study(config: StudyConfig) -> StudyResult:
    """Run (or resume, or join) the study until it holds ``config.trials`` finished trials."""
    config.validate()
    train_config = config.train_config()
    spec = train_config.spec()  # unknown model: fail before anything is created
    if config.batch_trials > 1:
        check_batchable(create_model(config.model), spec.trainer, config.model)
    dataset = load_study_dataset(config)
    build_network(train_config, dataset)  # images too small for the architecture: fail before anything is created
    queued = enqueue_params(config, dataset)
    if config.progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it
    tracking.check_tracking_server()
    wait_s = timeout_from_env() if config.tracking_timeout is None else config.tracking_timeout
    storage = make_storage(config.storage, config.heartbeat, wait_s)
    lock = StudyLock(config.storage, config.name, wait_s)
    study, created = open_study(config, storage)
    # mlflow.start_run resumes $MLFLOW_RUN_ID (set by `mlflow run`) when given no run id, which
    # would make every trial log into the project's run instead of a child: take it out.
    project_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    parent = ensure_parent_run(study, created, config, config.storage, project_run_id, lock)
    with lock():  # processes started together would each queue the same points
        for params in queued:
            study.enqueue_trial(params, skip_if_exists=True)
    ctx = _Context(config, dataset, parent, tracking.run_experiment_name(parent), lock,
                   patience=Patience(config.tracking_timeout, RESUME_STUDY))
    try:
        # SIGTERM (kill, a scheduler's time limit, docker stop) stops a study as Ctrl-C does: the trial
        # in flight ends FAILED in Optuna and KILLED in MLflow instead of being left RUNNING.
        with checkpoints.sigterm_as_interrupt(), _torch_threads(config.jobs), tqdm(
                total=config.trials, unit="trial", desc=f"study {config.name}", disable=not config.progress) as bar:
            _work_until_done(study, ctx, bar)
    except BaseException as exc:
        try:  # refreshed at most every SUMMARY_EVERY_S while running: bring it up to date once more
            log_summary(study, parent, one_class_accuracy(dataset.val), config.collapse_margin)
        except Exception:  # the store itself may be what failed; the error being raised says more
            pass
        finished, running = count_trials(study)
        if running == 0 and not isinstance(exc, tracking.ServerGone):  # no other process is working on it
            tracking.end_run_by_id(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                                   f"{type(exc).__name__}: {exc}; re-run the same command to resume")
        if isinstance(exc, KeyboardInterrupt):
            raise StudyInterrupted(f"study {config.name} stopped with {finished} of {config.trials} trials finished; "
                                   "re-run the same command to resume it") from None
        raise
    with lock():  # the workers end together: one of them writes the final summary and publishes the model
        return ctx.patience.patiently(_finish_study, study, parent, config, dataset)  # each step can be redone


def _finish_study(study: optuna.Study, parent: str, config: StudyConfig, dataset: Dataset) -> StudyResult:
    one_class = one_class_accuracy(dataset.val)
    if tracking.run_status(parent) == "FINISHED":  # another worker finished it
        summary = summarize(study, one_class, config.collapse_margin)
        return StudyResult(config.name, parent, summary, tracking.run_tags(parent).get("best_model_uri"))
    end_orphaned_runs(study)
    sweep_checkpoints(study)
    summary = log_summary(study, parent, one_class, config.collapse_margin, plots=True)
    model_uri = publish_best_model(study, parent, config, dataset)
    finished, running = count_trials(study)
    if finished >= config.trials and running == 0:
        tracking.end_run_by_id(parent, "FINISHED")
    return StudyResult(config.name, parent, summary, model_uri)
