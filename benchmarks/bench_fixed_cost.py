"""Where `zoo train`'s time goes outside training: the fixed cost of one run, phase by phase.

Runs ``zoo train --model mnist_cnn --dataset fashion-mnist --epochs 1 --max-batches 1`` as whole
processes (so the epoch is one batch of 64; the validation pass still covers the 6,000 validation
images and the test pass the 10,000 test images), all into one SQLite store in a temporary folder:
the first run creates the store, the others find it, as a user's runs do. Inside each process the
phases are timed by wrapping the project's functions (no change to the code measured): Python
start-up and the imports, data, the MLflow run's start, the batch, validation, test, figures,
checkpoint, ``log_model`` and the exit. For comparison, a plain script times the libraries alone:
``import torch`` + ``torch._dynamo`` (torch.optim and torch.export import it) + ``mlflow``, opening
the same store (``MlflowClient().get_experiment_by_name``) and exiting. ``--baseline-src`` runs another checkout's
`zoo train` in turn with this one's (each in a store of its own).

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_fixed_cost [--runs 5] [--baseline-src OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

COMMAND = ["train", "--model", "mnist_cnn", "--dataset", "fashion-mnist", "--epochs", "1", "--max-batches", "1",
           "--experiment", "fixed-cost"]
T0_VARIABLE = "ZOO_BENCH_T0"  # the parent's time.time() just before it started the process

# (module, function, phase): every call of the function counts towards the phase.
WRAPPED = [
    ("training.train", "load_training_data", "data"),
    ("training.engine", "run_epoch", "training (1 batch)"),
    ("training.train", "evaluate", "validation (6,000 images)"),
    ("training.train", "evaluate_predictions", "test (10,000 images)"),
    ("training.train", "log_test_results", "test metrics and figures"),
    ("training.tracking", "write_checkpoints", "checkpoint"),  # zoo train keeps them locally (training/outage.py)
    ("training.tracking", "upload_checkpoints", "checkpoint"),  # then sends them
    ("training.tracking", "log_model", "log_model"),
]
# Phases that grow with the data (the rest is the run's fixed cost).
DATA_PHASES = ("training (1 batch)", "validation (6,000 images)", "test (10,000 images)")


def child(out: str, argv: list[str]) -> None:
    """Run the zoo command ``argv`` in this process, writing the phases' seconds to ``out`` at exit."""
    t0 = float(os.environ[T0_VARIABLE])
    phases: dict[str, float] = {"Python start-up": time.time() - t0}

    def timed_import(name: str, phase: str) -> None:
        started = time.time()
        importlib.import_module(name)
        phases[phase] = phases.get(phase, 0.0) + time.time() - started

    timed_import("torch", "import torch")
    timed_import("torch._dynamo", "import torch._dynamo")
    timed_import("mlflow", "import mlflow")
    timed_import("training.train", "import the project")
    timed_import("zoo.cli.main", "import the project")
    for module_name, function_name, phase in WRAPPED:
        module = importlib.import_module(module_name)
        phases.setdefault(phase, 0.0)
        original = getattr(module, function_name)

        @functools.wraps(original)
        def wrapper(*args, __original=original, __phase=phase, **kwargs):
            started = time.time()
            try:
                return __original(*args, **kwargs)
            finally:
                phases[__phase] += time.time() - started

        setattr(module, function_name, wrapper)

    import atexit

    started = time.time()

    def write() -> None:
        phases["command"] = time.time() - started
        with open(out, "w") as f:
            json.dump({"phases": phases, "exit_at": time.time() - t0}, f)

    atexit.register(write)  # after the command's own exit handlers, which registered later and run first
    sys.argv = ["zoo", *argv]
    importlib.import_module("zoo.cli.main").main()  # what the `zoo` console script runs


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(store: str, source: str = PROJECT) -> dict[str, float]:
    """One whole `zoo train` process of the code in ``source``: wall seconds and its phases (seconds)."""
    from benchmarks.bench_train import timed  # here, not at the top: the child runs under another checkout's path

    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": source, T0_VARIABLE: repr(time.time())}
        wall = timed([sys.executable, os.path.abspath(__file__), "--child", out.name, "--", *COMMAND], env)
        record = json.load(open(out.name))
    phases = record["phases"]
    inside = sum(phases[p] for p in {p for _, _, p in WRAPPED})
    row = {k: v for k, v in phases.items() if k != "command"}
    row["the rest of the command (CLI, checks, MLflow run start and end, params, metrics)"] = phases["command"] - inside
    row["interpreter exit"] = wall - record["exit_at"]
    row["wall"] = wall
    row["fixed cost"] = wall - sum(phases[p] for p in DATA_PHASES)
    row["of which imports"] = sum(v for k, v in phases.items() if k.startswith("import"))
    return row


def library_floor(store: str) -> dict[str, float]:
    """Python + import torch, torch._dynamo, mlflow + opening the store, in a fresh process: wall seconds."""
    code = ("import torch, torch._dynamo, mlflow\n"
            "from mlflow import MlflowClient\n"
            "MlflowClient().get_experiment_by_name('fixed-cost')\n")
    from benchmarks.bench_train import timed

    return {"wall": timed([sys.executable, "-c", code], {**os.environ, "MLFLOW_TRACKING_URI": store})}


def summarize(rows: list[dict[str, float]]) -> dict:
    later = rows[1:] or rows
    return {"first": rows[0], "median": {k: statistics.median(r[k] for r in later) for k in later[0]}}


def measure(runs: int = 5, baseline: str | None = None) -> dict:
    """``runs`` processes into one new store (the first creates it), then the library floor as often;
    returns the first run, the median of the later ones per phase, and the floor's median. With
    ``baseline`` (another checkout of the project), its runs alternate with these, in a store of their own."""
    with tempfile.TemporaryDirectory() as tmp:
        store, other = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/baseline.db"
        rows, baseline_rows = [], []
        for _ in range(runs):
            rows.append(run_once(store))
            if baseline:
                baseline_rows.append(run_once(other, baseline))
        floors = [library_floor(store)["wall"] for _ in range(max(runs - 1, 1))]
    return {**summarize(rows), "floor": statistics.median(floors), "runs": runs,
            **({"baseline": summarize(baseline_rows)} if baseline else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="processes (the first creates the store)")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="another checkout of the project (e.g. `git worktree add`), run in turn with this one")
    parser.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.argv)
        return
    result = measure(args.runs, args.baseline_src)
    later = f"median of the {result['runs'] - 1} later runs"
    print(f"load {os.getloadavg()[0]:.1f}; seconds: first run (new store) | {later}"
          + (f" || baseline {args.baseline_src}: first | {later}" if args.baseline_src else ""))
    for phase, seconds in result["median"].items():
        line = f"{phase:80s} {result['first'][phase]:6.2f} | {seconds:6.2f}"
        if "baseline" in result:
            b = result["baseline"]
            line += f" || {b['first'].get(phase, float('nan')):6.2f} | {b['median'].get(phase, float('nan')):6.2f}"
        print(line)
    print(f"{'the libraries alone: Python, import torch + torch._dynamo + mlflow, open the store':80s} {'':6s} | "
          f"{result['floor']:6.2f}")


if __name__ == "__main__":
    main()
