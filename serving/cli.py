"""The `zoo` command line: one Click group; training commands are attached here too.

Exit codes: 0 success, 1 runtime failure (click.ClickException), 2 bad usage
(click.UsageError). Set ZOO_DEBUG=1 to see the traceback behind an error.
"""

from __future__ import annotations

import json
import os
import sys

if not sys.stderr.isatty():
    # Progress bars redraw 10 times a second; in a log file (CI, `mlflow run`) every 10 s is
    # plenty. tqdm reads TQDM_* defaults when it is imported, so this comes before any import.
    os.environ.setdefault("TQDM_MININTERVAL", "10")

# MLflow retries a failed HTTP request 7 times with a doubling backoff: minutes before an
# unreachable tracking server is reported. It reads these at every request, so a user's own
# values win. Short retries detect a server that went away mid-run quickly too: zoo train then
# keeps what it logs and waits for the server itself, without blocking training (training/outage.py).
for _name, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_name, _value)

from importlib.metadata import PackageNotFoundError, version

import click

from serving.options import (
    ALIAS, DATA_DIR, DATASET, DEVICE, EXPERIMENT, FORMAT, IMAGE_SIZE, MEAN, MODEL, MODEL_URI, STD, TEST_FRACTION,
    TRACKING_TIMEOUT, VAL_FRACTION, unset_sentinels,
)
from serving.train_options import KEEP_CHECKPOINTS, MODEL_OPT, MOMENTUM, RESUME, resume_options


def _version() -> str:
    try:
        return version("mlflow-zoo")
    except PackageNotFoundError:
        return "0+unknown"


USAGE_ERRORS = (ValueError, FileNotFoundError)  # bad input from the user: exit 2


class InputError(click.UsageError):
    """Bad input found past Click's own parsing: one line, exit 2 (no usage block, the message says what is valid)."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


class ZooGroup(click.Group):
    """Turns known exceptions into one friendly line and the right exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader left (`zoo classify ... | head`): stop quietly, as other command-line tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            if os.environ.get("ZOO_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if refused := tracking_refusal(exc):  # a locked server said no: which credentials to set, exit 1
                raise click.ClickException(refused) from exc
            if isinstance(exc, USAGE_ERRORS):
                raise InputError(message, ctx) from exc
            raise click.ClickException(f"{message} (set ZOO_DEBUG=1 for the traceback)") from exc


def tracking_refusal(exc: BaseException | None) -> str | None:
    """The one line for a 401 or 403 from the MLflow tracking server behind ``exc`` (or what it was
    raised from, e.g. "no model at models:/..."), naming the credentials to set; else None."""
    if "mlflow" not in sys.modules:  # no MLflow call was made
        return None
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import read_mlflow_creds

    from zoo.access import masked_url, tracking_refused

    while exc is not None:
        if isinstance(exc, MlflowException) and (status := exc.get_http_status_code()) in (401, 403):
            return tracking_refused(masked_url(mlflow.get_tracking_uri()), status, read_mlflow_creds().username)
        exc = exc.__cause__ or exc.__context__
    return None


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="zoo")
def cli() -> None:
    """An MLflow-tracked model zoo: train, search normalizations, export to ONNX, classify.

    Runs go to MLflow's default store (sqlite:///mlflow.db in the current folder)
    unless MLFLOW_TRACKING_URI says otherwise.
    """


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


@cli.command()
@MODEL
@DATASET
@IMAGE_SIZE
@VAL_FRACTION
@TEST_FRACTION
@MEAN
@STD
@click.option("--epochs", type=click.IntRange(min=1), default=14, show_default=True)
@click.option("--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=None,
              help="Default: the model's recipe (64 for mnist_cnn).")
@click.option("--optimizer", default=None, callback=unset_sentinels, help="adadelta, sgd, adam or adamw. Default: the model's recipe.")
@click.option("--lr", type=float, default=None, help="Learning rate. Default: the model's recipe.")
@click.option("--gamma", type=float, default=None, help="StepLR decay per epoch. Default: the model's recipe.")
@click.option("--weight-decay", "--weight_decay", "weight_decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@MOMENTUM
@MODEL_OPT
@click.option("--weights", default=None, callback=unset_sentinels, metavar="pretrained|FILE",
              help="timm: models: start from timm's pretrained weights (pretrained, online) or a local checkpoint "
                   "FILE; timm adapts the stem to the data's channels and starts a classifier of another size afresh.")
@click.option("--seed", type=int, default=1, show_default=True)
@DEVICE
@click.option("--precision", type=click.Choice(["fp32", "bf16-mixed"]), default="fp32", show_default=True,
              help="bf16-mixed: forward passes in bfloat16 (weights stay float32); faster where the CPU or GPU "
                   "has bfloat16 arithmetic, but it rounds normalized inputs to 8 significant bits.")
@DATA_DIR
@EXPERIMENT
@click.option("--run-name", default=None)
@click.option("--register", "register", default=None, callback=unset_sentinels, metavar="NAME", help="Register the model under NAME.")
@ALIAS
@click.option("--dry-run", is_flag=True, help="Train on 2 batches per epoch: checks the pipeline in seconds.")
@click.option("--max-batches", "--max_batches", "max_batches", type=click.IntRange(min=1), default=None,
              help="Stop each epoch after N batches.")
@KEEP_CHECKPOINTS
@click.option("--no-checkpoints", is_flag=True, help="Same as --keep-checkpoints none.")
@RESUME
@TRACKING_TIMEOUT
@FORMAT
@click.pass_context
def train(ctx, model, dataset, image_size, val_fraction, test_fraction, mean, std, epochs, batch_size, optimizer, lr, gamma,
          weight_decay, momentum, model_opts, weights, seed, device, precision, data_dir, experiment, run_name, register,
          alias, dry_run, max_batches, keep_checkpoints, no_checkpoints, resume, tracking_timeout, fmt) -> None:
    """Train one model and log it to MLflow (params, per-epoch metrics, checkpoints, model).

    Ctrl-C or SIGTERM ends the run KILLED with its last checkpoint; --resume RUN_ID continues it.
    """
    from training.train import resume as resume_training
    from training.train import train as run_train
    from training.train_config import TrainConfig

    if weights:
        model_opts = {**model_opts, **pretrained_weights_option(model, weights)}
    config = TrainConfig(
        model=model, dataset=dataset, image_size=image_size, val_fraction=val_fraction, test_fraction=test_fraction,
        mean=mean, std=std, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, lr=lr, gamma=gamma, weight_decay=weight_decay, momentum=momentum, model_config=model_opts,
        seed=seed, device=device, precision=precision, data_dir=data_dir, max_batches=2 if dry_run else max_batches,
        checkpoints=not no_checkpoints, keep_checkpoints=keep_checkpoints,
    )
    if resume:
        options = resume_options(ctx, config)
        result = resume_training(resume, options, register=register, alias=alias, tracking_timeout=tracking_timeout)
    else:
        result = run_train(config, experiment=experiment, run_name=run_name, register=register, alias=alias,
                           tracking_timeout=tracking_timeout)
    summary = {
        "run_id": result.run_id,
        "model_uri": result.model_uri,
        "registered": f"models:/{register}@{alias}" if register and alias else register,
        "normalization": result.normalization.to_dict(),
        "val_accuracy": result.val_accuracy,
        "test_accuracy": result.test_accuracy,
    }
    if fmt == "json":
        echo_json(summary)
    else:
        click.echo(f"run {result.run_id}: test_accuracy={result.test_accuracy:.4f} val_accuracy={result.val_accuracy:.4f} ({result.normalization})")
        click.echo(f"model: {result.model_uri}" + (f"  registered as {summary['registered']}" if register else ""))


def pretrained_weights_option(model: str, weights: str) -> dict[str, str]:
    """--weights as the timm builder's option: pretrained=true, or weights=FILE (absolute: --resume finds it)."""
    from zoo.registry import TIMM_PREFIX

    if not model.startswith(TIMM_PREFIX):
        raise click.UsageError(f"--weights starts timm: models (--model timm:NAME) from pretrained weights, not "
                               f"{model!r}; a torchvision ResNet's weights are re-evaluated with zoo renorm --weights")
    if weights == "pretrained":
        return {"pretrained": "true"}
    if not os.path.isfile(weights):
        raise click.BadParameter(f"no such file: {weights} (give pretrained, or a local timm checkpoint)",
                                 param_hint="--weights")
    return {"weights": os.path.abspath(weights)}


@cli.command()
@MODEL_URI
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Fail if onnxruntime and PyTorch outputs differ by more than this.")
@FORMAT
def export(model_uri, output, tolerance, fmt) -> None:
    """Export MODEL_URI to ONNX with its normalization inside the graph (input: pixels in [0, 1]).

    MODEL_URI: models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME (its latest version), runs:/RUN_ID/model
    or a model folder.
    """
    from serving.export import export_onnx
    from serving.loading import load_model

    if not output.endswith(".onnx"):
        raise click.BadParameter(f"{output!r} should end in .onnx", param_hint="--output")
    report = export_onnx(load_model(model_uri), output, tolerance=tolerance)
    if fmt == "json":
        echo_json(report.to_dict())
    else:
        click.echo(f"wrote {report.path} (opset {report.opset}); max |onnxruntime - torch| = {report.max_abs_diff:.2e} "
                   f"over batches {report.batch_sizes_checked}")


@cli.command()
@MODEL_URI
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--runtime", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True)
@click.option("--invert", is_flag=True, help="Invert grayscale (dark digits on light paper -> MNIST's light on dark).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images decoded and classified together: memory grows with this, not with the number of files.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding images (0: in this process). Default: none on 2 CPU cores or fewer, "
                   "else one per core but one, from 4,096 images on.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images that declare more pixels than this (decompression bombs), before decoding them. "
                   "Default: Pillow's limit, 89,478,485.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "jsonl"]), default="text", show_default=True,
              help="json: one array; jsonl: one object per line, written as each batch finishes (for large folders).")
def classify(model_uri, paths, top_k, runtime, invert, batch_size, workers, max_pixels, fmt) -> None:
    """Classify images (PNG, JPEG, ... files or folders) with MODEL_URI, printing the top-k labels.

    MODEL_URI: models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME (its latest version), runs:/RUN_ID/model,
    a model folder or a .onnx file.

    An unreadable input (missing, empty, truncated, not an image, too many pixels) gets one line on
    stderr and a row with an "error" in json/jsonl; the others are still classified. Exit 1 if any failed.
    """
    from serving.classify import classify_batches, open_classifier
    from zoo import startup

    classifier = open_classifier(model_uri, runtime)
    startup.settled()  # the model is loaded: what follows is the images
    batches = classify_batches(classifier, paths, k=top_k, invert=invert, batch_size=batch_size, workers=workers,
                               max_pixels=max_pixels)
    _print_classified(batches, fmt)


def _print_classified(batches, fmt: str) -> None:
    total = failed = 0
    separator = "[\n  "  # json: the array is streamed, rows appear as batches finish
    for batch in batches:
        total += len(batch)
        for p in batch:
            if p.error:
                failed += 1
                click.echo(f"cannot classify {p.path}: {p.error}", err=True)
        lines = _classify_lines(batch, fmt)
        if fmt == "json" and lines:
            click.echo(separator + ",\n  ".join(lines), nl=False)
            separator = ",\n  "
        elif lines:
            click.echo("\n".join(lines))
    if fmt == "json":
        click.echo("\n]" if separator != "[\n  " else "[]")
    if failed:
        raise click.ClickException(f"{failed} of {total} inputs could not be classified (listed above)")


def _classify_lines(batch, fmt: str) -> list[str]:
    """One output line per row; text shows only the classified ones (the others are on stderr)."""
    if fmt in ("json", "jsonl"):
        return [json.dumps(p.to_dict()) for p in batch]
    return [f"{p.path}\t" + "  ".join(f"{label} {prob:.3f}" for label, prob in p.top) for p in batch if not p.error]


@cli.command()
@click.option("--registered", is_flag=True, help="List the MLflow registered models (with aliases) instead of architectures.")
@click.option("--filter", "pattern", default=None, help="fnmatch pattern on the architecture name, e.g. 'mnist*'.")
@FORMAT
def models(registered, pattern, fmt) -> None:
    """List the architectures the zoo can train, or the registered models it can serve."""
    if registered:
        rows = _registered_models()
    else:
        from zoo.registry import get_model_spec, list_models

        rows = []
        for name in list_models(pattern):
            spec = get_model_spec(name)
            rows.append({
                "name": name, "input_shape": list(spec.input_shape), "classes": spec.num_classes,
                "normalization": spec.normalization.to_dict(), "description": spec.description,
            })
    if fmt == "json":
        echo_json(rows)
        return
    for row in rows:
        if registered:
            aliases = ", ".join(f"@{a}->v{v}" for a, v in row["aliases"].items()) or "no alias"
            click.echo(f"{row['name']}\tlatest v{row['latest_version']}\t{aliases}")
        else:
            shape = "x".join(map(str, row["input_shape"]))
            click.echo(f"{row['name']:<14}{shape:<10}{row['classes']:>3} classes  {row['description']}")
    if not registered:
        click.echo("Each builds for the data's channels, size and classes. timm:NAME builds any timm architecture "
                   "(pip install 'mlflow-zoo[timm]'); list them with: "
                   "python -c \"import timm; print(timm.list_models('*resnet*'))\"", err=True)


def _registered_models() -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    rows = []
    for rm in client.search_registered_models():
        versions = [int(v.version) for v in client.search_model_versions(f"name = '{rm.name}'")]
        rows.append({
            "name": rm.name,
            "latest_version": max(versions, default=None),
            "aliases": {alias: int(v) for alias, v in (rm.aliases or {}).items()},
        })
    return rows


@cli.command()
@click.option("--details", is_flag=True,
              help="With --format json: map each name to an object (description, train_images, test_images, "
                   "image_shape [C, H, W], classes) instead of to its description.")
@FORMAT
def datasets(details, fmt) -> None:
    """List the datasets in the catalog: training and test images, image shape, classes.

    Training images are the dataset's own training split, from which --val-fraction takes the
    validation split.
    """
    from zoo.data import list_datasets
    from zoo.data import dataset_info

    descriptions = list_datasets()
    if fmt == "json" and not details:  # the original shape, name -> description, kept for scripts
        echo_json(descriptions)
        return
    rows = {name: {"description": desc, **_info_fields(dataset_info(name))} for name, desc in descriptions.items()}
    if fmt == "json":
        echo_json(rows)
        return
    click.echo(f"{'name':<16}{'train':>8}{'test':>8}  {'image':<9}{'classes':>7}  description")
    for name, row in rows.items():
        shape = "x".join(map(str, row["image_shape"])) if row["image_shape"] else "?"
        click.echo(f"{name:<16}{_count(row['train_images']):>8}{_count(row['test_images']):>8}  {shape:<9}"
                   f"{_count(row['classes']):>7}  {row['description']}")
    click.echo("Any folder of class folders of images is a dataset too: --dataset PATH (FOLDER/CLASS/*.png, or "
               "FOLDER/train/CLASS/... with optional val/ and test/).", err=True)


def _info_fields(info) -> dict:
    """DatasetInfo as JSON fields; None for each when the dataset has no static facts recorded."""
    return info.to_dict() if info else {"train_images": None, "test_images": None, "image_shape": None, "classes": None}


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _attach_commands() -> None:
    from serving.cli_renorm import renorm
    from serving.cli_study import study
    from serving.demo import demo
    from serving.ui import ui

    for command in (study, renorm, demo, ui):
        cli.add_command(command)


_attach_commands()


def main() -> None:
    from zoo import startup

    startup.begin()  # the collector held back while the libraries load (zoo/startup.py)
    cli(prog_name="zoo")


if __name__ == "__main__":
    main()
