"""How a trial runs: its child run, the objective that trains it (:func:`training.train.fit`, or several
together with :func:`training.train_batch.fit_batch`), pruning, and the trial's logged model."""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import mlflow
import optuna
import torch
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from training import tracking
from training.engine import EpochResult, TrainingDiverged
from training.outage import Outbox, Patience
from training.study.config import (
    MODEL_URI_TAG, OUTCOME_ATTR, RESUME_STUDY, RUN_ATTR, StudyConfig, one_class_accuracy, suggest_normalization,
    suggest_settings,
)
from training.study.storage import StudyLock, repeatable
from training.train import fit
from training.train_config import TrainConfig, describe_training, short_normalization, training_tags
from training.train_batch import fit_batch
from zoo.data import Dataset
from zoo.normalization import Normalization

Setup = tuple[TrainConfig, Normalization, str, dict[str, str]]  # training config, normalization, run name, tags


@dataclass
class TrialContext:
    """What every trial of this process shares."""
    config: StudyConfig
    dataset: Dataset
    parent_run_id: str
    experiment: str
    claim: StudyLock  # across processes and machines: who may start the next trial
    storage: RDBStorage  # the one make_storage opened (heartbeats)
    stop: threading.Event = field(default_factory=threading.Event)  # a worker process failed: start no more trials
    checkpointed_best: str | None = None  # the run of the best trial this process has seen, which keeps its checkpoints
    may_delete: bool = True  # False after a 403: the login lacks MANAGE, and the admin's re-run cleans up
    summary_logged: float = -math.inf  # time.monotonic() of this process's last refresh of the parent's summary
    patience: Patience = field(default_factory=Patience)  # the parent run's writes wait for a server that went away


def _trial_setup(trial: optuna.Trial, ctx: TrialContext) -> Setup:
    config = ctx.config
    normalization = suggest_normalization(trial, config, ctx.dataset.image_shape[0])
    train_config = replace(config.train_config(), **normalization.as_params(), **suggest_settings(trial, config))
    tags = {**training_tags(train_config, normalization, "trial"),
            "optuna.study_name": config.name, "optuna.trial_number": str(trial.number)}  # training_tags has WORKER_TAG
    if RUN_ATTR in trial.user_attrs:  # a retry inherits the attributes of the trial whose process died
        tags["zoo.retry_of_run_id"] = trial.user_attrs[RUN_ATTR]
    return train_config, normalization, f"trial {trial.number:03d} {short_normalization(normalization, compact=True)}", tags


def objective(trial: optuna.Trial, ctx: TrialContext) -> tuple[float | None, TrialState]:
    """Train one trial in its child run: (validation accuracy, state); the test accuracy is only recorded."""
    setup = _trial_setup(trial, ctx)
    outbox = _start_trial_run(trial, ctx, setup)
    patiently = outbox.patiently  # every write waits for a tracking server that went away (training goes on)
    try:
        with ExitStack() as run:
            patiently(lambda: run.enter_context(tracking.start_run(
                run_id=outbox.run_id, stopped=(optuna.TrialPruned,), patiently=patiently)))
            result = fit(setup[0], ctx.dataset, on_epoch=_pruning_callback(trial) if ctx.config.prune else None,
                         outbox=outbox)
            _record(trial, ctx, setup, result, result.normalization, patiently)
        return result.val_accuracy, TrialState.COMPLETE
    except optuna.TrialPruned:
        return None, TrialState.PRUNED
    except TrainingDiverged as exc:
        _note(trial, {OUTCOME_ATTR: "diverged", "failure": str(exc)})
        return None, TrialState.FAIL
    finally:
        outbox.discard()  # sent, or the trial failed: a trial is retried, never resumed from it


def _start_trial_run(trial: optuna.Trial, ctx: TrialContext, setup: Setup, **tags: str) -> Outbox:
    """Create the trial's child run, named in the trial; the Outbox its epochs go through."""
    from mlflow.tracking.context.registry import resolve_tags

    train_config, normalization, run_name, trial_tags = setup
    # One request, so a retry never leaves a half-made run; with the tags mlflow.start_run would add (user, source).
    run_id = ctx.patience.patiently(
        tracking.create_run, experiment=ctx.experiment, run_name=run_name, parent_run_id=ctx.parent_run_id,
        tags=resolve_tags({**trial_tags, **tags}))
    _note(trial, {RUN_ATTR: run_id})
    outbox = Outbox(run_id, ctx.config.tracking_timeout, RESUME_STUDY)
    outbox.patiently(tracking.log_batch, run_id, tags={tracking.NOTE_TAG: _describe_trial(trial, ctx, train_config, normalization)})
    searched = {name: getattr(train_config, name) for name in ctx.config.search_space()}  # shown before training ends
    outbox.patiently(tracking.log_params, {"trial_number": trial.number, "train_size": len(ctx.dataset.train),
                                           "val_size": len(ctx.dataset.val), "test_size": len(ctx.dataset.test),
                                           **searched}, run_id=run_id)
    return outbox


def _record(trial: optuna.Trial, ctx: TrialContext, setup: Setup, result: Any, model_normalization: Normalization,
            patiently: Callable[..., Any]) -> None:
    _note(trial, {"test_accuracy": result.test_accuracy})
    patiently(mlflow.set_tag, tracking.NOTE_TAG, _describe_trial(trial, ctx, setup[0], setup[1], result))
    if ctx.config.log_models == "all":
        uri = patiently(log_trial_model, result.network, model_normalization, ctx.config, ctx.dataset,
                        result.test_accuracy)
        patiently(mlflow.set_tag, MODEL_URI_TAG, uri)


def _describe_trial(trial: optuna.Trial, ctx: TrialContext, train_config: TrainConfig, normalization: Normalization,
                    result=None) -> str:
    searched = "".join(f", {k} {getattr(train_config, k):.4g}" for k in ctx.config.search_space())
    text = (f"Trial {trial.number} of the Optuna study **{ctx.config.name}** (the parent run), which searches "
            f"the input normalization{' and training settings (this trial: ' + searched[2:] + ')' if searched else ''}."
            f"\n\n" + describe_training(train_config, normalization, ctx.dataset, result))
    threshold = one_class_accuracy(ctx.dataset.val) + ctx.config.collapse_margin
    if result is not None and result.val_accuracy <= threshold:
        text += (f"\n\n**Collapsed:** validation accuracy {100 * result.val_accuracy:.2f} % is at most "
                 f"{100 * threshold:.2f} % (predicting the most frequent class, plus a margin).")
    return text


def _note(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():  # setting an attribute twice is harmless
        repeatable(trial.set_user_attr, key, value)


def _pruning_callback(trial: optuna.Trial) -> Callable[[EpochResult], None]:
    def on_epoch(result: EpochResult) -> None:
        repeatable(trial.report, result.val_accuracy, result.epoch)
        if repeatable(trial.should_prune):
            raise optuna.TrialPruned(f"pruned at epoch {result.epoch} (val_accuracy {result.val_accuracy:.4f})")

    return on_epoch


def log_trial_model(network: torch.nn.Module, normalization: Normalization, config: StudyConfig,
                    dataset: Dataset, test_accuracy: float, onnx: bool = False) -> str:
    return tracking.log_model(
        network, model_name=config.model, normalization=normalization, input_shape=dataset.image_shape,
        class_names=dataset.classes, sample_images=dataset.test.images[:2],
        dataset=config.dataset, test_accuracy=test_accuracy, study_name=config.name, onnx=onnx,
    )


def objective_batch(trials: list[optuna.Trial], ctx: TrialContext) -> list[tuple[float | None, TrialState]]:
    """Train ``trials`` together, each in its own child run; each one's (value, state). A diverged or pruned
    trial ends alone; any other error ends every run of the batch and is raised."""
    setups = [_trial_setup(trial, ctx) for trial in trials]
    together = ",".join(str(t.number) for t in trials)
    outboxes: list[Outbox] = []
    try:
        for trial, setup in zip(trials, setups):
            outboxes.append(_start_trial_run(trial, ctx, setup, **{"zoo.trained_with_trials": together}))
        pruning = [_pruning_callback(trial) for trial in trials] if ctx.config.prune else None
        try:
            results = fit_batch([setup[0] for setup in setups], ctx.dataset, [o.run_id for o in outboxes],
                                on_epoch=pruning and (lambda member, result: pruning[member](result)),
                                stops=(optuna.TrialPruned,), outboxes=outboxes)
        except BaseException as exc:
            if not isinstance(exc, tracking.ServerGone):  # then the runs stay RUNNING: the re-run ends them
                status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
                for outbox in outboxes:
                    tracking.end_run_by_id(outbox.run_id, status, f"{type(exc).__name__}: {exc}")
            raise
        return [_end_batch_trial(*one, ctx) for one in zip(trials, results, setups, outboxes)]
    finally:
        for outbox in outboxes:
            outbox.discard()  # sent, or the trials failed: a trial is retried, never resumed from it


def _end_batch_trial(trial: optuna.Trial, result: Any, setup: Setup, outbox: Outbox,
                     ctx: TrialContext) -> tuple[float | None, TrialState]:
    patiently, stopped = outbox.patiently, result.stopped
    if stopped is not None:  # TrainingDiverged, or TrialPruned
        diverged = isinstance(stopped, TrainingDiverged)
        if diverged:
            _note(trial, {OUTCOME_ATTR: "diverged", "failure": str(stopped)})
        patiently(tracking.end_run_by_id, result.run_id, "FAILED" if diverged else "KILLED",
                  f"{type(stopped).__name__}: {stopped}")
        return None, TrialState.FAIL if diverged else TrialState.PRUNED
    with ExitStack() as run:  # ends it FINISHED
        patiently(lambda: run.enter_context(tracking.start_run(run_id=result.run_id, patiently=patiently)))
        _record(trial, ctx, setup, result, setup[1], patiently)
    return result.val_accuracy, TrialState.COMPLETE
