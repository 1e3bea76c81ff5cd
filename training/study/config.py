"""What a study is: its config and result, the names it stores, samplers, suggestions, finished trials."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from training import checkpoints, registration
from training.train_config import TrainConfig, dataset_label
from zoo.data import Dataset, Split
from zoo.normalization import Normalization
from zoo.errors import UsageError

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute naming the parent run
CONFIG_ATTR = "zoo_study_config"  # what the study searches; a re-run must agree (a system attribute, see storage.stored_search)
OBJECTIVE_NAME = "val_accuracy"  # what Optuna's dashboard and tables call the objective
RUN_ATTR = "mlflow_run_id"  # trial user attribute naming its child run
OUTCOME_ATTR = "outcome"  # "diverged" marks a trial whose failure is a result, not an accident
SAMPLERS = ("tpe", "random", "qmc")
LOG_MODELS = ("best", "all", "none")
MODEL_URI_TAG = "zoo.model_uri"
WORKER_TAG = checkpoints.WORKER_TAG  # HOST:PID of the process that ran a trial
RESUME_STUDY = "re-run the same command to resume the study (the trials it stopped are run again)"  # past --tracking-timeout

# The fields a re-run of an existing study must keep: the experiment that owns it, and what its trials measure.
_IDENTITY = ("experiment", "model", "dataset", "epochs", "mean_range", "std_range", "per_channel", "batch_size",
             "train_size", "val_size", "test_size", "max_batches", "image_size", "val_fraction", "test_fraction",
             "recipe", "search")

# Training settings --search takes: name -> (low, high, scale), the range searched unless NAME=LOW:HIGH is given.
SEARCHABLE: dict[str, tuple[float, float, str]] = {
    "lr": (1e-5, 1e-1, "log"), "weight_decay": (1e-6, 0.1, "log"), "label_smoothing": (0.0, 0.3, "linear"),
    "mixup": (0.0, 1.0, "linear"), "cutmix": (0.0, 1.0, "linear"), "hflip": (0.0, 1.0, "linear"),
    "crop_pad": (0, 8, "int"), "ema": (0.99, 0.9999, "linear"), "warmup_epochs": (0.0, 5.0, "linear"),
    "reprob": (0.0, 0.5, "linear"), "momentum": (0.0, 0.99, "linear"),
}


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
    jobs: int = 1  # trials at once, one per process: this one and jobs - 1 it starts (workers.py says why not threads)
    batch_trials: int = 1  # trials trained together in one batched computation (training/train_batch.py)
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
    val_fraction: float | None = None  # None: the model's recipe (TrainConfig.val_fraction)
    test_fraction: float | None = None  # image folders without test/
    progress: bool = True
    recipe: str | None = None  # each trial's TrainConfig.recipe (None: its default for the model and data)
    search: tuple[str, ...] = ()  # training settings searched beside the normalization: NAME or NAME=LOW:HIGH
    tracking_timeout: float | None = None  # seconds to wait for an MLflow server that goes away (None: ZOO_TRACKING_TIMEOUT, else 600)

    @property
    def name(self) -> str:
        return self.study_name or f"{self.model}-{dataset_label(self.dataset)}-normalization"

    def validate(self) -> None:
        lo, hi = self.mean_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UsageError(f"--mean-range needs two finite numbers LOW < HIGH, got {lo} {hi}")
        lo, hi = self.std_range
        if not (0 < lo < hi and math.isfinite(hi)):
            raise UsageError(f"--std-range needs 0 < LOW < HIGH (it is searched on a log scale), got {lo} {hi}")
        if self.trials < 1 or self.jobs < 1 or self.epochs < 1 or self.batch_trials < 1:
            raise UsageError("--trials, --jobs, --batch-trials and --epochs must be at least 1")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.log_models not in LOG_MODELS:
            raise UsageError(f"--log-models must be one of {', '.join(LOG_MODELS)}, got {self.log_models!r}")
        registration.check_registry_names(self.register, self.alias)
        if self.register and self.log_models == "none":
            raise UsageError("--register needs a logged model; use --log-models best or all")
        self.search_space()
        recipe = self.train_config().resolved().recipe  # an unknown --recipe fails here
        if self.batch_trials > 1 and (self.search or recipe != "seed"):
            what = f"searches {','.join(self.search)}" if self.search else f"trains the {recipe} recipe"
            raise UsageError(f"--batch-trials trains the seed recipe only, and this study {what}: use --batch-trials 1, "
                             "or --recipe seed without --search")

    def search_space(self) -> dict[str, tuple[float, float, str]]:
        """--search as name -> (low, high, scale), the table's ranges unless given."""
        space = {}
        for item in self.search:
            name, _, given = (part.strip() for part in item.partition("="))
            if name not in SEARCHABLE:
                raise UsageError(f"--search: unknown setting {name!r}; searchable: {', '.join(SEARCHABLE)}")
            if name in space:
                raise UsageError(f"--search names {name} twice")
            low, high, scale = SEARCHABLE[name]
            if given:
                try:
                    low, high = (int(v) if scale == "int" else float(v) for v in given.split(":"))
                except ValueError:
                    raise UsageError(f"--search {item}: give {name}'s range as {name}=LOW:HIGH, e.g. "
                                     f"{name}={low:g}:{high:g} ({'whole numbers' if scale == 'int' else 'numbers'})") from None
            if not (math.isfinite(low) and math.isfinite(high) and low < high) or (scale == "log" and low <= 0):
                raise UsageError(f"--search {name} needs {'0 < ' if scale == 'log' else ''}LOW < HIGH, got {low:g}:{high:g}")
            space[name] = (low, high, scale)
        return space

    def identity(self) -> dict[str, Any]:
        identity = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in _IDENTITY}
        # The ranges searched, whatever the order or spelling (lr and lr=1e-05:0.1 are one search), and the recipe the trials train
        return identity | {"recipe": self.train_config().resolved().recipe,
                           "search": {k: [low, high] for k, (low, high, _) in self.search_space().items()}}

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model, dataset=self.dataset, epochs=self.epochs, batch_size=self.batch_size, seed=1,
            device=self.device, data_dir=self.data_dir, max_batches=self.max_batches, progress=False,
            image_size=self.image_size, val_fraction=self.val_fraction, test_fraction=self.test_fraction,
            recipe=self.recipe or ("seed" if self.batch_trials > 1 else None),  # batched trials train seed only
        )


@dataclass
class StudyResult:
    study_name: str
    parent_run_id: str
    summary: dict[str, Any]
    best_model_uri: str | None
    storage: str  # the Optuna storage URL that opens the study from any folder, its password masked


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # constant_liar: trials sampled while one runs go elsewhere
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, scramble=True)}[name]()


def suggest_normalization(trial: optuna.Trial, config: StudyConfig, channels: int) -> Normalization:
    """Mean on a linear scale, std on a log scale; one pair for all channels unless per_channel."""
    if config.per_channel and channels > 1:
        means = [trial.suggest_float(f"mean_{c}", *config.mean_range) for c in range(channels)]
        stds = [trial.suggest_float(f"std_{c}", *config.std_range, log=True) for c in range(channels)]
        return Normalization(means, stds)
    mean = trial.suggest_float("mean", *config.mean_range)
    std = trial.suggest_float("std", *config.std_range, log=True)
    return Normalization((mean,), (std,)).for_channels(channels)


def suggest_settings(trial: optuna.Trial, config: StudyConfig) -> dict[str, float | int]:
    """The --search settings of this trial, as TrainConfig fields."""
    return {name: trial.suggest_int(name, low, high) if scale == "int" else
            trial.suggest_float(name, low, high, log=scale == "log")
            for name, (low, high, scale) in config.search_space().items()}


def enqueue_params(config: StudyConfig, dataset: Dataset) -> list[dict[str, float]]:
    """``--enqueue MEAN STD`` pairs as Optuna params (outside the ranges too); ``auto``: the training split's statistics."""
    out, channels = [], dataset.image_shape[0]
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
                    raise UsageError(f"--enqueue {mean} {std} differs per channel; add --per-channel")
            out.append({"mean": norm.mean[0], "std": norm.std[0]})
    return out


def is_finished(trial: FrozenTrial) -> bool:
    """Complete, pruned, or diverged (a failure that is itself a result)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get(OUTCOME_ATTR) == "diverged")


def count_trials(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False)
    return sum(map(is_finished, trials)), sum(t.state == TrialState.RUNNING for t in trials)


def one_class_accuracy(split: Split) -> float:
    """The accuracy of always predicting the most frequent class."""
    return float(split.labels.bincount().max()) / max(len(split), 1)
