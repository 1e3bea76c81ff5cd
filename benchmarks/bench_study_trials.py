"""What a `zoo study` trial costs besides its training: per-trial fixed cost, processes vs threads,
batched vs sequential trials. Every measurement runs the real `zoo study` command, as a user does,
in a fresh temporary SQLite Optuna storage and MLflow store.

- **Fixed cost per trial**: tiny trials (64 training, 64 validation, 64 test images: one batch), so
  nearly all of a trial's time is what every trial pays whatever its size (MLflow runs, params,
  metrics, description, dataset inputs, checkpoints, figures, the parent's summary). Measured as the
  interval between consecutive trial starts (Optuna's timestamps; the first trial, which pays the
  process's one-off costs, is left out) minus the trial's ``epoch_seconds`` metric (its training
  and validation compute). The 64-image test pass stays in, so the figure errs high.
- **Processes vs threads**: the same study run by two `zoo study` processes sharing the storage with
  one torch thread each (``OMP_NUM_THREADS=1``), against one process with two torch threads. Rate =
  finished trials / (last trial's end - first trial's start), from Optuna's timestamps.
- **Batched vs sequential**: ``zoo study --batch-trials K`` against ``--batch-trials 1``; skipped,
  with a note, when this checkout's `zoo study` has no ``--batch-trials``.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_study_trials overhead --trials 8
    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_study_trials threads --train-size 6000 --trials 6
    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_study_trials batched --batch-trials 4 --trials 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ZOO = os.path.join(os.path.dirname(sys.executable), "zoo")
TINY = {"dataset": "mnist-5k", "train_size": 64, "val_size": 64, "test_size": 64}


def study_command(*, trials: int, dataset: str, train_size: int | None, val_size: int | None = None,
                  test_size: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    sizes = {"--train-size": train_size, "--val-size": val_size, "--test-size": test_size}
    return [ZOO, "study", "--dataset", dataset, "--trials", str(trials), "--log-models", "none", "--no-progress",
            "--storage", "sqlite:///optuna.db", "--study-name", "bench",
            *(arg for option, value in sizes.items() if value for arg in (option, str(value))), *extra]


def run_study_processes(command: list[str], folder: Path, processes: int = 1, threads: int | None = None) -> None:
    """``processes`` copies of ``command`` started together in ``folder`` (its stores live there)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    logs = [open(folder / f"worker{i}.log", "w") for i in range(processes)]
    procs = [subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    if any(codes):
        tail = (folder / "worker0.log").read_text()[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit codes {codes}):\n{tail}")


def finished_trials(folder: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'optuna.db'}")
    return sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()), key=lambda t: t.datetime_start)


def trial_rate(folder: Path) -> dict[str, float]:
    """Finished trials per minute between the first trial's start and the last one's end."""
    done = finished_trials(folder)
    window = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"trials": len(done), "window_s": window, "per_min": 60 * len(done) / window, "s_per_trial": window / len(done)}


def measure_overhead(trials: int = 8) -> dict[str, float]:
    """Median fixed cost of a tiny trial (see the module docstring), and its parts."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="zoo-bench-overhead-") as tmp:
        folder = Path(tmp)
        run_study_processes(study_command(trials=trials, **TINY, extra=("--jobs", "1")), folder)  # one after another
        done = finished_trials(folder)
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        compute = [client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["epoch_seconds"] for t in done]
    intervals = [(b.datetime_start - a.datetime_start).total_seconds() for a, b in zip(done, done[1:])]
    steady = list(zip(intervals, compute))[1:]  # the first trial pays the process's one-off costs
    return {"trials": len(done), "interval_s": statistics.median(i for i, _ in steady),
            "compute_s": statistics.median(c for _, c in steady),
            "fixed_s": statistics.median(i - c for i, c in steady)}


# label -> (processes, OMP_NUM_THREADS, --jobs): the ways to spend two cores on one study
LAYOUTS = {
    "1 process, 1 trial at a time, 2 torch threads": (1, 2, 1),
    "2 processes, 1 torch thread each": (2, 1, 1),
    "1 command, --jobs 2 (2 trial processes, 1 torch thread each)": (1, 2, 2),
}


def measure_threads(trials: int = 6, train_size: int = 6000, dataset: str = "fashion-mnist",
                    layouts: tuple[str, ...] = tuple(LAYOUTS)) -> dict[str, dict]:
    """The same study run with two cores spent in each of ``layouts`` (see LAYOUTS)."""
    rows = {}
    for label in layouts:
        processes, threads, jobs = LAYOUTS[label]
        with tempfile.TemporaryDirectory(prefix="zoo-bench-threads-") as tmp:
            command = study_command(trials=trials, dataset=dataset, train_size=train_size, val_size=1000,
                                    test_size=1000, extra=("--jobs", str(jobs)))
            run_study_processes(command, Path(tmp), processes, threads)
            rows[label] = trial_rate(Path(tmp))
    return rows


def measure_study(trials: int = 20, train_size: int | None = None, dataset: str = "fashion-mnist") -> dict[str, dict]:
    """One `zoo study` with its default settings (1 epoch, default --jobs) on ``dataset``: its trial rate."""
    with tempfile.TemporaryDirectory(prefix="zoo-bench-study-") as tmp:
        run_study_processes(study_command(trials=trials, dataset=dataset, train_size=train_size), Path(tmp))
        return {"measured": trial_rate(Path(tmp))}


def has_batch_trials() -> bool:
    help_text = subprocess.run([ZOO, "study", "--help"], capture_output=True, text=True).stdout
    return "--batch-trials" in help_text


def measure_batched(batch: int = 4, trials: int = 8, train_size: int = 6000,
                    dataset: str = "fashion-mnist") -> dict[str, dict] | None:
    """``--batch-trials batch`` against ``--batch-trials 1``; None when `zoo study` lacks the option."""
    if not has_batch_trials():
        return None
    rows = {}
    for k in (1, batch):
        with tempfile.TemporaryDirectory(prefix="zoo-bench-batched-") as tmp:
            command = study_command(trials=trials, dataset=dataset, train_size=train_size, val_size=1000,
                                    test_size=1000, extra=("--batch-trials", str(k)))
            run_study_processes(command, Path(tmp))
            rows[f"--batch-trials {k}"] = trial_rate(Path(tmp))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["overhead", "threads", "batched"])
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--batch-trials", type=int, default=4)
    args = parser.parse_args()
    if args.what == "overhead":
        r = measure_overhead(args.trials or 8)
        print(f"{r['trials']} tiny trials: median {r['interval_s']:.2f} s between trial starts, of which compute "
              f"{r['compute_s']:.2f} s: fixed cost {r['fixed_s']:.2f} s per trial")
        return
    rows = (measure_threads(args.trials or 6, args.train_size) if args.what == "threads"
            else measure_batched(args.batch_trials, args.trials or 8, args.train_size))
    if rows is None:
        print("skipped: this checkout's `zoo study` has no --batch-trials option")
        return
    for label, r in rows.items():
        print(f"{label}: {r['trials']} trials in {r['window_s']:.1f} s, {r['per_min']:.2f} trials/min")


if __name__ == "__main__":
    main()
