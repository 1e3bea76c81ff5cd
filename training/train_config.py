"""What one training run is set to do (TrainConfig, resolved against the model's recipe, and its input
normalization) and how its MLflow run shows it: params, name, tags and description."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from training import checkpoints, tracking
from training.checkpoints import DEFAULT_KEEP
from training.recipes import SETTINGS, recipe_settings
from zoo.data import Dataset
from zoo.model_options import coerce_model_config
from zoo.normalization import Normalization, parse_floats
from zoo.models.registry import TIMM_PREFIX, ModelSpec, get_model_spec
from zoo.errors import UsageError

AUTO = "auto"  # --mean/--std auto: the training split's per-channel statistics

# Training settings a model's registry recipe may override (ModelSpec.recipe).
RECIPE_DEFAULTS = {"batch_size": 64, "val_fraction": 0.1, "momentum": 0.0, "keep_best": False, "crop_mode": "squash"}


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
    weight_decay: float | None = None  # None here and below: the recipe's (training/recipes.py)
    momentum: float | None = None  # SGD momentum (ignored by the other optimizers)
    seed: int = 1
    device: str = "auto"
    precision: str = "fp32"  # or "bf16-mixed" (training.engine.PRECISIONS)
    data_dir: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None  # image folders without test/ (zoo.folder_dataset; None: 0.2)
    image_size: str | None = None  # image folders: "32" or "48x64"; None: the images' own size, or the model's
    keep_best: bool | None = None  # restore the epoch with the best val_accuracy at the end
    max_batches: int | None = None  # per epoch; for --dry-run and quick tests
    checkpoints: bool = True  # False: none, whatever keep_checkpoints says
    keep_checkpoints: str = DEFAULT_KEEP  # see training/checkpoints.py
    progress: bool = True
    model_config: dict = field(default_factory=dict)  # keyword arguments for the builder
    recipe: str | None = None  # None: finetune from pretrained weights, light for timm: models, else seed
    schedule: str | None = None  # step (StepLR by gamma each epoch), cosine (warmup, then cosine), onecycle
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    ema: float | None = None  # decay of the weights' moving average; 0: off
    patience: int | None = None  # early stopping: epochs without a better val_accuracy; 0: off
    crop_pad: int | None = None  # random crop after zero padding by this many pixels
    scale: str | None = None  # random resized crop area range "MIN,MAX"; "": off
    hflip: float | None = None  # horizontal flip probability
    aa: str | None = None  # trivialaugment, randaugment or none
    reprob: float | None = None  # random erasing probability
    mixup: float | None = None  # alpha; 0: off
    cutmix: float | None = None  # alpha; 0: off
    crop_mode: str | None = None  # image folders: squash (stretch, the default) or center (aspect kept)

    def spec(self) -> ModelSpec:
        return get_model_spec(self.model)

    def is_default(self, normalization: Normalization) -> bool:
        return normalization == self.spec().normalization.for_data(normalization.channels)

    def resolved(self) -> "TrainConfig":
        """A copy with every None setting taken from the named recipe, then the model's own, and model_config
        typed and checked."""
        spec = self.spec()
        model_config = coerce_model_config(self.model, self.model_config)
        recipe = self.recipe or default_recipe(spec, model_config)
        settings = {"optimizer": spec.optimizer, "lr": spec.lr, "gamma": spec.lr_gamma, **RECIPE_DEFAULTS, **spec.recipe}
        settings |= recipe_settings(recipe, self.optimizer or settings["optimizer"])
        unset = {k: v for k, v in settings.items() if getattr(self, k) is None}
        return replace(self, **unset, recipe=recipe, model_config=model_config)

    def kept_checkpoints(self) -> frozenset[str]:
        return checkpoints.parse_keep(self.keep_checkpoints) if self.checkpoints else frozenset()

    def normalization(self, dataset: Dataset | None = None) -> Normalization:
        """The model's default, the given values, or with ``auto`` the training split's statistics."""
        given = [len(parse_floats(v, what)) for v, what in ((self.mean, "mean"), (self.std, "std")) if v not in (None, AUTO)]
        channels = dataset.image_shape[0] if dataset is not None else max([self.spec().channels, *given])
        default = self.spec().normalization.for_data(channels)
        if self.mean is None and self.std is None:
            return default
        mean, std = (",".join(map(str, d)) if v is None else v for v, d in ((self.mean, default.mean), (self.std, default.std)))
        if AUTO in (mean, std):
            if dataset is None:
                raise UsageError("--mean/--std auto is computed from the training data, which is not loaded yet")
            measured = dataset.pixel_statistics()
            mean = measured.mean if mean == AUTO else mean
            std = measured.std if std == AUTO else std
        return Normalization.parse(mean, std, channels=channels)

    def check_normalization(self) -> None:
        """Fail on a bad --mean/--std before any data is loaded (``auto`` is checked once the data is)."""
        if AUTO not in (self.mean, self.std):
            self.normalization()
        elif self.std not in (None, AUTO):
            Normalization.parse(0.0, self.std, channels=len(parse_floats(self.std, "std")))
        elif self.mean not in (None, AUTO):
            Normalization.parse(self.mean, 1.0, channels=len(parse_floats(self.mean, "mean")))


def default_recipe(spec: ModelSpec, model_config: dict) -> str:
    """finetune from pretrained weights, light for timm: models; the zoo's own models keep their seed protocols,
    on any data: augmented, they underfit (LeNet-5 on a folder, benchmarks/RESULTS.md, issue 32)."""
    if not spec.name.startswith(TIMM_PREFIX):
        return "seed"
    return "finetune" if model_config.get("pretrained") or model_config.get("weights") else "light"


def check_contradictions(config: TrainConfig) -> None:
    """Refuse options given together (``config`` as given, not resolved) that cannot both apply."""
    schedule = config.resolved().schedule
    if config.gamma is not None and schedule != "step":
        raise UsageError(f"--gamma is the step schedule's decay per epoch, and the schedule is {schedule}: leave "
                         "--gamma out, or give --schedule step")
    if config.warmup_epochs and schedule == "step":
        raise UsageError("--warmup-epochs applies to the cosine and onecycle schedules, and the schedule is step: "
                         "give --schedule cosine or onecycle, or leave --warmup-epochs out")


def fitted_note(spec: ModelSpec, dataset: Dataset) -> str | None:
    """What changed in the architecture to fit the data (stderr and the run's description)."""
    shape, size = dataset.image_shape, "x".join(map(str, dataset.image_shape))
    if shape == spec.input_shape and len(dataset.classes) == spec.num_classes:
        return None
    return (f"{spec.name} built for {size} images and {len(dataset.classes)} classes (it was "
            f"designed for {'x'.join(map(str, spec.input_shape))} and {spec.num_classes}): the first layer takes "
            f"{shape[0]} channel(s), the layers sized by the image follow its size, the last layer has "
            f"{len(dataset.classes)} outputs")


def dataset_label(dataset: str) -> str:
    return Path(dataset).name if os.sep in dataset else dataset


# TrainConfig fields a run logs as params under their own names (the recipe's settings resolved).
PARAM_FIELDS = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "seed",
                "precision", "val_fraction", "keep_best", "recipe", *SETTINGS, "crop_mode")


def run_params(config: TrainConfig, normalization: Normalization, dataset: Dataset | None = None) -> dict[str, object]:
    config = config.resolved()
    data = {} if dataset is None else {"image_shape": "x".join(map(str, dataset.image_shape)),
                                       "classes": len(dataset.classes), "skipped_files": dataset.skipped or None}
    return {**{k: getattr(config, k) for k in PARAM_FIELDS}, **normalization.as_params(), **data,
            # normalization_from=data: mean/std hold the training split's statistics
            "normalization_from": "data" if AUTO in (config.mean, config.std) else None,
            "lr_gamma": config.gamma, **{f"model_{k}": v for k, v in config.model_config.items()}}


FIGURES = ("confusion_matrix.png", "misclassified.png")  # what every trained model's run shows


def short_normalization(normalization: Normalization, compact: bool = False) -> str:
    """Mean/std as "0.1307/0.3081", per channel comma-separated when they differ: every digit (the tag
    ``zoo.normalization``), or ``compact`` for names: 4 digits, per channel 2 (".48,.46,.41/.23,.22,.23")."""

    def values(numbers: tuple[float, ...]) -> str:
        numbers = numbers[:1] if len(set(numbers)) == 1 else numbers
        if not compact:  # 0.5 and 1, as typed, not 1.0
            return ",".join(repr(v).removesuffix(".0") for v in numbers)
        if len(numbers) == 1:
            return f"{numbers[0]:.4g}"
        return ",".join(f"{v:.2g}".replace("0.", ".", 1) if abs(v) < 1 else f"{v:.2g}" for v in numbers)

    return f"{values(normalization.mean)}/{values(normalization.std)}"


def normalization_word(config: TrainConfig, normalization: Normalization) -> str:
    """The normalization in a run's name: ``auto``, ``none`` (0/1), ``default`` (the model's), else the values."""
    if AUTO in (config.mean, config.std):
        return AUTO
    if normalization == Normalization.identity(normalization.channels):
        return "none"
    if config.is_default(normalization):
        return "default"
    return short_normalization(normalization, compact=True)


def readable_run_name(config: TrainConfig, normalization: Normalization) -> str:
    """Model and normalization first (the UI's runs table shows about 22 characters), then the rest:
    "mnist_cnn default · mnist-5k 14ep s1 [2 batches/epoch]"."""
    batches = f" {config.max_batches} batches/epoch" if config.max_batches else ""
    return (f"{config.model} {normalization_word(config, normalization)}{tracking.NAME_DETAIL}"
            f"{dataset_label(config.dataset)} {config.epochs}ep s{config.seed}{batches}")


def training_tags(config: TrainConfig, normalization: Normalization, kind: str) -> dict[str, str]:
    """Tags to filter and group runs by in the UI (``kind``: train or trial)."""
    return {tracking.KIND_TAG: kind, "zoo.model": config.model, "zoo.dataset": config.dataset,
            "zoo.normalization": short_normalization(normalization),
            "zoo.normalization_is_default": str(config.is_default(normalization)).lower(),
            **({"zoo.max_batches": str(config.max_batches)} if config.max_batches else {}), **checkpoints.worker_tags()}


def recipe_summary(config: TrainConfig) -> str:
    """The resolved schedule and what is on among the recipe's settings, in words: "cosine schedule (1 warmup
    epoch), label smoothing 0.1, crop pad 4, hflip 0.5, weight decay 0.05"."""
    schedule = (f"step schedule (gamma {config.gamma})" if config.schedule == "step"
                else f"{config.schedule} schedule ({config.warmup_epochs:g} warmup epochs)")
    on = [f"{name.replace('_', ' ')} {getattr(config, name)}" for name in SETTINGS
          if name not in ("schedule", "warmup_epochs") and getattr(config, name) not in (0, "", "none")]
    return ", ".join([schedule, *on] if on else [schedule, "no augmentation"])


def describe_training(config: TrainConfig, normalization: Normalization, dataset: Dataset,
                      result: Any = None) -> str:
    """The run's description (markdown): what was trained, on what data, and the result once known."""
    config = config.resolved()
    default = (" (the model's default)" if config.is_default(normalization)
               else " (the training split's own statistics)" if AUTO in (config.mean, config.std) else "")
    batches = f", at most {config.max_batches} batches per epoch" if config.max_batches else ""
    skipped = f" ({dataset.skipped:,} unreadable files skipped)" if dataset.skipped else ""
    lines = [
        f"Trained **{config.model}** on **{dataset_label(config.dataset)}** for {config.epochs} epoch(s){batches}: "
        f"{len(dataset.train):,} training, {len(dataset.val):,} validation and {len(dataset.test):,} test images"
        f"{skipped}, {'x'.join(map(str, dataset.image_shape))}, classes {', '.join(dataset.classes[:12])}"
        f"{', ...' if len(dataset.classes) > 12 else ''}.",
        "",
        *([note, ""] if (note := fitted_note(config.spec(), dataset)) else []),
        f"Input normalization: mean {','.join(f'{v:g}' for v in normalization.mean)}, "
        f"std {','.join(f'{v:g}' for v in normalization.std)}{default}.",
        f"Recipe **{config.recipe}**: {config.optimizer}, lr {config.lr}, batch {config.batch_size}, seed "
        f"{config.seed}, {recipe_summary(config)}"
        + (", keeping the epoch with the best validation accuracy." if config.keep_best else "."),
        "",
    ]
    if result is None:  # result: train.TrainResult or train_batch.MemberResult
        return "\n".join([*lines, "**Result:** none yet (training, or stopped before the test evaluation)."])
    return "\n".join([*lines, f"**Result:** test accuracy **{100 * result.test_accuracy:.2f} %** (validation "
                      f"{100 * result.val_accuracy:.2f} % after the last epoch).", "",
                      f"Figures: {', '.join(f'`{f}`' for f in FIGURES)} (test split)."])
