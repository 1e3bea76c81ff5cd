"""The study's one MLflow parent run: created by the process that created the study, named in the
study's storage (a user attribute), adopted by every other process, reopened when the study resumes."""

from __future__ import annotations

import sys
from typing import Any

import optuna
from mlflow import MlflowClient
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import tracking
from training.outage import Patience
from training.study.config import PARENT_ATTR, RESUME_STUDY, StudyConfig
from zoo.access import masked_url


def ensure_parent_run(study: optuna.Study, created: bool, config: StudyConfig, storage_url: str,
                      project_run_id: str | None = None) -> str:
    """The study's one parent run: created by the process that created the study, adopted by the others.

    Called under the study's lock, taken before the study is created: a process that joins finds the
    parent, or none when its creator stopped before making it, and then makes it at once (no waiting).
    Inside ``mlflow run``, ``project_run_id`` (the project's run) becomes the parent of a new study,
    or points at the parent of an existing one.
    """
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        if not created:
            tqdm.write(f"study {study.study_name}: the process that created it stopped before creating its MLflow "
                       "parent run (its error said why): this one creates it", file=sys.stderr)
        return _create_parent_run(study, config, storage_url, project_run_id)
    # A worker joining while the tracking server restarts waits for it, as its trials would (each call can be
    # made twice).
    patiently = Patience(config.tracking_timeout, RESUME_STUDY).patiently
    if project_run_id and project_run_id != parent:
        patiently(tracking.log_batch, project_run_id, tags={"zoo.study_parent_run_id": parent})
    if patiently(MlflowClient().get_run, parent).info.status != "RUNNING":
        patiently(tracking.reopen_run, parent)  # resuming
    return parent


def _create_parent_run(study: optuna.Study, config: StudyConfig, storage_url: str,
                       project_run_id: str | None = None) -> str:
    tags = {"optuna.study_name": config.name, "optuna.storage": masked_url(storage_url), tracking.KIND_TAG: "study",
            "zoo.model": config.model, "zoo.dataset": config.dataset}
    if tracking.is_project_run_here(project_run_id, config.experiment):
        run_id = project_run_id
        tracking.log_batch(run_id, tags={**tags, "mlflow.runName": f"study {config.name}"})
    else:
        run_id = tracking.create_run(experiment=config.experiment or tracking.default_experiment(),
                                     run_name=f"study {config.name}", tags=tags)
        if project_run_id:
            tracking.link_project_run(project_run_id, run_id)
    tracking.log_params(_parent_params(config, storage_url), run_id=run_id)
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _parent_params(config: StudyConfig, storage_url: str) -> dict[str, Any]:
    return {
        "optuna_study": config.name, "optuna_storage": masked_url(storage_url), "trials": config.trials,
        "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
        "mean_range": "{:g},{:g}".format(*config.mean_range), "std_range": "{:g},{:g}".format(*config.std_range),
        "mean_scale": "linear", "std_scale": "log", "per_channel": config.per_channel,
        "sampler": config.sampler, "seed": config.seed, "pruner": "median" if config.prune else "none",
        "batch_size": config.batch_size, "train_size": config.train_size, "val_size": config.val_size,
        "test_size": config.test_size, "max_batches": config.max_batches, "collapse_margin": config.collapse_margin,
        **({"image_size": config.image_size} if config.image_size else {}),
        **({"val_fraction": config.val_fraction} if config.val_fraction is not None else {}),
        **({"test_fraction": config.test_fraction} if config.test_fraction is not None else {}),
    }
