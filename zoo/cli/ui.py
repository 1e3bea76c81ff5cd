"""`zoo ui`: the MLflow UI over the project's store, on loopback, until Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys

import click

HOST = "127.0.0.1"  # loopback only: the UI has no login, and it can delete runs


def experiment_url(port: int) -> str:
    from mlflow.tracking import MlflowClient
    from training import tracking
    url = f"http://{HOST}:{port}/#/experiments"
    if MlflowClient().get_experiment_by_name(tracking.default_experiment()) is not None:
        url += f"/{tracking.experiment_id_for()}"
    return url + tracking.UI_VIEW  # the runs table, not the GenAI overview


@click.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port on 127.0.0.1.")
def ui(port: int) -> None:
    """Browse the runs in the MLflow UI (MLFLOW_TRACKING_URI's store, default sqlite:///mlflow.db) on 127.0.0.1 until Ctrl-C."""
    import mlflow
    from zoo.access import masked_url
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        raise click.UsageError(f"MLFLOW_TRACKING_URI points at a tracking server ({masked_url(uri)}): open that address "
                               "in a browser (a server started with --app-name basic-auth asks there for your MLflow "
                               "user name and password); `zoo ui` serves a local store such as sqlite:///mlflow.db")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            raise click.ClickException(f"port {port} on {HOST} is in use (another MLflow UI?); "
                                       "choose another with --port") from None
    url = experiment_url(port)
    # One web worker is plenty for one person, and no job runner (it serves GenAI evaluation jobs only).
    command = [sys.executable, "-m", "mlflow", "ui", "--host", HOST, "--port", str(port), "--workers", "1"]
    # The store goes by environment, not on the command line anyone can read (ps): its URL may hold a password.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    # Its own process group: `mlflow ui`'s web server child must stop with us too.
    server = subprocess.Popen(command, start_new_session=True, env=env)
    click.echo(f"MLflow UI over {masked_url(uri)}\nopen {url}\n(Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too, as Ctrl-C does
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        _stop(server)
    if code:
        raise click.ClickException(f"the MLflow UI stopped with exit code {code}; its messages are above")


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
