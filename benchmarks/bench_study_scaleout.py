"""Finished study trials per minute with 1, 2 and 3 `zoo study` workers on one study, on
SQLite (Optuna storage and MLflow store, one machine) and on PostgreSQL + `mlflow server`
(PostgreSQL backend store, served artifacts): the set-up for several machines, here on one.

Trials are tiny (256 training images = 4 batches, 200 validation and test images), so the cost
of coordination (the storage lock, MLflow writes, checkpoints through the server) shows. The
script starts its own PostgreSQL and mlflow server (as the tests do) and stops them at the end.

Rate = finished trials / (last trial's end - first trial's start), from Optuna's timestamps:
process start-up (imports, data loading, creating the stores) is left out; wall is the whole command.

Run: PYTHONPATH=. .venv/bin/python -m benchmarks.bench_study_scaleout [--trials 12] [--workers 1 2 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from tests.servers import mlflow_server, postgres_server

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "mnist-5k", "--train-size", "256", "--val-size", "200", "--test-size", "200",
        "--log-models", "none", "--no-progress", "--heartbeat", "10"]


@contextmanager
def sqlite_stores(folder: Path) -> Iterator[tuple[str, str]]:
    yield f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


@contextmanager
def server_stores(folder: Path) -> Iterator[tuple[str, str]]:
    with postgres_server("optuna", "mlflow") as postgres, mlflow_server(f"{postgres}/mlflow", folder / "artifacts") as url:
        yield f"{postgres}/optuna", url


def run_workers(workers: int, trials: int, storage: str, tracking_uri: str, study: str, folder: Path) -> dict:
    """``workers`` processes of the same `zoo study` command; returns the measured figures."""
    command = [sys.executable, "-m", "zoo.cli", "study", *TINY, "--trials", str(trials),
               "--storage", storage, "--study-name", study]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri}
    started = time.monotonic()
    logs = [open(folder / f"{study}-worker{i}.log", "w") for i in range(workers)]
    procs = [subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [p.wait(timeout=1800) for p in procs]
    wall = time.monotonic() - started
    for log in logs:
        log.close()
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes}); see {folder}/{study}-worker*.log")
    done = [t for t in optuna.load_study(study_name=study, storage=storage).get_trials() if t.state.is_finished()]
    window = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"workers": workers, "finished": len(done), "window_s": window, "per_min": 60 * len(done) / window,
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    args = parser.parse_args()
    print(f"{platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{args.trials} trials per row", flush=True)
    print("| stores | workers | finished trials | first start -> last end (s) | trials/min | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for backend in args.backends:
        with tempfile.TemporaryDirectory(prefix=f"zoo-bench-{backend}-") as tmp:
            label = "SQLite + SQLite MLflow store" if backend == "sqlite" else "PostgreSQL + mlflow server"
            for workers in args.workers:
                folder = Path(tmp) / f"w{workers}"  # fresh stores (and servers) for every row
                folder.mkdir()
                with (sqlite_stores if backend == "sqlite" else server_stores)(folder) as (storage, tracking_uri):
                    row = run_workers(workers, args.trials, storage, tracking_uri, f"bench-{workers}", folder)
                print(f"| {label} | {row['workers']} | {row['finished']} | {row['window_s']:.1f} | "
                      f"{row['per_min']:.1f} | {row['wall_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
