"""Options shared by several commands, defined once (as MLflow's utils/cli_args.py does), and the JSON printer."""

import functools
import json
import os
from dataclasses import fields
from typing import Any

import click
from click.core import ParameterSource

from training.recipes import RECIPES
from zoo.model_options import parse_model_options
from zoo.errors import UsageError

FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))  # default: paths as strings


def unset_sentinels(ctx: click.Context, param: click.Parameter, value):
    """MLproject parameters cannot be absent: "" and "default" mean "not given" (the model's default)."""
    return None if value in ("", "default") else value


def dataset_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A catalog name as given; an image folder as an absolute path, so the run (and --resume) finds it from anywhere."""
    from zoo.folder_dataset import looks_like_folder  # torch: the commands taking --dataset load it anyway
    if value and looks_like_folder(value):
        path = os.path.abspath(os.path.expanduser(value))
        if not os.path.isdir(path):
            raise click.BadParameter(f"no such folder: {value} (a catalog name, see `zoo datasets`, or a folder of "
                                     "class folders of images)", ctx, param)
        return path
    return value


def latest_version(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``models:/NAME`` -> ``models:/NAME/LATEST``, said on stderr (MLflow alone would not find it)."""
    if not value.startswith("models:/"):  # an .onnx file or a folder: no MLflow import, start-up stays fast
        return value
    from serving.loading import resolve_latest
    uri, note = resolve_latest(value)
    if note:
        click.echo(note, err=True)
    return uri


def machine_output(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """With --format json stdout holds the data alone (no MLflow "View run ... at" line to break a JSON reader)."""
    if value != "text":
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return value


def options(*decorators):
    """Several options as one decorator, shown in the order given."""
    return lambda command: functools.reduce(lambda f, option: option(f), reversed(decorators), command)


def _checked(check):
    """A callback running ``check(value)``, its ValueError shown as Click's bad-parameter line."""
    def callback(ctx: click.Context, param: click.Parameter, value):
        try:
            return check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return callback


def _keep_checkpoints(value: str) -> str:
    from training.checkpoints import parse_keep
    parse_keep(value)
    return value


MODEL = click.option("--model", default="mnist_cnn", show_default=True, help="A registered architecture (see `zoo models`).")
DATASET = click.option(
    "--dataset", default="mnist-5k", show_default=True, callback=dataset_name,
    help="A catalog name (see `zoo datasets`) or a folder of images: FOLDER/CLASS/*.png, or FOLDER/train/CLASS/... "
         "with optional val/ and test/. Folders are decoded once and cached.")
IMAGE_SIZE = click.option(
    "--image-size", "--image_size", "image_size", default=None, callback=unset_sentinels, metavar="SIDE|HxW",
    help="Image folders: resize every image to this (e.g. 32 or 48x64). Default: the images' own size when they "
         "all agree, else the model's input size.")
TEST_FRACTION = click.option(
    "--test-fraction", "--test_fraction", "test_fraction", type=FRACTION, default=None,
    help="Image folders without test/: the share of each class held out for testing. [default: 0.2]")
VAL_FRACTION = click.option(
    "--val-fraction", "--val_fraction", "val_fraction", type=FRACTION, default=None,
    help="The share of the training data (of every image, for a folder with neither val/ nor test/) held out for "
         "validation. Default: the model's recipe (0.1; 0.2 for mlp); mnist-5k takes below 0.8.")
MAX_BATCHES = click.option("--max-batches", "--max_batches", "max_batches", type=click.IntRange(min=1), default=None,
                           help="Stop each epoch after N batches.")
BATCH_SIZE = click.option("--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=None,
                          help="Default: the model's recipe (64 for mnist_cnn).")
REGISTER = click.option("--register", default=None, callback=unset_sentinels, metavar="NAME",
                        help="Register the model under NAME (study: the best trial's; renorm: see --register-norm).")
ALIAS = click.option("--alias", default=None, callback=unset_sentinels,
                     help="Point this alias of the registered model (--register) at the new version.")
RUN_NAME = click.option("--run-name", default=None, help="The MLflow run's name. Default: from the model and settings.")
MODEL_URI = click.argument("model_uri", metavar="MODEL_URI", callback=latest_version)
FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                      callback=machine_output, help="json prints machine-readable output on stdout (logs go to stderr).")
MEAN = click.option("--mean", default=None, callback=unset_sentinels,
                    help="Normalization mean: one value, one per channel (comma-separated), or auto (the training "
                         "split's own). Default: the model's.")
STD = click.option("--std", default=None, callback=unset_sentinels,
                   help="Normalization std (> 0): one value, one per channel (comma-separated), or auto (the training "
                        "split's own). Default: the model's.")
DATA_DIR = click.option(
    "--data-dir", "--data_dir", "data_dir", envvar="ZOO_DATA_DIR", default=None, type=click.Path(file_okay=False),
    help="Where datasets are read from and downloaded to. [env: ZOO_DATA_DIR; default ~/.cache/zoo/data]")
EXPERIMENT = click.option("--experiment", envvar="MLFLOW_EXPERIMENT_NAME", default=None,
                          help="MLflow experiment name. [env: MLFLOW_EXPERIMENT_NAME; default zoo]")
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
TRACKING_TIMEOUT = click.option(
    "--tracking-timeout", "tracking_timeout", envvar="ZOO_TRACKING_TIMEOUT", type=click.FloatRange(min=0), default=600,
    show_default=True, metavar="SECONDS",
    help="How long a started run waits for a tracking server (and zoo study for its database) that went away, "
         "training meanwhile and logging to local disk; past it the command stops naming the command that finishes "
         "the run (docs/outages.md). [env: ZOO_TRACKING_TIMEOUT]")
MODEL_OPT = click.option(
    "--model-opt", "model_opts", multiple=True, metavar="KEY=VALUE", callback=_checked(parse_model_options),
    help="A builder option of the model, repeatable: e.g. --model-opt dropout=0.2 --model-opt batchnorm=true (mlp), "
         "--model-opt init=normal (scratch_mlp). Logged as params model_KEY.")
MOMENTUM = click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None,
                        help="SGD momentum. Default: the model's recipe (0.4 for scratch_mlp, else 0).")
KEEP_CHECKPOINTS = click.option(
    "--keep-checkpoints", "--keep_checkpoints", "keep_checkpoints", default="last,best", show_default=True,
    callback=_checked(_keep_checkpoints), metavar="WHICH",
    help="last (the full state --resume needs, overwritten each epoch), best (the weights of the best val_accuracy "
         "epoch), all (both and every epoch's), none, or a comma-separated list.")
RESUME = click.option(
    "--resume", metavar="RUN_ID", default=None, callback=unset_sentinels,
    help="Continue this stopped (KILLED or FAILED) run from its last checkpoint with its own settings; options "
         "that contradict them are refused.")

_FIELD_OF = {"model_opts": "model_config", "dry_run": "max_batches", "no_checkpoints": "checkpoints"}


def resume_options(ctx: click.Context, config: Any) -> dict[str, Any]:
    """The TrainConfig settings the user gave (command line or environment), to check against the resumed run's."""
    for name in ("experiment", "run_name"):
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise UsageError(f"--resume continues the run in its own experiment under its own name: "
                             f"leave out --{name.replace('_', '-')}")
    config_fields = {f.name for f in fields(config)}
    given = [p for p in ctx.params if ctx.get_parameter_source(p) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    return {_FIELD_OF.get(p, p): getattr(config, _FIELD_OF.get(p, p)) for p in given if _FIELD_OF.get(p, p) in config_fields}


def _by_recipe(name: str) -> str:
    """Each recipe's value of a setting, from training/recipes.py (so help follows a retuned table)."""
    grouped: dict[str, list[str]] = {}
    for recipe, settings in RECIPES.items():
        value = settings.get(name)
        if isinstance(value, dict):  # per optimizer
            value = ", ".join(f"{k} {v:g}" for k, v in value.items()) + ", else 0"
        grouped.setdefault(str(value) if value != "" else "off", []).append(recipe)
    return "Default: the recipe's (" + "; ".join(f"{'/'.join(r)}: {v}" for v, r in grouped.items()) + ")."


def _recipe_option(*names: str, help: str, **kwargs):
    field = names[-1]
    return click.option(*names, default=None, help=f"{help} {_by_recipe(field)}", **kwargs)


RECIPE_OPTIONS = (
    click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
                 help="The training recipe filling every setting not given (docs/training.md#recipes). Default: for timm: "
                      "models light, or finetune with --weights; the zoo's own models keep their protocols (seed)."),
    _recipe_option("--weight-decay", "--weight_decay", "weight_decay", type=click.FloatRange(min=0),
                   help="Weight decay (AdamW: decoupled; SGD, Adam: L2)."),
    _recipe_option("--schedule", "schedule", type=click.Choice(["step", "cosine", "onecycle"]),
                   help="Learning-rate schedule: step (StepLR by --gamma each epoch), cosine (linear warmup from lr/100, "
                        "then cosine to 0, per batch) or onecycle (torch's OneCycleLR)."),
    _recipe_option("--warmup-epochs", "--warmup_epochs", "warmup_epochs", type=click.FloatRange(min=0),
                   help="Linear warmup of cosine and onecycle, in epochs (fractions allowed)."),
    _recipe_option("--label-smoothing", "--label_smoothing", "label_smoothing", type=click.FloatRange(0, 1, max_open=True),
                   help="Label smoothing of the cross-entropy."),
    _recipe_option("--ema", "ema", type=click.FloatRange(0, 1, max_open=True),
                   help="Decay of a moving average of the weights, which is then validated, tested and logged; 0: off."),
    _recipe_option("--patience", "patience", type=click.IntRange(min=0),
                   help="Stop after this many epochs without a better val_accuracy; 0: off."),
    _recipe_option("--crop-pad", "--crop_pad", "crop_pad", type=click.IntRange(min=0),
                   help="Random crop of the image's size after zero padding by this many pixels; 0: off."),
    _recipe_option("--scale", "scale", metavar="MIN,MAX",
                   help='Random resized crop keeping MIN..MAX of the area (timm --scale), e.g. 0.35,1; "": off.'),
    _recipe_option("--hflip", "hflip", type=click.FloatRange(0, 1), help="Horizontal flip probability."),
    _recipe_option("--aa", "aa", type=click.Choice(["trivialaugment", "randaugment", "none"]),
                   help="Policy augmentation (timm --aa)."),
    _recipe_option("--reprob", "reprob", type=click.FloatRange(0, 1), help="Random erasing probability."),
    _recipe_option("--mixup", "mixup", type=click.FloatRange(min=0), help="Mixup alpha; 0: off."),
    _recipe_option("--cutmix", "cutmix", type=click.FloatRange(min=0), help="CutMix alpha; 0: off."),
    click.option("--crop-mode", "--crop_mode", "crop_mode", type=click.Choice(["squash", "center"]), default=None,
                 help="Image folders: squash (stretch to the size) or center (resize the shorter side, then center "
                      "crop: aspect kept, the same when serving). [default: squash]"),
)
