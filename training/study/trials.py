"""How a trial runs: its child run (tags, params, description), the objective that trains it with
:func:`training.train.fit`, several trials trained together with :func:`training.train_batch.fit_batch`,
pruning, and the trial's logged model."""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from training import tracking
from training.engine import EpochResult, TrainingDiverged
from training.outage import Outbox, Patience
from training.study.config import (
    MODEL_URI_TAG, OUTCOME_ATTR, RESUME_STUDY, RUN_ATTR, StudyConfig, one_class_accuracy, suggest_normalization,
)
from training.study.storage import StudyLock
from training.train import fit
from training.train_config import TrainConfig, describe_training, short_normalization, training_tags
from training.train_batch import MemberResult, fit_batch
from zoo.data import Dataset
from zoo.normalization import Normalization


@dataclass
class TrialContext:
    """What every trial of this process shares."""

    config: StudyConfig
    dataset: Dataset
    parent_run_id: str
    experiment: str
    claim: StudyLock  # across processes and machines: who may start the next trial
    stop: threading.Event = field(default_factory=threading.Event)  # a worker process failed: start no more trials
    checkpointed_best: str | None = None  # the run of the best trial this process has seen, which keeps its checkpoints
    summary_logged: float = -math.inf  # time.monotonic() of this process's last refresh of the parent's summary
    patience: Patience = field(default_factory=Patience)  # the parent run's writes wait for a server that went away


def _trial_setup(trial: optuna.Trial, ctx: TrialContext) -> tuple[TrainConfig, Normalization, str, dict[str, str]]:
    """The trial's training config, normalization, child run name and tags."""
    config = ctx.config
    normalization = suggest_normalization(trial, config, ctx.dataset.image_shape[0])
    train_config = replace(config.train_config(), **normalization.as_params())
    tags = {**training_tags(train_config, normalization, "trial"),
            "optuna.study_name": config.name, "optuna.trial_number": str(trial.number)}  # training_tags has WORKER_TAG
    if RUN_ATTR in trial.user_attrs:  # a retry inherits the attributes of the trial whose process died
        tags["zoo.retry_of_run_id"] = trial.user_attrs[RUN_ATTR]
    return train_config, normalization, f"trial {trial.number:03d} {short_normalization(normalization, compact=True)}", tags


def _trial_params(trial: optuna.Trial, ctx: TrialContext) -> dict[str, int]:
    return {"trial_number": trial.number, "train_size": len(ctx.dataset.train),
            "val_size": len(ctx.dataset.val), "test_size": len(ctx.dataset.test)}


def objective(trial: optuna.Trial, ctx: TrialContext) -> float:
    config = ctx.config
    train_config, normalization, run_name, tags = _trial_setup(trial, ctx)
    outbox = _start_trial_run(trial, ctx, run_name, tags)
    patiently = outbox.patiently  # every write waits for a tracking server that went away (training goes on)
    try:
        with ExitStack() as run:
            patiently(lambda: run.enter_context(tracking.start_run(
                run_id=outbox.run_id, stopped=(optuna.TrialPruned,), patiently=patiently)))
            patiently(mlflow.set_tag, tracking.NOTE_TAG, _describe_trial(trial, ctx, train_config, normalization))
            patiently(tracking.log_params, _trial_params(trial, ctx))
            try:
                result = fit(train_config, ctx.dataset, on_epoch=_pruning_callback(trial) if config.prune else None,
                             outbox=outbox)
            except TrainingDiverged as exc:
                trial.set_user_attr(OUTCOME_ATTR, "diverged")
                trial.set_user_attr("failure", str(exc))
                raise
            trial.set_user_attr("test_accuracy", result.test_accuracy)
            patiently(mlflow.set_tag, tracking.NOTE_TAG, _describe_trial(trial, ctx, train_config, normalization, result))
            if config.log_models == "all":
                uri = patiently(log_trial_model, result.network, result.normalization, config, ctx.dataset,
                                result.test_accuracy)
                patiently(mlflow.set_tag, MODEL_URI_TAG, uri)
    finally:
        outbox.discard()  # sent, or the trial failed: a trial is retried, never resumed from it
    return result.val_accuracy  # the objective; test accuracy is recorded, never optimized


def _start_trial_run(trial: optuna.Trial, ctx: TrialContext, run_name: str, tags: dict[str, str]) -> Outbox:
    """Create the trial's child run (waiting for a tracking server that went away) and name it in the trial;
    returns the Outbox its epochs go through."""
    from mlflow.tracking.context.registry import resolve_tags

    patience = Patience(ctx.config.tracking_timeout, RESUME_STUDY)
    # One request, so a retry never leaves a half-made run; with the tags mlflow.start_run would add (user, source).
    run_id = patience.patiently(tracking.create_run, experiment=ctx.experiment, run_name=run_name,
                                parent_run_id=ctx.parent_run_id, tags=resolve_tags(tags))
    trial.set_user_attr(RUN_ATTR, run_id)
    return Outbox(run_id, ctx.config.tracking_timeout, RESUME_STUDY)


def _describe_trial(trial: optuna.Trial, ctx: TrialContext, train_config: TrainConfig, normalization: Normalization,
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


def log_trial_model(network: torch.nn.Module, normalization: Normalization, config: StudyConfig,
                     dataset: Dataset, test_accuracy: float, onnx: bool = False) -> str:
    """``onnx``: ship the ONNX graph too (the model is about to be registered)."""
    return tracking.log_model(
        network, model_name=config.model, normalization=normalization, input_shape=dataset.image_shape,
        class_names=dataset.classes, sample_images=dataset.test.images[:2],
        dataset=config.dataset, test_accuracy=test_accuracy, study_name=config.name, onnx=onnx,
    )


def objective_batch(trials: list[optuna.Trial], ctx: TrialContext) -> list[tuple[float | None, TrialState]]:
    """Train ``trials`` together (training.train_batch), each in its own child run; each one's (value, state).

    A trial that diverges or is pruned ends there, its run FAILED or KILLED with the reason; the
    others go on. Any other error ends every run of the batch FAILED (KILLED on Ctrl-C) and is raised.
    As for a lone trial, every write waits for a tracking server that went away (training goes on),
    up to --tracking-timeout: each run has its own Outbox.
    """
    config = ctx.config
    setups = [_trial_setup(trial, ctx) for trial in trials]
    together = ",".join(str(t.number) for t in trials)
    outboxes: list[Outbox] = []
    try:
        for trial, (train_config, normalization, run_name, tags) in zip(trials, setups):
            outbox = _start_trial_run(trial, ctx, run_name, {**tags, "zoo.trained_with_trials": together})
            outboxes.append(outbox)
            outbox.patiently(tracking.log_batch, outbox.run_id,
                             tags={tracking.NOTE_TAG: _describe_trial(trial, ctx, train_config, normalization)})
            outbox.patiently(tracking.log_params, _trial_params(trial, ctx), run_id=outbox.run_id)
        try:
            results = fit_batch([setup[0] for setup in setups], ctx.dataset, [o.run_id for o in outboxes],
                                on_epoch=_batch_pruning_callback(trials) if config.prune else None,
                                stops=(optuna.TrialPruned,), outboxes=outboxes)
        except BaseException as exc:
            if not isinstance(exc, tracking.ServerGone):  # then the runs stay RUNNING: the re-run ends them
                status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
                for outbox in outboxes:
                    tracking.end_run_by_id(outbox.run_id, status, f"{type(exc).__name__}: {exc}")
            raise
        return [_end_batch_trial(trial, result, setup, ctx, outbox)
                for trial, result, setup, outbox in zip(trials, results, setups, outboxes)]
    finally:
        for outbox in outboxes:
            outbox.discard()  # sent, or the trials failed: a trial is retried, never resumed from it


def _end_batch_trial(trial: optuna.Trial, result: MemberResult, setup: tuple[TrainConfig, Normalization, str, Any],
                     ctx: TrialContext, outbox: Outbox) -> tuple[float | None, TrialState]:
    """Record one trial of a batch as :func:`objective` records a lone one, and end its run."""
    train_config, normalization = setup[0], setup[1]
    patiently = outbox.patiently
    if isinstance(result.stopped, TrainingDiverged):
        trial.set_user_attr(OUTCOME_ATTR, "diverged")
        trial.set_user_attr("failure", str(result.stopped))
        patiently(tracking.end_run_by_id, result.run_id, "FAILED", f"TrainingDiverged: {result.stopped}")
        return None, TrialState.FAIL
    if isinstance(result.stopped, optuna.TrialPruned):
        patiently(tracking.end_run_by_id, result.run_id, "KILLED", f"TrialPruned: {result.stopped}")
        return None, TrialState.PRUNED
    trial.set_user_attr("test_accuracy", result.test_accuracy)
    with ExitStack() as run:  # ends it FINISHED
        patiently(lambda: run.enter_context(tracking.start_run(run_id=result.run_id, patiently=patiently)))
        patiently(mlflow.set_tag, tracking.NOTE_TAG, _describe_trial(trial, ctx, train_config, normalization, result))
        if ctx.config.log_models == "all":
            uri = patiently(log_trial_model, result.network, normalization, ctx.config, ctx.dataset, result.test_accuracy)
            patiently(mlflow.set_tag, MODEL_URI_TAG, uri)
    return result.val_accuracy, TrialState.COMPLETE


def _batch_pruning_callback(trials: list[optuna.Trial]):
    one = [_pruning_callback(trial) for trial in trials]

    def on_epoch(member: int, result: EpochResult) -> None:
        one[member](result)

    return on_epoch
