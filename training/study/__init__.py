"""One Optuna study over input normalizations = one MLflow parent run, one child run per trial.

The study lives in Optuna storage (SQLite for one machine, PostgreSQL for several) and
names its MLflow parent run in a study user attribute, so every process or
machine running the same command nests its trials under the same parent, and a re-run
resumes the study under that parent. Each trial is trained by :func:`training.train.fit`
(the same code path as ``zoo train``) inside a child run started with an explicit
``parent_run_id``, not ``nested=True``, which follows the calling thread's active run.

Trials are started by this package's own ask/tell loop rather than ``study.optimize``: a trial
starts only under a lock held in the storage (:class:`storage.StudyLock`) while fewer than ``trials``
are finished or running, so any number of workers ends with exactly that many finished trials.

Modules, each importing only those above it:

- ``config``: what a study is: StudyConfig, StudyResult, the names it stores in Optuna and MLflow,
  its samplers, the normalizations it suggests and enqueues, what counts as a finished or collapsed trial.
- ``storage``: where a study is stored and locked: the Optuna storage, StudyLock, opening the study,
  the search it stores, heartbeats, ending the runs of trials whose process died, a database that restarts.
- ``trials``: how a trial runs: its child run, the objective (one trial, or several trained together
  by training.train_batch) and pruning.
- ``report``: how a study is summarized and drawn on its parent run: summary, trials table,
  description, figures, interactive page.
- ``report_files``: the same results as Markdown and PNG files for the docs (``python -m training.study.report_files``).
- ``best_trial``: what the best trial keeps: its checkpoints (every other trial loses them) and, at the
  end, its logged and registered model.
- ``workers``: how processes and machines share the study: its one MLflow parent run, claiming trials,
  the work loop, the processes ``--jobs`` starts, :func:`run_study` and its default number of jobs.
"""
