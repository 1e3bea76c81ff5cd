"""The `zoo` command: one Click group, every command attached. Exit 0 success, 1 runtime failure, 2 bad usage
(click.UsageError, zoo.errors.UsageError); ZOO_DEBUG=1 shows the traceback behind an error."""

import os
import sys

if not sys.stderr.isatty():
    # In a log file a progress line every 10 s is plenty; tqdm reads this when imported, so before any import.
    os.environ.setdefault("TQDM_MININTERVAL", "10")

# MLflow's default retries take minutes to report an unreachable server (zoo waits itself: training/outage.py);
# its INFO lines and artifact bars are not zoo's output. A user's own values win.
for _name, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_LOGGING_LEVEL": "WARNING",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_name, _value)

import click

from zoo.cli.classify import classify
from zoo.cli.datasets import datasets
from zoo.cli.demo import demo
from zoo.cli.export import export
from zoo.cli.models import models
from zoo.cli.renorm import renorm
from zoo.cli.study import study
from zoo.cli.train import train
from zoo.cli.ui import ui
from zoo.errors import UsageError


class InputError(click.UsageError):
    """Bad input found past Click's parsing: one line, exit 2, no usage block."""

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
            # The reader left (`zoo classify ... | head`): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            if os.environ.get("ZOO_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if refused := tracking_refusal(exc):  # a locked server said no: which credentials to set, exit 1
                raise click.ClickException(refused) from exc
            if isinstance(exc, UsageError):  # a library's ValueError is no verdict on the input
                raise InputError(message, ctx) from exc
            # A job that stopped as designed says what to run next: a traceback would show nothing more.
            hint = "" if getattr(exc, "complete_message", False) else " (set ZOO_DEBUG=1 for the traceback)"
            raise click.ClickException(f"{message}{hint}") from exc


def tracking_refusal(exc: BaseException | None) -> str | None:
    """The one line for a 401 or 403 from the tracking server behind ``exc`` or its causes; else None."""
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
@click.version_option(package_name="mlflow-zoo", prog_name="zoo")
def cli() -> None:
    """An MLflow-tracked model zoo: train, search normalizations, export to ONNX, classify.

    Runs go to sqlite:///mlflow.db in the current folder unless MLFLOW_TRACKING_URI says otherwise."""


for _command in (train, study, renorm, export, classify, models, datasets, ui, demo):
    cli.add_command(_command)


def main() -> None:
    # zoo prints the training view's run links (training/tracking.py), not MLflow's (its GenAI view), unless off.
    if "ZOO_RUN_LINKS" not in os.environ:  # a zoo started by zoo keeps the first one's decision
        off = os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "").strip().lower() in ("true", "1")
        os.environ["ZOO_RUN_LINKS"] = "0" if off else "1"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    cli(prog_name="zoo")
