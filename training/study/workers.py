"""How processes and machines share one study: each claims trials under the study's lock
until the study holds ``config.trials`` finished ones, trains them, and records them; :func:`run_study`
opens (or joins) the study and its parent run, and the last worker to end finishes it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Iterator

import optuna
import torch
from mlflow import MlflowClient
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import checkpoints, tracking
from training.batched import check_batchable
from training.engine import TrainingDiverged, resolve_device
from training.outage import Patience, timeout_from_env
from training.study.best_trial import keep_best_trial_checkpoints, publish_best_model, sweep_checkpoints
from training.study.config import (
    RESUME_STUDY, StudyConfig, StudyResult, count_trials, enqueue_params, one_class_accuracy, suggest_normalization,
)
from training.study.parent_run import ensure_parent_run
from training.study.report import log_summary, summarize
from training.study.storage import StudyLock, absolute_storage_url, end_orphaned_runs, make_storage, open_study
from training.study.trials import TrialContext, objective, objective_batch
from training.train import build_network, load_training_data
from zoo.access import masked_url
from zoo.data import Dataset
from zoo.machine import usable_cores
from zoo.models.registry import create_model


SUMMARY_EVERY_S = 10.0  # at most one refresh of the parent's summary per process in this time (each is a round of MLflow calls)



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

    On the 2-core development machine two 1-thread trials finished more trials per minute
    than one trial on 2 threads (the MNIST CNN's small layers split poorly across threads);
    two 1-thread processes were as fast as one process with two trial threads
    (benchmarks/RESULTS.md)."""
    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(usable_cores(), MAX_AUTO_JOBS))


@contextmanager
def _torch_threads(jobs: int) -> Iterator[None]:
    """Share the cores between the study's ``jobs`` processes instead of oversubscribing them."""
    before = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(max(1, before // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)



def _after_trial(ctx: TrialContext, bar: tqdm, study: optuna.Study, trial: FrozenTrial) -> None:
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
                               ctx.config.collapse_margin, ctx.config.storage)
        ctx.summary_logged = time.monotonic()
    except tracking.ServerGone:
        raise
    except Exception as exc:  # a refresh that fails (a locked store) must not stop the study
        tqdm.write(f"study: could not refresh the summary on the parent run ({exc})", file=sys.stderr)


def _show_progress(bar: tqdm, finished: int) -> None:
    bar.n = min(finished, bar.total)
    bar.refresh()


def _claim_trials(study: optuna.Study, ctx: TrialContext, bar: tqdm, most: int = 1) -> list[optuna.Trial]:
    """The next trials (at most ``most``) this process should run, or none once the study holds
    ``config.trials`` finished trials.

    The race this closes: with ``study.optimize`` each process counts the trials, sees one
    slot left, and starts a trial; N processes doing so at once overshoot by up to N - 1. Here
    counting and starting (``study.ask``, which takes a queued retry first) happen under one
    lock held in the storage, so a trial starts only while finished + running < target, and no
    surplus trial (nor its child run) is ever created. Stale trials are failed under the same
    lock, so a dead trial's slot and its queued retry are accounted together.

    When every slot is taken by a trial in flight, the process waits instead of leaving: if that
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


def _run_trial(study: optuna.Study, trial: optuna.Trial, ctx: TrialContext) -> FrozenTrial:
    """Train one claimed trial and tell Optuna its outcome; a diverged trial is a result, any other error is raised."""
    value, state, error = None, TrialState.FAIL, None
    # Optuna's own heartbeat thread, the one study.optimize runs: a trial whose heartbeat stops
    # belongs to a dead process (optuna.storages._heartbeat is not re-exported publicly).
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value, state = objective(trial, ctx), TrialState.COMPLETE
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


def _run_trial_batch(study: optuna.Study, trials: list[optuna.Trial], ctx: TrialContext) -> list[FrozenTrial]:
    """:func:`_run_trial` for trials trained together: each has its heartbeat, its outcome and its tell."""
    outcomes, error = [(None, TrialState.FAIL)] * len(trials), None
    with ExitStack() as heartbeats:
        for trial in trials:
            heartbeats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        try:
            outcomes = objective_batch(trials, ctx)
        except BaseException as exc:  # Ctrl-C included: the trials are failed, not left RUNNING
            error = exc
    frozen = [study.tell(trial, value, state=state) for trial, (value, state) in zip(trials, outcomes)]
    if error is not None:
        raise error
    return frozen


def _work(study: optuna.Study, ctx: TrialContext, bar: tqdm) -> None:
    together = ctx.config.batch_trials
    while trials := _claim_trials(study, ctx, bar, together):
        frozen = (_run_trial_batch(study, trials, ctx) if together > 1 else
                  [_run_trial(study, trial, ctx) for trial in trials])
        for one in frozen:
            _after_trial(ctx, bar, study, one)


def _work_until_done(study: optuna.Study, ctx: TrialContext, bar: tqdm) -> None:
    """Run trials in this process and ``config.jobs - 1`` more until the study holds ``config.trials`` finished trials."""
    with _extra_workers(ctx):
        _work(study, ctx, bar)


@contextmanager
def _extra_workers(ctx: TrialContext) -> Iterator[None]:
    """``--jobs N``: N - 1 more processes join the study as ``zoo study`` run N times would, each training
    one trial at a time on this process's share of the torch threads.

    Processes, not threads: torch's random generator (initial weights, dropout) is one per process, so
    trials in threads of one process draw from each other's stream and a trial's result would depend
    on what trains beside it. Stopping this process (Ctrl-C, SIGTERM, an error) stops them (SIGTERM:
    each fails its trial as on Ctrl-C) before the study's parent run is ended; one that fails stops
    this one from starting more trials, and the study fails."""
    count = min(ctx.config.jobs, ctx.config.trials) - 1
    if count < 1:
        yield
        return
    # spawn: a fresh interpreter, not a fork of one whose torch, SQLAlchemy and MLflow state is mid-use.
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_join_study, args=(ctx.config, torch.get_num_threads()),
                             name=f"study worker {n + 1}") for n in range(count)]
    for worker in workers:
        worker.start()
    watcher = threading.Thread(target=_stop_when_one_fails, args=(workers, ctx), daemon=True)
    watcher.start()
    try:
        yield
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


def _stop_when_one_fails(workers: list[multiprocessing.process.BaseProcess], ctx: TrialContext) -> None:
    for worker in workers:
        worker.join()
        if worker.exitcode:
            ctx.stop.set()  # this process finishes its trial and starts no more
            return


def _join_study(config: StudyConfig, torch_threads: int) -> None:
    """What a process that ``--jobs`` added runs: the study, one trial at a time, without a progress bar."""
    # Ctrl-C reaches the whole process group; the first process stops this one (SIGTERM) instead,
    # so that a trial is never interrupted twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(torch_threads)
    try:
        run_study(replace(config, jobs=1), bar=False)
    except StudyInterrupted:
        sys.exit(1)  # stopped by the first process, which reports it


class StudyInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the study; the message says how far it got and how to resume."""

    complete_message = True  # no traceback hint (zoo/cli/main.py)


def run_study(config: StudyConfig, *, bar: bool = True) -> StudyResult:
    """Run (or resume, or join) the study until it holds ``config.trials`` finished trials.

    ``bar``: draw the progress bar when ``config.progress`` (the processes ``--jobs`` adds leave it to the first)."""
    config.validate()
    # Once, here: the parent run records the URL every worker opens, and it names the database from anywhere.
    config = replace(config, storage=absolute_storage_url(config.storage))
    train_config = config.train_config()
    spec = train_config.spec()  # unknown model: fail before anything is created
    if config.batch_trials > 1:
        check_batchable(create_model(config.model), spec.trainer, config.model)
    # The tracking server, its login and the storage before the data: decoding a large folder takes minutes.
    tracking.check_tracking_server()
    wait_s = timeout_from_env() if config.tracking_timeout is None else config.tracking_timeout
    storage = make_storage(config.storage, config.heartbeat, wait_s)
    lock = StudyLock(config.storage, config.name, wait_s)
    dataset = load_study_dataset(config)
    build_network(train_config, dataset)  # images too small for the architecture: fail before anything is created
    queued = enqueue_params(config, dataset)
    if config.progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it
    study, created = open_study(config, storage)
    # mlflow.start_run resumes $MLFLOW_RUN_ID (set by `mlflow run`) when given no run id, which
    # would make every trial log into the project's run instead of a child: take it out.
    project_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    parent = ensure_parent_run(study, created, config, config.storage, project_run_id, lock)
    with lock():  # processes started together would each queue the same points
        for params in queued:
            study.enqueue_trial(params, skip_if_exists=True)
    patience = Patience(config.tracking_timeout, RESUME_STUDY)
    ctx = TrialContext(config, dataset, parent, patience.patiently(tracking.run_experiment_name, parent), lock,
                       patience=patience)
    try:
        # SIGTERM (kill, a scheduler's time limit, docker stop) stops a study as Ctrl-C does: the trial
        # in flight ends FAILED in Optuna and KILLED in MLflow instead of being left RUNNING.
        with checkpoints.sigterm_as_interrupt(), _torch_threads(config.jobs), tqdm(
                total=config.trials, unit="trial", desc=f"study {config.name}", disable=not (config.progress and bar)
        ) as progress:
            _work_until_done(study, ctx, progress)
    except BaseException as exc:
        try:  # refreshed at most every SUMMARY_EVERY_S while running: bring it up to date once more
            log_summary(study, parent, one_class_accuracy(dataset.val), config.collapse_margin, config.storage)
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
    if (run := MlflowClient().get_run(parent)).info.status == "FINISHED":  # another worker finished it
        summary = summarize(study, one_class, config.collapse_margin)
        return StudyResult(config.name, parent, summary, run.data.tags.get("best_model_uri"),
                           masked_url(config.storage))
    end_orphaned_runs(study)
    sweep_checkpoints(study)
    summary = log_summary(study, parent, one_class, config.collapse_margin, config.storage, plots=True)
    model_uri = publish_best_model(study, parent, config, dataset)
    finished, running = count_trials(study)
    if finished >= config.trials and running == 0:
        tracking.end_run_by_id(parent, "FINISHED")
    return StudyResult(config.name, parent, summary, model_uri, masked_url(config.storage))
