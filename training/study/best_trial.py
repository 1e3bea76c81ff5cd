"""Only the best trial keeps its checkpoints and, once the study ends, has its network logged and registered."""

from __future__ import annotations

import sys

import mlflow
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from zoo.model_format import mlflow_model
from training import checkpoints, registration, tracking
from training.study.config import MODEL_URI_TAG, RUN_ATTR, StudyConfig
from training.study.trials import TrialContext, log_trial_model
from training.train import build_network
from zoo.data import Dataset
from zoo.normalization import Normalization


def _tested_network(run_id: str, config: StudyConfig, dataset: Dataset) -> tuple[torch.nn.Module, Normalization]:
    """A trial's network rebuilt with the weights it was tested with (``best`` under keep_best, else ``last``)."""
    tested = checkpoints.BEST if config.train_config().resolved().keep_best else checkpoints.LAST
    state = tracking.load_checkpoint(run_id, checkpoints.checkpoint_path(tested))
    network = build_network(config.train_config(), dataset)
    network.load_state_dict(state["model"])
    return network, Normalization.from_dict(state["normalization"])


def publish_best_model(study: optuna.Study, parent_run_id: str, config: StudyConfig, dataset: Dataset) -> str | None:
    """Log the best trial's network, rebuilt from its checkpoint, in its run; register it as ``config.register``."""
    run_id, client = _best_run_id(study), mlflow.MlflowClient()
    if config.log_models == "none" or run_id is None:
        return None
    uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if uri is None:
        network, normalization = _tested_network(run_id, config, dataset)
        with tracking.start_run(run_id=run_id):
            uri = log_trial_model(network, normalization, config, dataset, study.best_trial.user_attrs.get("test_accuracy"),
                                   onnx=config.register is not None)
            mlflow.set_tag(MODEL_URI_TAG, uri)
    if config.register and client.get_run(parent_run_id).data.tags.get("zoo.registered_run_id") != run_id:
        if not mlflow_model.ships_onnx(uri):  # logged in its trial (--log-models all), before it was the best
            network, normalization = _tested_network(run_id, config, dataset)
            mlflow_model.ship_onnx(uri, network, normalization, dataset.image_shape, dataset.classes, config.model,
                               source=f"models:/{config.register}")
        version = registration.register(uri, config.register, config.alias)
        tracking.log_batch(parent_run_id, tags={"zoo.registered_run_id": run_id, "zoo.registered_version": version})
    client.set_tag(parent_run_id, "best_model_uri", uri)
    return uri


def _best_run_id(study: optuna.Study) -> str | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial.user_attrs.get(RUN_ATTR) if complete else None


def keep_best_trial_checkpoints(study: optuna.Study, trial: FrozenTrial, ctx: TrialContext) -> None:
    """Delete the checkpoints of a finished trial that is not the best, or of the best it supersedes."""
    run_id, best = trial.user_attrs.get(RUN_ATTR), _best_run_id(study)
    if run_id is None or not ctx.may_delete:
        return
    try:
        if run_id != best:
            ctx.patience.patiently(tracking.delete_checkpoints, run_id)
            return
        if ctx.checkpointed_best not in (None, run_id):
            ctx.patience.patiently(tracking.delete_checkpoints, ctx.checkpointed_best)
        ctx.checkpointed_best = run_id
    except tracking.ServerGone:
        raise
    except Exception as exc:  # a failed clean-up must not stop the study; the final sweep retries
        ctx.may_delete = "403" not in str(exc)
        tqdm.write(f"study: could not delete a trial's checkpoints ({_cleanup_failure(exc)})", file=sys.stderr)


def sweep_checkpoints(study: optuna.Study) -> None:
    """Delete the checkpoints of every finished trial but the best; a failure is reported, not raised."""
    best, kept, failure = _best_run_id(study), 0, None
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(RUN_ATTR)
        if trial.state.is_finished() and run_id not in (None, best):
            try:
                tracking.delete_checkpoints(run_id)
            except Exception as exc:
                kept, failure = kept + 1, exc
    if failure is not None:
        tqdm.write(f"study: kept the checkpoints of trials that are not the best ({kept}): {_cleanup_failure(failure)}",
                   file=sys.stderr)


def _cleanup_failure(exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "403" in reason:
        reason += (" (MLflow counts deleting artifacts as MANAGE: once the study is complete, the same command run "
                   "with the admin's login deletes them, docs/scaleout.md)")
    return reason
