"""Options shared by several commands, defined once (as in MLflow's utils/cli_args.py)."""

import os

import click


def unset_sentinels(ctx: click.Context, param: click.Parameter, value):
    """MLproject parameters cannot be absent: "" and "default" mean "not given" (the model's default)."""
    return None if value in ("", "default") else value


MODEL = click.option("--model", default="mnist_cnn", show_default=True, help="A registered architecture (see `zoo models`).")
DATASET = click.option("--dataset", default="mnist-5k", show_default=True, help="See `zoo datasets`.")
ALIAS = click.option("--alias", default=None, callback=unset_sentinels,
                     help="Point this alias of the registered model (--register) at the new version.")


def latest_version(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``models:/NAME`` -> ``models:/NAME/LATEST``, said on stderr (MLflow alone would not find it)."""
    if not value.startswith("models:/"):  # an .onnx file or a folder: no MLflow import, start-up stays fast
        return value
    from serving.loading import resolve_latest

    uri, note = resolve_latest(value)
    if note:
        click.echo(note, err=True)
    return uri


MODEL_URI = click.argument("model_uri", metavar="MODEL_URI", callback=latest_version)


def machine_output(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """With --format json/jsonl stdout holds the data alone: MLflow would print "View run ... at"
    there for a tracking server (a line per run), which breaks a JSON reader."""
    if value != "text":
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return value


FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, callback=machine_output,
    help="json prints machine-readable output on stdout (logs go to stderr).",
)
MEAN = click.option("--mean", default=None, callback=unset_sentinels, help="Normalization mean: one value, or comma-separated per channel. Default: the model's.")
STD = click.option("--std", default=None, callback=unset_sentinels, help="Normalization std (> 0): one value, or comma-separated per channel. Default: the model's.")
DATA_DIR = click.option(
    "--data-dir", "--data_dir", "data_dir", envvar="ZOO_DATA_DIR", default=None, type=click.Path(file_okay=False),
    help="Where datasets are read from and downloaded to. [env: ZOO_DATA_DIR; default ~/.cache/zoo/data]",
)
EXPERIMENT = click.option(
    "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", default=None, help="MLflow experiment name. [env: MLFLOW_EXPERIMENT_NAME; default zoo]"
)
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
