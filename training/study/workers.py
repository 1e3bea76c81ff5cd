"""How processes and machines share one study: :func:`run_study` opens (or joins) it and its one MLflow parent
run, each process claims trials under the study's lock until it holds ``config.trials`` finished ones, and the
last worker finishes it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import replace
from typing import Any, Callable

import optuna
import torch
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import checkpoints, tracking
from training.train_batch import check_batchable
from training.engine import resolve_device
from training.outage import Patience, timeout_from_env
from training.study.best_trial import keep_best_trial_checkpoints, publish_best_model, sweep_checkpoints
from training.study.config import (
    PARENT_ATTR, RESUME_STUDY, StudyConfig, StudyResult, count_trials, enqueue_params, one_class_accuracy,
    suggest_normalization, suggest_settings,
)
from training.study.report import log_summary, summarize
from training.study.storage import (
    StudyLock, absolute_storage_url, end_orphaned_runs, heartbeats, make_storage, open_study, quiet_optuna, repeatable,
)
from training.study.trials import TrialContext, objective, objective_batch
from training.train import build_network, load_training_data
from zoo.access import masked_url
from zoo.data import Dataset
from zoo.machine import usable_cores
from zoo.models.registry import create_model


SUMMARY_EVERY_S = 10.0  # at most one refresh of the parent's summary per process in this time (each is a round of MLflow calls)
MAX_AUTO_JOBS = 8  # trials in flight hold a network and its optimizer each: bound the memory of the default


def load_study_dataset(config: StudyConfig) -> Dataset:
    """The dataset, split as ``zoo train`` splits it, cut to the requested sizes."""
    full = load_training_data(config.train_config())
    return Dataset(full.name, full.classes, full.train.subset(config.train_size),
                   full.val.subset(config.val_size), full.test.subset(config.test_size), full.source, full.skipped)


def default_jobs(device: str = "auto") -> int:
    """Trials at once without ``--jobs``: one per usable core, up to MAX_AUTO_JOBS (small layers split poorly
    across threads; benchmarks/RESULTS.md); one on a GPU."""
    return 1 if resolve_device(device).type != "cpu" else max(1, min(usable_cores(), MAX_AUTO_JOBS))


def _after_trial(ctx: TrialContext, bar: tqdm, study: optuna.Study, trial: FrozenTrial) -> None:
    keep_best_trial_checkpoints(study, trial, ctx)
    bar.update(min(count_trials(study)[0], bar.total) - bar.n)
    if trial.state == TrialState.COMPLETE:
        bar.set_postfix(last=f"{trial.value:.4f}", best=f"{study.best_value:.4f}")
    if not ctx.config.progress:
        tqdm.write(f"study {study.study_name}: trial {trial.number} {trial.state.name.lower()}"
                   + (f", val_accuracy {trial.value:.4f}" if trial.value is not None else ""), file=sys.stderr)
    if time.monotonic() - ctx.summary_logged < SUMMARY_EVERY_S:
        return  # refreshed a moment ago; the study's end always writes the final one
    try:
        ctx.patience.patiently(log_summary, study, ctx.parent_run_id, one_class_accuracy(ctx.dataset.val),
                               ctx.config.collapse_margin, ctx.config.storage)
        ctx.summary_logged = time.monotonic()
    except Exception as exc:  # a refresh that fails (a locked store) must not stop the study
        if isinstance(exc, tracking.ServerGone):
            raise
        tqdm.write(f"study: could not refresh the summary on the parent run ({exc})", file=sys.stderr)


def _claim_trials(study: optuna.Study, ctx: TrialContext, bar: tqdm, most: int = 1) -> list[optuna.Trial]:
    """Up to ``most`` trials to run, asked under the study's lock so N processes never overshoot the target (as
    ``study.optimize`` would); none once it holds ``config.trials`` finished. Waits while every slot is taken."""
    poll_s = min(5.0, max(0.5, ctx.config.heartbeat / 2))
    while not ctx.stop.is_set():
        with ctx.claim():
            end_orphaned_runs(study, ctx.config.heartbeat)
            finished, running = repeatable(count_trials, study)
            if finished >= ctx.config.trials:
                return []
            free = ctx.config.trials - finished - running
            if free > 0:
                with quiet_optuna():
                    trials = [study.ask() for _ in range(min(most, free))]
                for trial in trials:  # sampled now, so the sampler sees it running (TPE's constant liar)
                    suggest_normalization(trial, ctx.config, ctx.dataset.image_shape[0])
                    suggest_settings(trial, ctx.config)
                return trials
        bar.update(min(finished, bar.total) - bar.n)
        time.sleep(poll_s)
    return []


def _run_trials(study: optuna.Study, trials: list[optuna.Trial], ctx: TrialContext) -> list[FrozenTrial]:
    """Train claimed trials with heartbeats and tell each outcome; an error (Ctrl-C included) fails them all."""
    outcomes, error = [(None, TrialState.FAIL)] * len(trials), None
    with heartbeats(ctx.storage, study, trials):
        try:
            outcomes = objective_batch(trials, ctx) if ctx.config.batch_trials > 1 else [objective(trials[0], ctx)]
        except BaseException as exc:
            error = exc
    frozen = [study.tell(trial, value, state=state) for trial, (value, state) in zip(trials, outcomes)]
    if error is not None:
        raise error
    return frozen


def _work(study: optuna.Study, ctx: TrialContext, bar: tqdm) -> None:
    """Claim and run trials until the study is done. ``--jobs N``: N - 1 more processes join it (not threads:
    torch's random generator is one per process); stopping this process stops them, one that fails fails it."""
    count = max(0, min(ctx.config.jobs, ctx.config.trials) - 1)
    # spawn: a fresh interpreter, not a fork of one whose torch, SQLAlchemy and MLflow state is mid-use
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_join_study, args=(ctx.config, torch.get_num_threads()),
                             name=f"study worker {n + 1}") for n in range(count)]
    for worker in workers:
        worker.start()

    def watch() -> None:
        for worker in workers:
            worker.join()
            if worker.exitcode:
                ctx.stop.set()  # this process finishes its trial and starts no more
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        while trials := _claim_trials(study, ctx, bar, ctx.config.batch_trials):
            for one in _run_trials(study, trials, ctx):
                _after_trial(ctx, bar, study, one)
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join()
    failed = [worker.exitcode for worker in workers if worker.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of the study's {count} worker processes failed (exit code "
                           f"{', '.join(map(str, failed))}; their errors are above); {RESUME_STUDY}")


def _join_study(config: StudyConfig, torch_threads: int) -> None:
    # Ctrl-C reaches the whole process group; the first process stops this one (SIGTERM): one interruption.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(torch_threads)
    try:
        run_study(replace(config, jobs=1), bar=False)
    except StudyInterrupted:
        sys.exit(1)  # stopped by the first process, which reports it


def ensure_parent_run(study: optuna.Study, created: bool, config: StudyConfig, project_run_id: str | None,
                      patiently: Callable[..., Any]) -> str:
    """The study's one MLflow parent run, named in a study user attribute: made by the process that created the
    study (or, if it stopped first, by the next one: this is called under the study's lock), adopted by the others,
    reopened on resume. Inside ``mlflow run``, the project's run becomes it, or points at it."""
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        if not created:
            tqdm.write(f"study {study.study_name}: the process that created it stopped before creating its MLflow "
                       "parent run (its error said why): this one creates it", file=sys.stderr)
        return _create_parent_run(study, config, project_run_id)
    if project_run_id and project_run_id != parent:
        patiently(tracking.log_batch, project_run_id, tags={"zoo.study_parent_run_id": parent})
    if patiently(MlflowClient().get_run, parent).info.status != "RUNNING":  # each call can be made twice
        patiently(tracking.reopen_run, parent)  # resuming
    return parent


def _create_parent_run(study: optuna.Study, config: StudyConfig, project_run_id: str | None) -> str:
    storage = masked_url(config.storage)
    tags = {"optuna.study_name": config.name, "optuna.storage": storage, tracking.KIND_TAG: "study",
            "zoo.model": config.model, "zoo.dataset": config.dataset}
    if tracking.is_project_run_here(project_run_id, config.experiment):
        run_id = project_run_id
        tracking.log_batch(run_id, tags={**tags, "mlflow.runName": f"study {config.name}"})
    else:
        run_id = tracking.create_run(experiment=config.experiment, run_name=f"study {config.name}", tags=tags)
        if project_run_id:
            tracking.link_project_run(project_run_id, run_id)
    tracking.log_params({
        "optuna_study": config.name, "optuna_storage": storage, "trials": config.trials,
        "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
        "mean_range": "{:g},{:g}".format(*config.mean_range), "std_range": "{:g},{:g}".format(*config.std_range),
        "mean_scale": "linear", "std_scale": "log", "per_channel": config.per_channel,
        "sampler": config.sampler, "seed": config.seed, "pruner": "median" if config.prune else "none",
        "batch_size": config.batch_size, "train_size": config.train_size, "val_size": config.val_size,
        "test_size": config.test_size, "max_batches": config.max_batches, "collapse_margin": config.collapse_margin,
        "recipe": config.train_config().resolved().recipe,  # what --search varies around
        "search": ",".join(f"{k}={low:g}:{high:g}" for k, (low, high, _) in config.search_space().items()) or None,
        **{k: v for k, v in (("image_size", config.image_size), ("val_fraction", config.val_fraction),
                             ("test_fraction", config.test_fraction)) if v is not None},
    }, run_id=run_id)
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


class StudyInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the study; the message says how far it got."""
    complete_message = True  # no traceback hint (zoo/cli/main.py)


def run_study(config: StudyConfig, *, bar: bool = True) -> StudyResult:
    """Run (or resume, or join) the study until it holds ``config.trials`` finished trials; ``bar``: False
    in the processes ``--jobs`` adds."""
    config.validate()
    # Once, here: the parent run records the URL every worker opens, and it names the database from anywhere.
    config = replace(config, storage=absolute_storage_url(config.storage))
    train_config = config.train_config()
    spec = train_config.spec()  # unknown model: fail before anything is created
    if config.batch_trials > 1:
        check_batchable(create_model(config.model), spec.trainer, config.model)
    # The tracking server, its login, its grants and the storage before the data: decoding a large folder takes
    # minutes, and a worker refused here must leave no study behind that the others would join.
    tracking.check_tracking_server()
    config = replace(config, experiment=config.experiment or tracking.default_experiment())
    tracking.check_can_write(config.experiment, config.register)
    wait_s = timeout_from_env() if config.tracking_timeout is None else config.tracking_timeout
    storage = make_storage(config.storage, config.heartbeat, wait_s)
    lock = StudyLock(config.storage, config.name, wait_s)
    dataset = load_study_dataset(config)
    build_network(train_config, dataset)  # images too small for the architecture: fail before anything is created
    queued = enqueue_params(config, dataset)
    if config.progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it
    # mlflow.start_run would resume $MLFLOW_RUN_ID (set by `mlflow run`): trials would log into the project's run.
    project_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    patience = Patience(wait_s, RESUME_STUDY)
    with lock():  # a process that joins finds the parent run, or none only if its creator failed before making it
        study, created = open_study(config, storage)
        parent = ensure_parent_run(study, created, config, project_run_id, patience.patiently)
        for params in queued:  # processes started together would each queue the same points
            study.enqueue_trial(params, skip_if_exists=True)
    experiment = patience.patiently(lambda: MlflowClient().get_experiment(MlflowClient().get_run(parent).info.experiment_id))
    ctx = TrialContext(config, dataset, parent, experiment.name, lock, storage, patience=patience)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // config.jobs))  # the study's processes share the cores
    try:
        # SIGTERM (kill, a scheduler's limit) stops a study as Ctrl-C does: no trial is left RUNNING.
        with checkpoints.sigterm_as_interrupt(), tqdm(
                total=config.trials, unit="trial", desc=f"study {config.name}", disable=not (config.progress and bar)
        ) as progress:
            _work(study, ctx, progress)
    except BaseException as exc:
        with suppress(Exception):  # brought up to date once more; the error being raised says more than its own
            log_summary(study, parent, one_class_accuracy(dataset.val), config.collapse_margin, config.storage)
        finished, running = count_trials(study)
        if running == 0 and not isinstance(exc, tracking.ServerGone):  # no other process is working on it
            tracking.end_run_by_id(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                                   f"{type(exc).__name__}: {exc}; re-run the same command to resume")
        if isinstance(exc, KeyboardInterrupt):
            raise StudyInterrupted(f"study {config.name} stopped with {finished} of {config.trials} trials finished; "
                                   "re-run the same command to resume it") from None
        raise
    finally:
        torch.set_num_threads(threads)
    with lock():  # the workers end together: one of them writes the final summary and publishes the model
        return ctx.patience.patiently(_finish_study, study, parent, config, dataset)  # each step can be redone


def _finish_study(study: optuna.Study, parent: str, config: StudyConfig, dataset: Dataset) -> StudyResult:
    one_class = one_class_accuracy(dataset.val)
    if (run := MlflowClient().get_run(parent)).info.status == "FINISHED":  # another worker finished it
        summary = summarize(study, one_class, config.collapse_margin)
        model_uri = run.data.tags.get("best_model_uri")
    else:
        end_orphaned_runs(study, config.heartbeat)
        sweep_checkpoints(study)
        summary = log_summary(study, parent, one_class, config.collapse_margin, config.storage, plots=True)
        model_uri = publish_best_model(study, parent, config, dataset)
        finished, running = count_trials(study)
        if finished >= config.trials and running == 0:
            tracking.end_run_by_id(parent, "FINISHED")
    return StudyResult(config.name, parent, summary, model_uri, masked_url(config.storage))
