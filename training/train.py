"""Train one model into one MLflow run (params, per-epoch metrics, checkpoints, the model); stop and resume it."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import mlflow
import torch
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import checkpoints, registration, tracking
from training.augment import Augment, check_augmentation
from training.outage import Outbox, local_checkpoint
from training.engine import (
    EpochResult, check_precision, check_seed_recipe, evaluate, evaluate_predictions, make_trainer, resolve_device, splits_on,
)
from training.epochs import BestEpoch, EpochBookkeeping
from training.train_config import (
    AUTO, FIGURES, TrainConfig, dataset_label, describe_training, fitted_note, readable_run_name, run_params,
    short_normalization, training_tags,
)
from zoo.access import masked_url
from zoo.data import Dataset, load_dataset
from zoo.folder_dataset import parse_image_size, served_resize
from zoo.normalization import Normalization
from zoo.models.registry import create_model
from zoo.errors import UsageError


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None = None
    network: torch.nn.Module | None = None  # trained (CPU, eval mode)
    normalization: Normalization | None = None
    class_names: list[str] = field(default_factory=list)
    history: list[EpochResult] = field(default_factory=list)
    test_loss: float | None = None
    test_accuracy: float | None = None

    @property
    def val_accuracy(self) -> float:
        return self.history[-1].val_accuracy if self.history else float("nan")


def build_network(config: TrainConfig, dataset: Dataset) -> torch.nn.Module:
    """``config``'s model fitted to ``dataset`` (a ValueError when the images are too small)."""
    config = config.resolved()
    return create_model(config.model, input_shape=dataset.image_shape, num_classes=len(dataset.classes),
                        **config.model_config)


def seeded_network(config: TrainConfig, dataset: Dataset) -> torch.nn.Module:
    """The network a run starts from: its weights and the RNG stream after them (dropout) follow from the seed."""
    torch.manual_seed(config.seed)
    return build_network(config, dataset)


def trainer_for(config: TrainConfig, network: torch.nn.Module, *, steps_per_epoch: int = 1, augment: Any = None):
    """``config``'s trainer; ``steps_per_epoch`` sizes a per-batch schedule, ``augment`` (training.augment.Augment)
    gives the images trained on."""
    config = config.resolved()
    trainer = config.spec().trainer
    settings = dict(optimizer=config.optimizer.lower(), lr=config.lr, gamma=config.gamma,
                    weight_decay=config.weight_decay, momentum=config.momentum, precision=config.precision)
    if trainer == "autograd":
        settings |= dict(schedule=config.schedule, warmup_epochs=config.warmup_epochs, label_smoothing=config.label_smoothing,
                         ema=config.ema, steps_per_epoch=steps_per_epoch, epochs=config.epochs, augment=augment)
    else:
        check_seed_recipe(config, f"{config.model} (its own {trainer} trainer)")
    return make_trainer(trainer, network, **settings)


def fit(config: TrainConfig, dataset: Dataset, *, on_epoch: Callable[[EpochResult], None] | None = None,
        resume: dict[str, Any] | None = None, outbox: Outbox | None = None,
        network: torch.nn.Module | None = None) -> TrainResult:
    """Train inside the active run, logging all but the model; ``on_epoch`` follows each epoch's logging (a study
    prunes there), ``resume`` is a ``last`` checkpoint, ``outbox`` keeps training while the server is away."""
    config = config.resolved()
    normalization = config.normalization(dataset)
    device = resolve_device(config.device)
    patiently(outbox, tracking.log_params, run_params(config, normalization, dataset))
    if resume is None:  # a resumed run logged its inputs when it started
        patiently(outbox, tracking.log_dataset_inputs, dataset.name, dataset.source,
                  {"train": dataset.train, "validation": dataset.val, "test": dataset.test})

    network = (network if network is not None else seeded_network(config, dataset)).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    augment = Augment(config, len(dataset.classes), generator)  # draws from the shuffling generator: resumable
    train_split, val_split, test_split = splits_on(dataset, device)
    steps = math.ceil(len(train_split) / config.batch_size)
    trainer = trainer_for(config, network, augment=augment,
                          steps_per_epoch=steps if config.max_batches is None else min(steps, config.max_batches))
    model = trainer.model  # the network, or with EMA its average: validated, kept as best, tested and logged

    history: list[EpochResult] = []
    best = BestEpoch(keep_weights=config.keep_best)
    if resume is not None:  # a ``last`` checkpoint: weights, optimizer, scheduler, RNG states, history, best epoch
        model.load_state_dict(resume["model"])
        trainer.load_state_dict(resume)
        checkpoints.restore_rng(resume["rng"], generator)
        history.extend(EpochResult(**r) for r in resume["history"])
        best.epoch, best.val_accuracy = resume["best"]["epoch"], resume["best"]["val_accuracy"]
        best.state = resume.get("best_model")
    book = EpochBookkeeping(model, config, normalization, generator, trainer.state_dict, history, best,
                            config.kept_checkpoints(), outbox)
    per_epoch = len(train_split) if config.max_batches is None else min(len(train_split), config.max_batches * config.batch_size)
    with tqdm(total=per_epoch * (config.epochs - len(history)), unit="img", desc=f"{config.model} on {dataset_label(config.dataset)}", disable=not config.progress, leave=False) as bar:
        for epoch in range(len(history) + 1, config.epochs + 1):  # all N epochs (the reference notebook's loop ran N-1)
            if config.patience and epoch - 1 - best.epoch >= config.patience:  # from the history: resumes the same
                tqdm.write(f"early stopping after epoch {epoch - 1}: no better val_accuracy since epoch {best.epoch} "
                           f"(--patience {config.patience})", file=sys.stderr)
                patiently(outbox, mlflow.log_metric, "stopped_epoch", epoch - 1)
                break
            started, lr = time.perf_counter(), trainer.lr
            train_loss = trainer.train_epoch(
                train_split, normalization, config.batch_size, generator, on_batch=bar.update, max_batches=config.max_batches
            )
            val_loss, val_accuracy = evaluate(model, val_split, normalization, precision=config.precision)
            trainer.end_epoch()
            result = EpochResult(epoch, train_loss, val_loss, val_accuracy, lr)
            book.record(result, time.perf_counter() - started)
            bar.set_postfix(val_acc=f"{val_accuracy:.4f}", loss=f"{train_loss:.4f}")
            if on_epoch:
                on_epoch(result)

    if outbox is not None:
        outbox.wait_and_send()  # the server holds every epoch before the run goes on (or ServerGone)
    if config.keep_best:
        from training.figures import accuracy_figure  # matplotlib: only when the figure is drawn

        best.restore(model)
        patiently(outbox, mlflow.log_figure, accuracy_figure(history, best.epoch, config.model), "val_accuracy.png")
    test_loss, test_accuracy, predicted = evaluate_predictions(model, test_split, normalization, precision=config.precision)
    patiently(outbox, log_test_results, test_loss, test_accuracy, dataset, predicted, normalization, config)
    run_id = tracking.mlflow.active_run().info.run_id
    return TrainResult(run_id, None, model.cpu().eval(), normalization, dataset.classes, history, test_loss, test_accuracy)


def patiently(outbox: Outbox | None, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return call(*args, **kwargs) if outbox is None else outbox.patiently(call, *args, **kwargs)


def log_test_results(test_loss: float, test_accuracy: float, dataset: Dataset, predicted: torch.Tensor,
                     normalization: Normalization, config: TrainConfig, run_id: str | None = None) -> None:
    """Test metrics, the confusion matrix and the misclassified images, titled short (every digit is in the params)."""
    from training.figures import confusion_figure, misclassified_figure

    mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy}, run_id=run_id)
    client, run_id = mlflow.MlflowClient(), run_id or mlflow.active_run().info.run_id
    test, names = dataset.test, dataset.classes
    title = f"{config.model} on {dataset_label(config.dataset)} ({short_normalization(normalization, compact=True)})"
    client.log_figure(run_id, confusion_figure(test.labels.cpu().numpy(), predicted.numpy(), names, title), FIGURES[0])
    client.log_figure(run_id, misclassified_figure(test, predicted, names, title), FIGURES[1])


def load_training_data(config: TrainConfig) -> Dataset:
    config = config.resolved()
    return load_dataset(config.dataset, data_dir=config.data_dir, val_fraction=config.val_fraction, seed=0,
                        test_fraction=config.test_fraction, image_size=parse_image_size(config.image_size),
                        default_size=config.spec().input_shape[1:], progress=config.progress, crop_mode=config.crop_mode)


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training; the run ended KILLED, its checkpoints kept."""

    complete_message = True  # it names the command that continues: no traceback hint (zoo/cli/main.py)


def train(config: TrainConfig, *, dataset: Dataset | None = None, experiment: str | None = None,
          run_name: str | None = None, register: str | None = None, alias: str | None = None, log_model: bool = True,
          run_id: str | None = None, resume_from: dict[str, Any] | None = None,
          tracking_timeout: float | None = None) -> TrainResult:
    """Train in a new run (or ``run_id``, from ``resume_from``) and log the model; a tracking server that goes away
    is waited for up to ``tracking_timeout`` s (training/outage.py)."""
    config = config.resolved()  # unknown model or model option: fail before any run exists
    config.check_normalization()  # bad mean/std: same
    parse_image_size(config.image_size)  # bad --image-size: same
    check_augmentation(config)  # bad --scale, --hflip, ...: same
    config.kept_checkpoints()  # bad --keep-checkpoints: same
    check_precision(config.precision, resolve_device(config.device))  # unknown precision, no GPU: same
    if config.spec().trainer != "autograd":  # a recipe its own trainer lacks: same
        check_seed_recipe(config, f"{config.model} (its own {config.spec().trainer} trainer)")
    registration.check_registry_names(register, alias)
    tracking.check_tracking_server()
    if run_id is None:
        tracking.check_can_write(experiment or tracking.default_experiment(), register)
    if dataset is None:
        dataset = load_training_data(config)
    network = seeded_network(config, dataset)  # images too small for the architecture: same
    trainer_for(config, network)  # bad optimizer for the model: same
    note = fitted_note(config.spec(), dataset)
    if note and run_id is None:
        tqdm.write(f"note: {note}", file=sys.stderr)
    normalization = config.normalization(dataset)
    if run_id is None:
        run_name = run_name or readable_run_name(config, normalization)
    outbox: Outbox | None = None
    try:
        with checkpoints.sigterm_as_interrupt(), tracking.start_run(
            experiment=experiment, run_name=run_name, run_id=run_id, tags=training_tags(config, normalization, "train"),
        ) as run:
            outbox = Outbox(run.info.run_id, tracking_timeout)
            outbox.send()  # what a run stopped by an outage still held (see resume)
            if resume_from is None:
                mlflow.set_tag(tracking.NOTE_TAG, describe_training(config, normalization, dataset))
            result = fit(config, dataset, resume=resume_from, outbox=outbox, network=network)
            outbox.patiently(mlflow.set_tag, tracking.NOTE_TAG, describe_training(config, normalization, dataset, result))
            if log_model:
                result.model_uri = outbox.patiently(
                    tracking.log_model, result.network, model_name=config.model, normalization=result.normalization,
                    input_shape=dataset.image_shape, class_names=dataset.classes,
                    sample_images=dataset.test.images[:2], registered_name=register, alias=alias,
                    dataset=config.dataset, test_accuracy=result.test_accuracy,
                    resize=served_resize(config.dataset, config.crop_mode, dataset.image_shape))
        outbox.close()
    except tracking.ServerGone:
        raise  # the run's local folder stays: `zoo train --resume` reads it
    except BaseException as exc:
        if outbox is not None:
            outbox.close()
            if isinstance(exc, KeyboardInterrupt):
                raise TrainingInterrupted(interrupted_message(outbox.run_id)) from None
        raise
    return result


def interrupted_message(run_id: str) -> str:
    last = checkpoints.checkpoint_path(checkpoints.LAST)
    client = mlflow.MlflowClient()
    if last in {a.path for a in client.list_artifacts(run_id, tracking.CHECKPOINTS)}:
        epoch = len(client.get_metric_history(run_id, "val_accuracy"))
        return (f"training stopped: run {run_id} ended KILLED after epoch {epoch}, its last checkpoint kept; "
                f"continue it with: zoo train --resume {run_id}")
    return f"training stopped: run {run_id} ended KILLED with no {last} to resume from"


# Settings a resumed run may change: where and how it runs, not what it trains.
RESUME_MAY_CHANGE = ("device", "precision", "data_dir", "progress", "keep_checkpoints", "checkpoints")
_OPTION_NAMES = {"model_config": "--model-opt", "max_batches": "--max-batches/--dry-run"}  # TrainConfig field -> zoo train option


def resume(run_id: str, options: dict[str, Any] | None = None, **train_kwargs: Any) -> TrainResult:
    """Continue run ``run_id`` from its last checkpoint; ``options`` (TrainConfig fields) must agree with its config
    but for RESUME_MAY_CHANGE."""
    config, state = config_to_resume(run_id, options or {})
    tqdm.write(f"resuming run {run_id} after epoch {state['epoch']} of {config.epochs}", file=sys.stderr)
    tracking.reopen_run(run_id)
    return train(config, run_id=run_id, resume_from=state, **train_kwargs)


def config_to_resume(run_id: str, options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UsageError(f"no MLflow run {run_id!r} in {masked_url(mlflow.get_tracking_uri())}; check the id (MLflow UI, "
                         "`mlflow runs list`) and MLFLOW_TRACKING_URI") from None
    if run.info.status == "FINISHED":
        raise UsageError(f"run {run_id} is FINISHED: there is nothing to resume; start a new run with zoo train")
    worker = run.data.tags.get(checkpoints.WORKER_TAG)
    if run.info.status == "RUNNING" and checkpoints.worker_alive_here(worker, run.data.tags.get(checkpoints.WORKER_START_TAG)):
        pid = worker.rpartition(":")[2]
        raise UsageError(f"run {run_id} is still training in process {pid} on this machine; stop it first (Ctrl-C "
                         f"there, or kill {pid}: the run ends KILLED with its last checkpoint), then resume it")
    if run.info.status == "RUNNING":  # its process died (SIGKILL, out of memory, lost machine) or is elsewhere
        tqdm.write(f"run {run_id} is still marked RUNNING{f' by {worker}' if worker else ''}, a process that is gone or "
                   "on another machine: resuming it (if that process still trains, both write to the run)", file=sys.stderr)
    state = last_checkpoint(run_id)
    known = {f.name for f in fields(TrainConfig)}
    # A run from before recipes (its args without "recipe") trained the seed recipe, whatever the default is now.
    stored = TrainConfig(**{"recipe": "seed", **{k: v for k, v in state["args"].items() if k in known}}).resolved()
    fixed = {k: v for k, v in options.items() if k not in RESUME_MAY_CHANGE}
    wanted = replace(stored, **fixed).resolved()
    differing = [
        f"{_OPTION_NAMES.get(k, '--' + k.replace('_', '-'))} {getattr(wanted, k)} (the run has {getattr(stored, k)})"
        for k in fixed if k not in ("mean", "std") and getattr(wanted, k) != getattr(stored, k)
    ]
    if {"mean", "std"} & fixed.keys() and (wanted.mean, wanted.std) != (stored.mean, stored.std) and (
            AUTO in (wanted.mean, wanted.std, stored.mean, stored.std) or wanted.normalization() != stored.normalization()):
        differing.append(f"--mean/--std {wanted.normalization()} (the run has {stored.normalization()})")
    if differing:
        raise UsageError(f"run {run_id} was trained with other settings: {'; '.join(differing)}. "
                         "Leave these options out to resume with the run's own, or start a new run")
    return replace(stored, **{k: v for k, v in options.items() if k in RESUME_MAY_CHANGE}), state


def last_checkpoint(run_id: str) -> dict[str, Any]:
    """The ``last`` checkpoint kept on this machine (never older than the server's), else the server's."""
    kept = local_checkpoint(run_id)
    if kept is not None:
        tqdm.write(f"resuming from the checkpoint kept on this machine, {kept}", file=sys.stderr)
        return torch.load(kept, map_location="cpu", weights_only=True)
    last = checkpoints.checkpoint_path(checkpoints.LAST)
    if last not in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, tracking.CHECKPOINTS)}:
        raise UsageError(f"run {run_id} has no {last} to resume from (it stopped before its first epoch ended, or "
                         "was trained with --keep-checkpoints best or none); start a new run with zoo train")
    return tracking.load_checkpoint(run_id, last)
