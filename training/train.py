"""Train one model: one MLflow run with params, per-epoch metrics, checkpoints and the model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from training import tracking
from training.engine import EpochResult, check_finite, evaluate, evaluate_predictions
from training.trainers import EpochTrainer, make_trainer
from zoo.data import Dataset, Split, load_dataset
from zoo.model_options import coerce_model_config
from zoo.normalization import Normalization
from zoo.registry import ModelSpec, create_model, get_model_spec


# Training settings a model's registry recipe may override (ModelSpec.recipe).
RECIPE_DEFAULTS = {"batch_size": 64, "val_fraction": 0.1, "momentum": 0.0, "keep_best": False}


@dataclass
class TrainConfig:
    model: str = "mnist_cnn"
    dataset: str = "mnist-5k"
    mean: str | None = None  # None: the model's default normalization
    std: str | None = None
    epochs: int = 14  # the pytorch/examples default
    batch_size: int | None = None  # None here and below: the model's recipe (see resolved)
    optimizer: str | None = None
    lr: float | None = None
    gamma: float | None = None
    weight_decay: float = 0.0
    momentum: float | None = None  # SGD momentum (ignored by the other optimizers)
    seed: int = 1
    device: str = "auto"
    data_dir: str | None = None
    val_fraction: float | None = None
    keep_best: bool | None = None  # restore the epoch with the best val_accuracy at the end
    max_batches: int | None = None  # per epoch; for --dry-run and quick tests
    checkpoints: bool = True
    progress: bool = True
    model_config: dict = field(default_factory=dict)  # keyword arguments for the builder

    def spec(self) -> ModelSpec:
        return get_model_spec(self.model)

    def resolved(self) -> "TrainConfig":
        """A copy with every None setting taken from the model's recipe, and model_config typed and checked."""
        spec = self.spec()
        recipe = {"optimizer": spec.optimizer, "lr": spec.lr, "gamma": spec.lr_gamma, **RECIPE_DEFAULTS, **spec.recipe}
        unset = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        return replace(self, **unset, model_config=coerce_model_config(self.model, self.model_config))

    def normalization(self) -> Normalization:
        spec = self.spec()
        if self.mean is None and self.std is None:
            return spec.normalization
        default = spec.normalization
        return Normalization.parse(
            self.mean if self.mean is not None else ",".join(map(str, default.mean)),
            self.std if self.std is not None else ",".join(map(str, default.std)),
            channels=spec.channels,
        )


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None
    network: torch.nn.Module
    normalization: Normalization
    class_names: list[str]
    history: list[EpochResult]
    test_loss: float
    test_accuracy: float

    @property
    def val_accuracy(self) -> float:
        return self.history[-1].val_accuracy if self.history else float("nan")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def check_compatible(spec: ModelSpec, dataset: Dataset) -> None:
    if dataset.image_shape != spec.input_shape:
        raise ValueError(
            f"model {spec.name!r} expects images of shape {spec.input_shape} but dataset {dataset.name!r} "
            f"has {dataset.image_shape}"
        )
    if len(dataset.classes) != spec.num_classes:
        raise ValueError(f"model {spec.name!r} has {spec.num_classes} classes, dataset {dataset.name!r} has {len(dataset.classes)}")


def run_params(config: TrainConfig, normalization: Normalization) -> dict[str, object]:
    config = config.resolved()
    return {
        "model": config.model,
        "dataset": config.dataset,
        **normalization.as_params(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "lr_gamma": config.gamma,
        "weight_decay": config.weight_decay,
        "momentum": config.momentum,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "keep_best": config.keep_best,
        **{f"model_{k}": v for k, v in config.model_config.items()},
    }


class BestEpoch:
    """The weights of the epoch with the best validation accuracy (never chosen on the test set)."""

    def __init__(self) -> None:
        self.epoch, self.val_accuracy, self.state = 0, float("-inf"), None

    def update(self, result: EpochResult, network: torch.nn.Module) -> None:
        if result.val_accuracy > self.val_accuracy:
            self.epoch, self.val_accuracy = result.epoch, result.val_accuracy
            self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def restore(self, network: torch.nn.Module) -> None:
        if self.state is not None:
            network.load_state_dict(self.state)
            tracking.log_metrics({"best_epoch": self.epoch, "best_val_accuracy": self.val_accuracy})


def trainer_for(config: TrainConfig, network: torch.nn.Module) -> EpochTrainer:
    """The trainer ``config``'s model names in the registry, set up with its (resolved) optimizer settings."""
    config = config.resolved()
    return make_trainer(
        config.spec().trainer, network, optimizer=config.optimizer.lower(), lr=config.lr, gamma=config.gamma,
        weight_decay=config.weight_decay, momentum=config.momentum,
    )


def fit(
    config: TrainConfig,
    dataset: Dataset,
    *,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> TrainResult:
    """Train inside the active MLflow run: log params, per-epoch metrics, checkpoints, test metrics.

    ``on_epoch`` is called after each epoch's metrics are logged (a study prunes from it).
    With ``keep_best``, the best epoch by validation accuracy is restored before the test
    and the accuracy curve is logged as a figure. The model itself is not logged here:
    see :func:`train` and ``tracking.log_model``.
    """
    config = config.resolved()
    spec = config.spec()
    check_compatible(spec, dataset)
    normalization = config.normalization()
    device = resolve_device(config.device)
    tracking.log_params(run_params(config, normalization))
    tracking.log_dataset_inputs(dataset.name, dataset.source,
                                {"train": dataset.train, "validation": dataset.val, "test": dataset.test})

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    network = create_model(config.model, **config.model_config).to(device)
    trainer = trainer_for(config, network)
    train_split, val_split, test_split = (
        Split(s.images.to(device), s.labels.to(device)) for s in (dataset.train, dataset.val, dataset.test)
    )

    history: list[EpochResult] = []
    best = BestEpoch()
    per_epoch = len(train_split) if config.max_batches is None else min(len(train_split), config.max_batches * config.batch_size)
    with tqdm(total=per_epoch * config.epochs, unit="img", desc=f"{config.model} on {config.dataset}", disable=not config.progress, leave=False) as bar:
        for epoch in range(1, config.epochs + 1):  # all N epochs (the reference notebook's loop ran N-1)
            started = time.perf_counter()
            train_loss = trainer.train_epoch(
                train_split, normalization, config.batch_size, generator, on_batch=bar.update, max_batches=config.max_batches
            )
            val_loss, val_accuracy = evaluate(network, val_split, normalization)
            trainer.end_epoch()
            result = EpochResult(epoch, train_loss, val_loss, val_accuracy)
            tracking.log_metrics({**result.metrics(), "epoch_seconds": time.perf_counter() - started}, step=epoch)
            check_finite(result)
            if config.checkpoints:
                state = {"model": network.state_dict(), **trainer.state_dict(), "epoch": epoch, "args": asdict(config),
                         "normalization": normalization.to_dict()}
                tracking.log_checkpoint(state, epoch)
            history.append(result)
            if config.keep_best:
                best.update(result, network)
            bar.set_postfix(val_acc=f"{val_accuracy:.4f}", loss=f"{train_loss:.4f}")
            if on_epoch:
                on_epoch(result)

    if config.keep_best:
        best.restore(network)
        tracking.log_figure(accuracy_figure(history, best.epoch, config.model), "val_accuracy.png")
    test_loss, test_accuracy, predicted = evaluate_predictions(network, test_split, normalization)
    tracking.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
    log_test_figures(dataset.test, predicted, normalization, dataset.classes, f"{config.model} on {config.dataset}")
    run_id = tracking.mlflow.active_run().info.run_id
    return TrainResult(run_id, None, network.cpu().eval(), normalization, dataset.classes, history, test_loss, test_accuracy)


def accuracy_figure(history: list[EpochResult], best_epoch: int, title: str):
    """Validation accuracy per epoch with the kept epoch marked (a matplotlib Figure, no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.plot([r.epoch for r in history], [r.val_accuracy for r in history], marker="o", label="val_accuracy")
    ax.axvline(best_epoch, color="tab:red", linestyle="--", label=f"kept: epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.legend()
    return figure


FIGURES = ("confusion_matrix.png", "misclassified.png")  # what every trained model's run shows


def log_test_figures(test: Split, predicted: torch.Tensor, normalization: Normalization, class_names: list[str],
                     title: str) -> None:
    """The confusion matrix and a grid of misclassified images on the test split, as run artifacts."""
    from training.figures import confusion_figure, misclassified_figure

    labels = test.labels.cpu()
    title = f"{title} ({normalization})"
    tracking.log_figure(confusion_figure(labels.numpy(), predicted.numpy(), class_names, title), FIGURES[0])
    tracking.log_figure(misclassified_figure(test, predicted, class_names, title), FIGURES[1])


def short_normalization(normalization: Normalization) -> str:
    """Mean/std as in "0.1307/0.3081" (per-channel values comma-separated), for names and tags."""
    return "/".join(",".join(f"{v:.4g}" for v in values) for values in (normalization.mean, normalization.std))


def readable_run_name(config: TrainConfig, normalization: Normalization) -> str:
    """What tells training runs apart at a glance, e.g. "mnist_cnn mnist-5k norm 0.1307/0.3081 14ep seed1"."""
    name = f"{config.model} {config.dataset} norm {short_normalization(normalization)} {config.epochs}ep seed{config.seed}"
    return name + (" dry-run" if config.max_batches else "")


def training_tags(config: TrainConfig, normalization: Normalization, kind: str) -> dict[str, str]:
    """Tags to filter and group runs by in the UI (``kind``: train or trial)."""
    return {
        tracking.KIND_TAG: kind, "zoo.model": config.model, "zoo.dataset": config.dataset,
        "zoo.normalization": short_normalization(normalization),
        "zoo.normalization_is_default": str(normalization == config.spec().normalization).lower(),
        **({"zoo.dry_run": "true"} if config.max_batches else {}),
    }


def describe_training(config: TrainConfig, normalization: Normalization, dataset: Dataset,
                      result: TrainResult | None = None) -> str:
    """The run's description (markdown): what was trained, on what data, and the result once known."""
    config = config.resolved()
    default = " (the model's default)" if normalization == config.spec().normalization else ""
    batches = f", at most {config.max_batches} batches per epoch" if config.max_batches else ""
    lines = [
        f"Trained **{config.model}** on **{config.dataset}** for {config.epochs} epoch(s){batches}: "
        f"{len(dataset.train):,} training, {len(dataset.val):,} validation and {len(dataset.test):,} test images.",
        "",
        f"Input normalization: mean {','.join(f'{v:g}' for v in normalization.mean)}, "
        f"std {','.join(f'{v:g}' for v in normalization.std)}{default}.",
        f"Recipe: {config.optimizer}, lr {config.lr}, batch {config.batch_size}, seed {config.seed}"
        + (", keeping the epoch with the best validation accuracy." if config.keep_best else "."),
        "",
    ]
    if result is None:
        lines.append("**Result:** none yet (training, or stopped before the test evaluation).")
    else:
        lines += [
            f"**Result:** test accuracy **{100 * result.test_accuracy:.2f} %** "
            f"(validation {100 * result.val_accuracy:.2f} % after the last epoch).",
            "",
            f"Figures: {', '.join(f'`{f}`' for f in FIGURES)} (test split).",
        ]
    return "\n".join(lines)


def load_training_data(config: TrainConfig) -> Dataset:
    """The dataset split the way ``config`` (resolved against its model's recipe) asks."""
    config = config.resolved()
    return load_dataset(config.dataset, data_dir=config.data_dir, val_fraction=config.val_fraction, seed=0)


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    register: str | None = None,
    alias: str | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train ``config.model`` in a new MLflow run (or the one ``mlflow run`` created) and log the model."""
    config = config.resolved()  # unknown model or model option: fail before any run exists
    spec = config.spec()
    config.normalization()  # bad mean/std: same
    trainer_for(config, create_model(config.model, **config.model_config))  # bad optimizer for the model: same
    tracking.check_registry_names(register, alias)
    if dataset is None:
        dataset = load_training_data(config)
    check_compatible(spec, dataset)
    normalization = config.normalization()
    with tracking.start_run(experiment=experiment, run_name=run_name or readable_run_name(config, normalization),
                            tags=training_tags(config, normalization, "train")):
        tracking.set_description(describe_training(config, normalization, dataset))
        result = fit(config, dataset)
        tracking.set_description(describe_training(config, normalization, dataset, result))
        if log_model:
            result.model_uri = tracking.log_model(
                result.network,
                model_name=config.model,
                normalization=result.normalization,
                input_shape=spec.input_shape,
                class_names=dataset.classes,
                registered_name=register,
                alias=alias,
                dataset=config.dataset,
                test_accuracy=result.test_accuracy,
            )
    return result
