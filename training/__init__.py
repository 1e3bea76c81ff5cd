"""Jobs that produce MLflow runs: train one model, run an Optuna study, re-evaluate pretrained models.

Modules by concern:

- ``train_config``: what one training run is set to do (TrainConfig) and how its MLflow run shows it
  (params, name, tags, description).
- ``train``: train one model in one MLflow run (``zoo train``), stop it cleanly, resume it.
- ``train_batch``: train K runs that differ only in their normalization as one batched computation.
- ``epochs``: what every finished epoch leaves behind (history, best epoch, metrics, checkpoints),
  shared by ``train`` and ``train_batch``.
- ``engine``: the one training loop and evaluation loop, and the trainers (how a model takes its steps).
- ``checkpoints``: what a checkpoint holds, which ones are kept, stopping a run cleanly.
- ``outage``: riding out a tracking server that goes away mid-run.
- ``tracking``: writes runs to MLflow (params, metrics, tags, checkpoints, dataset inputs) and logs
  models through zoo.model_format, whose ``mlflow_model`` writes the logged model itself;
  ``registration``: the registry's writes: registered models, versions, aliases, descriptions and tags.
- ``figures``: the pictures runs log (confusion matrix, misclassified images, accuracy plots).
- ``study/``: one Optuna study over normalizations, one parent run, one child run per trial
  (its ``__init__`` lists its modules).
- ``renorm``: pretrained models re-evaluated under other normalizations; ``renorm_demo``: that
  experiment on real data, offline.
"""
