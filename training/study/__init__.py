"""One Optuna study over input normalizations = one MLflow parent run (named in a study user attribute,
so every process or machine running the command nests its trials under it), one child run per trial;
a lock in the storage ends any number of workers with exactly ``trials`` trials. Each module imports
only those before it in docs/architecture.md."""
