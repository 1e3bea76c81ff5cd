"""`zoo train` options for per-model settings (attached in serving/cli.py's train command).

    @MODEL_OPT  ->  TrainConfig(model_config=model_opts, ...)
    @MOMENTUM   ->  TrainConfig(momentum=momentum, ...)

The values are checked against the model's builder when the run starts
(zoo.model_options.coerce_model_config), so a typo names the valid options.
"""

import click

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
