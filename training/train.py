"""Train one model: one MLflow run with params, per-epoch metrics, checkpoints and the model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.optim.lr_scheduler import StepLR
from tqdm.auto import tqdm

from training import tracking
from training.engine import EpochResult, check_finite, evaluate, make_optimizer, train_one_epoch
from zoo.data import Dataset, Split, load_dataset
from zoo.normalization import Normalization
from zoo.registry import ModelSpec, create_model, get_model_spec


@dataclass
class TrainConfig:
    model: str = "mnist_cnn"
    dataset: str = "mnist-5k"
    mean: str | None = None  # None: the model's default normalization
    std: str | None = None
    epochs: int = 14  # the pytorch/examples default
    batch_size: int = 64
    optimizer: str | None = None  # None: the model's default recipe
    lr: float | None = None
    gamma: float | None = None
    weight_decay: float = 0.0
    seed: int = 1
    device: str = "auto"
    data_dir: str | None = None
    val_fraction: float = 0.1
    max_batches: int | None = None  # per epoch; for --dry-run and quick tests
    checkpoints: bool = True
    progress: bool = True
    model_config: dict = field(default_factory=dict)  # keyword arguments for the builder

    def spec(self) -> ModelSpec:
        return get_model_spec(self.model)

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
    spec = config.spec()
    return {
        "model": config.model,
        "dataset": config.dataset,
        **normalization.as_params(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer or spec.optimizer,
        "lr": config.lr if config.lr is not None else spec.lr,
        "lr_gamma": config.gamma if config.gamma is not None else spec.lr_gamma,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        **{f"model_{k}": v for k, v in config.model_config.items()},
    }


def fit(
    config: TrainConfig,
    dataset: Dataset,
    *,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> TrainResult:
    """Train inside the active MLflow run: log params, per-epoch metrics, checkpoints, test metrics.

    ``on_epoch`` is called after each epoch's metrics are logged (a study prunes from it).
    The model itself is not logged here: see :func:`train` and ``tracking.log_model``.
    """
    spec = config.spec()
    check_compatible(spec, dataset)
    normalization = config.normalization()
    device = resolve_device(config.device)
    params = run_params(config, normalization)
    tracking.log_params(params)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    network = create_model(config.model, **config.model_config).to(device)
    optimizer = make_optimizer(str(params["optimizer"]), network.parameters(), float(params["lr"]), config.weight_decay)
    scheduler = StepLR(optimizer, step_size=1, gamma=float(params["lr_gamma"]))
    train_split, val_split, test_split = (
        Split(s.images.to(device), s.labels.to(device)) for s in (dataset.train, dataset.val, dataset.test)
    )

    history: list[EpochResult] = []
    per_epoch = len(train_split) if config.max_batches is None else min(len(train_split), config.max_batches * config.batch_size)
    with tqdm(total=per_epoch * config.epochs, unit="img", desc=f"{config.model} on {config.dataset}", disable=not config.progress, leave=False) as bar:
        for epoch in range(1, config.epochs + 1):  # all N epochs (the reference notebook's loop ran N-1)
            started = time.perf_counter()
            train_loss = train_one_epoch(
                network, optimizer, train_split, normalization, config.batch_size, generator,
                on_batch=bar.update, max_batches=config.max_batches,
            )
            val_loss, val_accuracy = evaluate(network, val_split, normalization)
            scheduler.step()
            result = EpochResult(epoch, train_loss, val_loss, val_accuracy)
            tracking.log_metrics({**result.metrics(), "epoch_seconds": time.perf_counter() - started}, step=epoch)
            check_finite(result)
            if config.checkpoints:
                tracking.log_checkpoint(
                    {
                        "model": network.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "args": asdict(config),
                        "normalization": normalization.to_dict(),
                    },
                    epoch,
                )
            history.append(result)
            bar.set_postfix(val_acc=f"{val_accuracy:.4f}", loss=f"{train_loss:.4f}")
            if on_epoch:
                on_epoch(result)

    test_loss, test_accuracy = evaluate(network, test_split, normalization)
    tracking.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
    run_id = tracking.mlflow.active_run().info.run_id
    return TrainResult(run_id, None, network.cpu().eval(), normalization, dataset.classes, history, test_loss, test_accuracy)


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
    spec = config.spec()  # unknown model: fail before any run exists
    config.normalization()  # bad mean/std: same
    tracking.check_registry_names(register, alias)
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, val_fraction=config.val_fraction, seed=0)
    check_compatible(spec, dataset)
    with tracking.start_run(experiment=experiment, run_name=run_name or f"{config.model}-{config.dataset}"):
        result = fit(config, dataset)
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
