"""`zoo train` options for per-model settings (attached in serving/cli.py's train command).

    @MODEL_OPT  ->  TrainConfig(model_config=model_opts, ...)
    @MOMENTUM   ->  TrainConfig(momentum=momentum, ...)
    @KEEP_CHECKPOINTS -> TrainConfig(keep_checkpoints=..., ...)
    @RESUME     ->  training.train.resume(run_id, resume_options(ctx, config), ...)

The values are checked against the model's builder when the run starts
(zoo.model_options.coerce_model_config), so a typo names the valid options.
"""

from dataclasses import fields
from typing import Any

import click
from click.core import ParameterSource

from zoo.model_options import parse_model_options


def _model_options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_model_options(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


MODEL_OPT = click.option(
    "--model-opt", "model_opts", multiple=True, metavar="KEY=VALUE", callback=_model_options,
    help="A builder option of the model, repeatable: e.g. --model-opt dropout=0.2 --model-opt batchnorm=true (mlp), "
         "--model-opt init=normal (scratch_mlp). Logged as params model_KEY.",
)
MOMENTUM = click.option(
    "--momentum", type=click.FloatRange(0, 1, max_open=True), default=None,
    help="SGD momentum. Default: the model's recipe (0.4 for scratch_mlp, else 0).",
)


def _keep_checkpoints(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from training.checkpoints import parse_keep

    try:
        parse_keep(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


KEEP_CHECKPOINTS = click.option(
    "--keep-checkpoints", "--keep_checkpoints", "keep_checkpoints", default="last,best", show_default=True,
    callback=_keep_checkpoints, metavar="WHICH",
    help="Checkpoints the run keeps: last, best, all or none, or a comma-separated list. last: the full state "
         "--resume needs (weights, optimizer, lr scheduler, RNG states), overwritten each epoch; best: the weights "
         "alone of the epoch with the best val_accuracy; all: both plus every epoch's full checkpoint; none: nothing.",
)
RESUME = click.option(
    "--resume", metavar="RUN_ID", default=None, callback=lambda ctx, param, value: value or None,
    help="Continue this stopped (KILLED or FAILED) run from its last checkpoint, in the same MLflow run, with its "
         "own settings; options that contradict them are refused.",
)

# zoo train parameters whose TrainConfig field has another name
_FIELD_OF = {"model_opts": "model_config", "dry_run": "max_batches", "no_checkpoints": "checkpoints"}


def resume_options(ctx: click.Context, config: Any) -> dict[str, Any]:
    """The TrainConfig settings the user gave (command line or environment), to check against the resumed run's."""
    for name in ("experiment", "run_name"):
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise ValueError(f"--resume continues the run in its own experiment under its own name: "
                             f"leave out --{name.replace('_', '-')}")
    config_fields = {f.name for f in fields(config)}
    given = [p for p in ctx.params if ctx.get_parameter_source(p) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    return {_FIELD_OF.get(p, p): getattr(config, _FIELD_OF.get(p, p)) for p in given if _FIELD_OF.get(p, p) in config_fields}
