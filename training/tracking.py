"""MLflow writes that carry a decision: how a run starts and ends, its name and experiment, `mlflow run`
linking, server and login probes, params that never change, checkpoints, dataset inputs, a model logged
once per run. Plain writes call MLflow directly."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import mlflow
import torch
from mlflow.entities import Metric, RunInfo, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from zoo.model_format import mlflow_model
from training import registration
from zoo import access

FAILURE_TAG = "zoo.failure"
CHECKPOINTS = "checkpoints"  # the artifact folder of a run's checkpoints
# MLflow 3.17's UI opens pages in its GenAI view (a per-browser switch) unless the address asks for this one.
UI_VIEW = "?workflowType=machine_learning"
KIND_TAG = "zoo.kind"  # train, study, trial, renorm, renorm-eval; pointer: an `mlflow run` run pointing at ours
PROJECT_RUN_TAG = "zoo.project_run_id"
NOTE_TAG = MLFLOW_RUN_NOTE  # the run's description in the MLflow UI (markdown)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # the UI opens such an experiment on its runs
NAME_DETAIL = " · "  # in a run name: what tells runs apart (model, normalization) before it, the rest after
RUN_LINKS_ENV = "ZOO_RUN_LINKS"  # "1": print_run_link prints (the `zoo` entry point decides, zoo/cli/main.py)


class ServerGone(RuntimeError):
    """The tracking server stayed away past the bound (training.outage); what the run still had to send is on local disk."""
    complete_message = True  # it names the kept checkpoint and the command that finishes the run (zoo/cli/main.py)


def check_tracking_server(timeout: float = 5.0) -> None:
    """Fail in seconds, naming the server, when an http(s) tracking URI does not answer or refuses our login."""
    from mlflow.utils.rest_utils import http_request

    parts = urlsplit(mlflow.get_tracking_uri())
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    server = f"{parts.scheme}://{parts.hostname}:{port}"  # without any credentials in the URI
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the MLflow tracking server at {server} ({exc.strerror or exc}): check "
                              "that `mlflow server` runs there, or fix MLFLOW_TRACKING_URI") from None
    creds = get_default_host_creds(mlflow.get_tracking_uri())
    response = http_request(creds, "/api/2.0/mlflow/experiments/search", "POST", json={"max_results": 1},
                            max_retries=0, raise_on_status=False)  # MLFLOW_HTTP_REQUEST_TIMEOUT: a busy server is slow
    if response.status_code == 403 and "Invalid Host header" in response.text:
        raise PermissionError(f"the MLflow tracking server at {server} refused the name it was reached by (403: Invalid "
                              f"Host header): add {parts.netloc.rpartition('@')[2]} to its `mlflow server --allowed-hosts`")
    if response.status_code in (401, 403):
        raise PermissionError(access.tracking_refused(server, response.status_code, creds.username))


def check_can_write(experiment: str, registered_model: str | None = None) -> None:
    """One harmless write to ``experiment`` and ``registered_model`` on a tracking server, so that a login
    lacking EDIT fails in seconds, before any data is loaded, naming what to grant."""
    if not mlflow.get_tracking_uri().startswith(("http:", "https:")):
        return
    client, what = MlflowClient(), f"experiment {experiment!r}"
    try:
        client.set_experiment_tag(experiment_id_for(experiment), EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        if registered_model:
            what = f"registered model {registered_model!r}"
            current = client.get_registered_model(registered_model).description
            client.update_registered_model(registered_model, description=current or "")
        return
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return  # an unlocked server: registering creates the model
        if exc.get_http_status_code() != 403:
            raise
    # Raised past the except block: zoo.cli's generic 403 line would replace this one.
    user = get_default_host_creds(mlflow.get_tracking_uri()).username
    raise PermissionError(f"user {user!r} may not write {what} on the MLflow tracking server (403): ask its admin to "
                          "grant this user EDIT on it (a registered model: created by the admin first, docs/scaleout.md)")


@contextmanager
def start_run(*, experiment: str | None = None, run_name: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, tags: dict[str, str] | None = None,
              stopped: tuple[type[BaseException], ...] = (),
              patiently: Callable[..., Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FINISHED, FAILED (reason tagged) or KILLED (Ctrl-C, a ``stopped`` exception), never RUNNING.
    Inside ``mlflow run`` the project's run is reused when in our experiment, else pointed at ours;
    ``patiently`` (outage.Patience) writes the run's end, waiting out a server that went away."""
    project_run_id, new_top_level = None, run_id is None and parent_run_id is None
    if new_top_level:
        project_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
        if is_project_run_here(project_run_id, experiment):
            run_id, project_run_id = project_run_id, None
    if parent_run_id and not experiment:  # children live beside their parent
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = experiment_id_for(experiment) if new_top_level or not run_id else None
    if run_name and new_top_level:
        run_name = unique_run_name(experiment_id, run_name)
    # A child started while its parent is active in this thread must be "nested" for MLflow.
    nested = parent_run_id is not None and mlflow.active_run() is not None
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=run_name,
                           parent_run_id=parent_run_id, tags=tags, nested=nested)
    if run_id and tags:  # mlflow.start_run ignores tags when it resumes a run
        mlflow.set_tags(tags)
    if project_run_id:
        link_project_run(project_run_id, run.info.run_id)
    try:
        yield run
    except KeyboardInterrupt:
        _end_active_run("KILLED", "interrupted", None)  # at once: Ctrl-C does not wait for a server
        raise
    except ServerGone:
        _drop_active_run()
        raise
    except BaseException as exc:
        _end_active_run("KILLED" if isinstance(exc, stopped) else "FAILED", f"{type(exc).__name__}: {exc}", patiently)
        raise
    else:
        _end_active_run("FINISHED", None, patiently)


def print_run_link(run: RunInfo | str) -> None:
    """MLflow's "View run NAME at: URL" lines on stderr, opening the model-training view (MLflow's open the GenAI one)."""
    uri = mlflow.get_tracking_uri()
    if os.environ.get(RUN_LINKS_ENV) != "1" or not uri.startswith(("http://", "https://")):
        return
    if isinstance(run, str):  # as MLflow does, one lookup for the name (a run ended by id)
        try:
            run = MlflowClient().get_run(run).info
        except MlflowException:  # the server went away again: no link rather than an error
            return
    experiment = f"{access.masked_url(uri).rstrip('/')}/#/experiments/{run.experiment_id}"
    print(f"View run {run.run_name} at: {experiment}/runs/{run.run_id}{UI_VIEW}\n"
          f"View experiment at: {experiment}{UI_VIEW}", file=sys.stderr)


def _end_active_run(status: str, reason: str | None, patiently: Callable[..., Any] | None) -> None:
    # mlflow.end_run forgets the active run before it calls the server, so it cannot be retried:
    # the server is told through the client (patiently, if given), and only then is the run dropped here.
    (patiently or (lambda end, *args: end(*args)))(end_run_by_id, mlflow.active_run().info.run_id, status, reason)
    _drop_active_run(status)


def _drop_active_run(status: str = "KILLED") -> None:
    """Forget the active run here: the server is away (the run stays RUNNING for --resume) or holds ``status``."""
    with suppress(MlflowException):
        mlflow.end_run(status)  # MLflow drops the active run before it calls the server


def experiment_id_for(name: str | None = None) -> str:
    """Experiment ``name``'s id, created and tagged for the runs view if needed; looked up each time
    (mlflow.set_experiment's cached id goes stale when the tracking URI changes)."""
    name = name or default_experiment()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return experiment.experiment_id


def is_project_run_here(run_id: str | None, experiment: str | None = None) -> bool:
    """Whether `mlflow run`'s run (MLFLOW_RUN_ID) lies in ``experiment``: only then is it logged into."""
    return bool(run_id) and MlflowClient().get_run(run_id).info.experiment_id == experiment_id_for(experiment)


def link_project_run(project_run_id: str, run_id: str) -> None:
    """Point `mlflow run`'s run at ours and back; ours takes its source tags (entry point, git, user)."""
    client = MlflowClient()
    project, ours = client.get_run(project_run_id), client.get_run(run_id)
    experiment = client.get_experiment(ours.info.experiment_id)
    for key, value in project.data.tags.items():
        if key.startswith(("mlflow.source.", "mlflow.project.", "mlflow.git")) or key == "mlflow.user":
            client.set_tag(run_id, key, value)
    client.set_tag(run_id, PROJECT_RUN_TAG, project_run_id)
    log_batch(project_run_id, tags={"zoo.run_id": run_id, KIND_TAG: "pointer", NOTE_TAG: (
        f"This `mlflow run` logged its results in experiment **{experiment.name}**: run "
        f"[{ours.info.run_name}](#/experiments/{experiment.experiment_id}/runs/{run_id}{UI_VIEW}).\n\n"
        "(`mlflow run` files its own run in `Default` when given no experiment; "
        "pass `--experiment-name NAME` to keep both in one experiment.)")})


def unique_run_name(experiment_id: str, name: str) -> str:
    """``name``, or with ``#2``, ``#3``... before NAME_DETAIL, where the UI's runs table shows it."""
    head, sep, detail = name.partition(NAME_DETAIL)
    escaped = head.replace("'", "\\'")
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{escaped}%'",
                                      max_results=50_000)
    taken = {run.info.run_name for run in runs}
    return next(candidate for candidate in (name, *(f"{head} #{n}{sep}{detail}" for n in range(2, len(taken) + 3)))
                if candidate not in taken)


def create_run(*, experiment: str, run_name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """The id of a new RUNNING run that is not the active one (a study's parent, batched trials)."""
    experiment_id = experiment_id_for(experiment)
    if parent_run_id is None:
        run_name = unique_run_name(experiment_id, run_name)
    tags = {"mlflow.runName": run_name, **(tags or {}),
            **({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})}
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=run_name).info.run_id


def end_run_by_id(run_id: str, status: str, reason: str | None = None) -> None:
    client = MlflowClient()
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status)
    print_run_link(run_id)


def reopen_run(run_id: str) -> None:
    client = MlflowClient()
    if FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    client.update_run(run_id, status="RUNNING")


def default_experiment() -> str:
    """MLFLOW_EXPERIMENT_NAME / _ID, else ``zoo``; ``Default`` (id 0, where `mlflow run` goes unasked) counts as unset."""
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    if os.environ.get("MLFLOW_EXPERIMENT_ID", "0") != "0":
        with suppress(MlflowException):  # an id left over from another store
            return MlflowClient().get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"]).name
    return "zoo"


def load_checkpoint(run_id: str, artifact_path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        return torch.load(path, map_location="cpu", weights_only=True)


def delete_checkpoints(run_id: str, artifact_path: str = CHECKPOINTS) -> None:
    """Delete a run's checkpoints from any artifact store; a run without any is fine."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if MlflowClient().list_artifacts(run_id, artifact_path):
        get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri).delete_artifacts(artifact_path)


def log_batch(run_id: str, *, metrics: dict[str, float] | None = None, tags: dict[str, Any] | None = None,
              step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                             tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    """Log params never changing one the run holds: `mlflow run` logs -P values as typed, so what zoo
    resolved goes beside (mean=auto, mean_resolved=0.1394)."""
    run_id = run_id or mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {}
    for key, value in params.items():
        if value is None:
            continue
        for name in (key, f"{key}_resolved"):
            if name not in existing:
                fresh[name] = value
                break
            with suppress(TypeError, ValueError):
                if existing[name] == str(value) or float(existing[name]) == float(value):
                    break
        else:  # both taken with other values (a run resumed on other data): neither may change
            print(f"note: run {run_id} keeps its params {key}={existing[key]} and {name}={existing[name]}; "
                  f"this part of it used {value}", file=sys.stderr)
    if fresh:
        mlflow.log_params(fresh, run_id=run_id)


def log_checkpoints(states: dict[str, dict[str, Any]], artifact_path: str = CHECKPOINTS, run_id: str | None = None) -> None:
    """Save each ``{name: state}`` as ``checkpoints/NAME.pt`` in one upload, replacing a name logged before."""
    if states:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoints(states, Path(tmp))
            mlflow.log_artifacts(tmp, artifact_path=artifact_path, run_id=run_id)


def write_checkpoints(states: dict[str, dict[str, Any]], folder: Path) -> None:
    """Save each ``{name: state}`` as ``folder/NAME.pt``, a state under several names serialized once."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[int, Path] = {}
    for name, state in states.items():
        path = folder / f"{name}.pt"
        if id(state) in written:
            shutil.copyfile(written[id(state)], path)
        else:
            torch.save(state, path)
            written[id(state)] = path


def upload_checkpoints(run_id: str, folder: Path, names: list[str]) -> None:
    for name in names:  # replacing the run's checkpoints/NAME.pt
        MlflowClient().log_artifact(run_id, str(folder / f"{name}.pt"), artifact_path=CHECKPOINTS)


def log_metric_records(run_id: str, records: list[dict[str, Any]]) -> None:
    """``{key, value, timestamp, step}`` records in order; resending is harmless (the store drops exact duplicates)."""
    MlflowClient().log_batch(run_id, metrics=[Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                                              for r in records])


def log_dataset_inputs(name: str, source: str, splits: dict[str, Any], run_id: str | None = None) -> None:
    """Image splits (``{"train": split, ...}``) as the run's dataset inputs named NAME-CONTEXT."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    datasets = [_mlflow_dataset(split.images, split.labels, source, f"{name}-{context}") for context, split in splits.items()]
    inputs = [DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for dataset, context in zip(datasets, splits)]
    run_id = run_id or mlflow.active_run().info.run_id
    try:
        MlflowClient().log_inputs(run_id, datasets=inputs)
    except MlflowException as exc:
        # Two trial threads logging the same split at once clash on the SQL store's unique key; the
        # loser's transaction was rolled back and the dataset now exists, so a second try links it.
        if "unique" not in str(exc).lower():
            raise
        MlflowClient().log_inputs(run_id, datasets=inputs)


@lru_cache(maxsize=3)  # one dataset's train, validation and test splits
def _mlflow_dataset(images: torch.Tensor, labels: torch.Tensor, source: str, name: str):
    """A split's MLflow dataset, made once per process (tensors hash by identity; the cache holds them)."""
    with warnings.catch_warnings():  # MLflow 3.17 registers the local source type twice and says so
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_numpy(images.cpu().numpy(), targets=labels.cpu().numpy(), source=source or None,
                                      name=name)


def log_model(network: torch.nn.Module, *, registered_name: str | None = None, alias: str | None = None,
              **model: Any) -> str:
    """Log ``network`` in the active run as a zoo model, registered as ``registered_name`` (``@alias``); its URI.
    Once per run: a retry after an outage reuses the READY model (a cut-off upload stays PENDING)."""
    from mlflow.entities import LoggedModelStatus

    run = mlflow.active_run().info
    models = mlflow.search_logged_models(experiment_ids=[run.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.run_id}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    uri = f"models:/{ready[0].model_id}" if ready else mlflow_model.log_model(
        network, registered_name=registered_name, **model)
    if registered_name:
        registration.register(uri, registered_name, alias)
    return uri
