"""Jobs that produce MLflow runs: train one model, run an Optuna study, re-evaluate pretrained models.
docs/architecture.md lists the modules and what each owns."""
