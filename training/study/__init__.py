"""One Optuna study over input normalizations = one MLflow parent run, one child run per trial.

The study lives in Optuna storage (SQLite for one machine, PostgreSQL for several) and names its parent
run in a study user attribute, so every process or machine running the same command nests its trials
under that parent, and a re-run resumes it. Trials start under a lock held in the storage
(:class:`storage.StudyLock`) while fewer than ``trials`` are finished or running, so any number of
workers ends with exactly that many. Each module imports only those before it in docs/architecture.md.
"""
