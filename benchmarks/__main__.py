"""Every side-by-side measurement of the project in one run, written into benchmarks/RESULTS.md.

    PYTHONPATH=. .venv/bin/python -m benchmarks            # the figures to quote (about 25 min on 2 quiet cores)
    PYTHONPATH=. .venv/bin/python -m benchmarks --quick    # a smoke run of every benchmark at toy sizes
    PYTHONPATH=. .venv/bin/python -m benchmarks --only overhead threads

Benchmarks, in order (each reuses the functions of its own script, which also runs alone):

- ``train``: the published notebook's protocol against `zoo train`, one Fashion-MNIST epoch (bench_train.py);
- ``fixed``: `zoo train`'s fixed cost phase by phase, against the libraries' own start-up (bench_fixed_cost.py);
- ``classify``: `mlflow models predict` against `zoo classify` on one image from a registry alias (bench_classify.py);
- ``overhead``: the fixed cost of a study trial (bench_study_trials.py);
- ``threads``: two cores spent as one 2-thread trial, two 1-thread processes, or ``--jobs 2``;
- ``batched``: ``zoo study --batch-trials K`` against ``--batch-trials 1`` (skipped while `zoo study` lacks it);
- ``floor``: `zoo train`'s loop and `zoo classify FOLDER` against the plain loop of each job, as ratios (bench_floor.py);
- ``projection``: N trials of the full Fashion-MNIST study (1 epoch, default settings), projected to 200;
- ``folders``: image folders decoded into the cache against a plain PIL loop, the cached start, and
  `zoo train` on Fashion-MNIST as PNG files against the catalog's (bench_folders.py).
- ``spark``: docs/spark.md's Spark job (``local[2]``, ``spark_udf``) against `zoo classify` on one folder of
  digit PNGs, from one registry alias (bench_spark.py; needs pyspark and Java).

Not run from here: bench_recipes.py (issue 32: zoo's default recipe before and after against timm's train.py,
hours of training, needs an older checkout): run it alone; it writes its own table for this file.

Each benchmark's result replaces its own part of the generated section of RESULTS.md (between the
markers below; ``--only`` refreshes some and keeps the others), with the exact command, the date,
the machine and the load average before and after (other jobs on the machine show there); the rest
of the file is left as it is. A benchmark that fails is reported in its part and the others still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from benchmarks import (bench_classify, bench_fixed_cost, bench_floor, bench_folders, bench_spark, bench_study_trials,
                        bench_train)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- python -m benchmarks: begin (generated; edits here are overwritten) -->", "<!-- python -m benchmarks: end -->"
PROJECTED_TRIALS = 200


def table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def rate_rows(rows: dict[str, dict]) -> list[list[object]]:
    return [[label, r["trials"], r["window_s"], r["per_min"], r["s_per_trial"]] for label, r in rows.items()]


RATE_HEADER = ["", "finished trials", "first start -> last end (s)", "trials/min", "s per trial"]


def train(quick: bool, pairs: int = 2) -> str:
    result = bench_train.compare(pairs=1 if quick else pairs, batches=10 if quick else None)
    m = result["median"]
    ratios = "; ".join(f"`{name}` {', '.join(f'{r:.2f}' for r in values)}" for name, values in result["ratios"].items())
    return (f"`zoo train --model mnist_cnn --dataset fashion-mnist --epochs 1` (and the same with `--precision bf16-mixed`) "
            f"against the notebook's protocol (DataLoader, per-sample ToTensor + Normalize, batch 64, Adadelta), whole "
            f"processes in rounds of the three, {'10 batches' if quick else '54,000 training images'}; medians. The zoo runs "
            "log into one SQLite store created before the first round, as a user's runs find theirs (a new store's "
            "creation: the fixed-cost part below). "
            "zoo's loop figure divides the training images by the epoch's seconds, which include its 6,000-image "
            "validation; \"outside the epoch\" is the rest of the wall time (start-up, store, test, figures, model).\n\n"
            + table(["", "wall (s)", "loop (images/s)", "outside the epoch (s)", "test accuracy"],
                    [[name, r["wall_s"], r["images_per_s"], r["outside_s"], f"{r['test_accuracy']:.4f}"] for name, r in m.items()])
            + f"\n\nreference wall / zoo wall per round: {ratios} (above 1: zoo is faster).")


def fixed(quick: bool) -> str:
    r = bench_fixed_cost.measure(runs=2 if quick else 5)
    first, median = r["first"], r["median"]
    rows = [[phase, first[phase], median[phase]] for phase in median]
    rows.append(["for comparison, a plain script: import torch + torch._dynamo + mlflow, open the store, exit",
                 "", r["floor"]])
    return (f"`{' '.join(['zoo', *bench_fixed_cost.COMMAND])}`, {r['runs']} whole processes into one SQLite store "
            "(the first creates it); phases timed inside each process by wrapping the project's functions. The batch, "
            "validation and test grow with the data; the **fixed cost** is the wall time without them. The last row "
            "times the libraries alone.\n\n"
            + table(["seconds", "first run (new store)", f"median of the {r['runs'] - 1} later runs"], rows))


def classify(quick: bool) -> str:
    rows = bench_classify.predict_vs_classify(pairs=1 if quick else 3)
    z, m = rows["zoo classify"]["wall_s"], rows["mlflow models predict"]["wall_s"]
    floor = rows["import mlflow + one alias lookup"]["wall_s"]
    return ("One 28x28 PNG classified from `models:/bench@champion` (a registered mnist_cnn, SQLite store, "
            "`--env-manager local`; zoo's export cache filled by one earlier call), whole processes in rounds of the "
            "three; medians. Both classifiers answer the same label (checked). The third is the floor of any command "
            "that reads the alias: a Python process that imports MLflow and looks the alias up once.\n\n"
            + table(["command", "wall (s)"], [[name, r["wall_s"]] for name, r in rows.items()])
            + f"\n\n`zoo classify` is {m / z:.1f}x faster than `mlflow models predict`, and takes {abs(z - floor):.2f} s "
            f"{'less' if z < floor else 'more'} than the floor.")


def floor(quick: bool, pairs: int = 3, train_images: int = bench_floor.TRAIN_IMAGES,
          classify_images: int = bench_floor.CLASSIFY_IMAGES) -> str:
    r = bench_floor.measure(quick, pairs, train_images, classify_images)
    t, c, s = r["training"], r["classification"], r["startup"]
    low, high = t["block_quartiles"]
    return ("Each job against the plainest code doing the same work, side by side in the same run: ratios above 1 "
            "mean zoo is faster than its floor. Machines differ by 2x or more, so only the ratios carry from one "
            "machine to another.\n\n"
            f"**Training**, one epoch of {t['images']:,} Fashion-MNIST images, mnist_cnn, Adadelta, batch 64: `zoo train`'s "
            "loop (its trainer, the uint8 split shuffled and gathered once, each batch normalized as it is used, its "
            "progress bar) against a plain loop over float tensors normalized before the clock starts, contiguous "
            f"slices, nothing logged. Each pair is one epoch of each, interleaved in blocks of {t['block']} batches (the "
            "floor's block runs inside zoo's per-batch callback, off zoo's clock), the side that opens alternating; "
            "oneDNN's kernels are set up before the first pair. Target: at least 0.95x.\n\n"
            + table(["", "images/s"], [["plain loop (floor)", t["floor"]], ["`zoo train`'s loop", t["zoo"]]])
            + f"\n\nratio per pair: {', '.join(f'{x:.2f}' for x in t['ratios'])}; **median {t['ratio']:.2f}x**; "
            f"per block of {t['block']} batches ({t['blocks']} blocks), quartiles {low:.2f} to {high:.2f}.\n\n"
            f"**Folder classification**, {c['images']:,} 28x28 grayscale PNG files, an exported mnist_cnn on onnxruntime: "
            "`zoo classify MODEL.onnx FOLDER --format jsonl` (list, decode, classify, softmax and top 3, one JSON line per "
            "file) against a plain script (list the folder, PIL open + convert(\"L\"), scale to [0, 1], onnxruntime's "
            "default session on batches of 128, no output): each as a whole process, start-up included, and as its path "
            "alone (\"in process\": timed inside a fresh process after its imports); rounds of the four, the order reversed every other round. Target: at least 1.0x.\n\n"
            + table(["", "images/s", "ratio to its floor", "ratio per round"],
                    [[name, rate, f"{c['ratios'][name]:.2f}x" if name in c["ratios"] else "",
                      ", ".join(f"{x:.2f}" for x in c["pair_ratios"].get(name, []))]
                     for name, rate in c["images_per_s"].items()])
            + "\n\n**CLI start-up**: one 28x28 PNG through `zoo classify MODEL.onnx ONE.png` (its whole start-up: the "
            "`zoo` group, click, numpy, Pillow, onnxruntime, the session, one decode, text output) against the floor "
            f"script on a folder of that one file and against the bare imports; whole processes, {s['rounds']} rounds of "
            "the three, the order reversed every other round; medians.\n\n"
            + table(["command", "wall (s)"], [[name, sec] for name, sec in s["seconds"].items()])
            + f"\n\nfloor script / zoo per round: **median {s['ratio']:.2f}x** (quartiles {s['ratio_quartiles'][0]:.2f} "
            f"to {s['ratio_quartiles'][1]:.2f}).")


def overhead(quick: bool) -> str:
    r = bench_study_trials.measure_overhead(trials=4 if quick else 10)
    return (f"`zoo study --dataset mnist-5k --train-size 64 --val-size 64 --test-size 64 --trials {r['trials']} "
            "--log-models none --jobs 1`: one-batch trials, one at a time, so a trial's time is nearly all fixed cost (MLflow child run, "
            "params, description, dataset inputs, metrics, checkpoint, figures, the parent's summary). Median over "
            "the trials after the first of the time between trial starts, minus the trial's `epoch_seconds`.\n\n"
            + table(["per trial", "seconds"], [["between trial starts", r["interval_s"]],
                                               ["training + validation compute", r["compute_s"]],
                                               ["**fixed cost**", r["fixed_s"]]]))


def threads(quick: bool) -> str:
    trials, size = (2, 640) if quick else (6, 6000)
    rows = bench_study_trials.measure_threads(trials=trials, train_size=size)
    return (f"The same study (`--dataset fashion-mnist --train-size {size} --val-size 1000 --test-size 1000 "
            f"--trials {trials}`) with two cores spent three ways (OMP_NUM_THREADS per process).\n\n"
            + table(RATE_HEADER, rate_rows(rows)))


def batched(quick: bool) -> str:
    k, trials, size = (2, 2, 640) if quick else (4, 8, 6000)
    rows = bench_study_trials.measure_batched(batch=k, trials=trials, train_size=size)
    if rows is None:
        return "Skipped: this checkout's `zoo study --help` has no `--batch-trials`."
    return (f"`zoo study --dataset fashion-mnist --train-size {size} --val-size 1000 --test-size 1000 --trials {trials} "
            f"--batch-trials K`, K = 1 and {k}, default `--jobs`.\n\n" + table(RATE_HEADER, rate_rows(rows)))


def projection(quick: bool, projection_trials: int = 20) -> str:
    trials, size = (2, 640) if quick else (projection_trials, None)
    rows = bench_study_trials.measure_study(trials=trials, train_size=size)
    r = rows["measured"]
    hours = PROJECTED_TRIALS * r["s_per_trial"] / 3600
    sized = f" --train-size {size}" if size else ""
    return (f"`zoo study --dataset fashion-mnist --trials {trials} --log-models none{sized}` (1 epoch, default "
            f"`--jobs`), projected to "
            f"{PROJECTED_TRIALS} trials from its trials per minute.\n\n" + table(RATE_HEADER, rate_rows(rows))
            + f"\n\n**{PROJECTED_TRIALS} trials: about {hours:.2f} h.**")


def folders(quick: bool) -> str:
    rows = bench_folders.decoding(quick)
    runs = bench_folders.training(quick, pairs=1 if quick else 2)
    ratios = [f["epoch_s"] / c["epoch_s"] for f, c in zip(runs["folder"], runs["catalog"])]
    gaps = [100 * (f["test_accuracy"] - c["test_accuracy"]) for f, c in zip(runs["folder"], runs["catalog"])]
    return ("Decoding a folder, in this process: a plain loop (PIL open + convert + stack, one process) against "
            f"zoo's first load (list, decode in {rows[0]['workers']} worker processes reading each file's header as it "
            "decodes, write the cache) and its second load (from the cache).\n\n"
            + table(["files", "plain loop (s)", "zoo first load (s)", "images/s plain", "images/s zoo",
                     "zoo / plain", "zoo cached load (s)"],
                    [[r["files"], r["plain_s"], r["zoo_first_s"], r["n"] / r["plain_s"], r["n"] / r["zoo_first_s"],
                      r["speedup"], r["zoo_cached_s"]] for r in rows])
            + "\n\n`zoo train --dataset FOLDER` (Fashion-MNIST written as PNG: train/ 60,000, test/ 10,000, class "
            "folders and files named so the folder lists them in the catalog's order; cache already made) against "
            "`--dataset fashion-mnist`, 1 epoch, seed 1, whole processes, alternated"
            + (" (--quick: 20 batches)" if quick else "") + ".\n\n"
            + table(["dataset", "round", "test accuracy", "epoch (s)", "wall (s)"],
                    [[name, i + 1, f"{r['test_accuracy']:.4f}", r["epoch_s"], r["wall_s"]]
                     for name, rs in runs.items() for i, r in enumerate(rs)])
            + f"\n\nTest accuracy folder - catalog per round: {', '.join(f'{g:+.2f}' for g in gaps)} points; "
            f"epoch time folder / catalog per round: {', '.join(f'{r:.3f}' for r in ratios)}.")


def spark(quick: bool, images: int = 2000, rounds: int = 3) -> str:
    images, rounds = (100, 1) if quick else (images, rounds)
    rows = bench_spark.compare(images=images, rounds=rounds)
    z, s = rows["zoo classify"], rows["Spark (docs/spark.md, local[2])"]
    return (f"{images:,} PNGs of real 28x28 mnist-5k digits in one folder, classified from `models:/bench@champion` (a "
            "registered mnist_cnn, SQLite store): `zoo classify models:/bench@champion FOLDER --format jsonl` (its "
            "ONNX cache filled by one earlier call) against docs/spark.md's job as the document gives it (`local[2]`, "
            "`binaryFile`, `spark_udf(..., env_manager=\"local\")`, labels written as Parquet), whole processes "
            f"(start-up, Spark's JVM and the model's load included), {rounds} rounds, the order alternating; medians. "
            "Both answer the same label for every file (checked).\n\n"
            + table(["", "wall (s)", "images/s", "wall per round (s)"],
                    [[name, r["wall_s"], r["images_per_s"], ", ".join(f"{w:.2f}" for w in r["walls"])]
                     for name, r in rows.items()])
            + f"\n\nSpark job / `zoo classify`, median wall: **{s['wall_s'] / z['wall_s']:.1f}x** (above 1: `zoo classify` is faster).")


BENCHMARKS: dict[str, Callable[..., str]] = {
    "train": train, "fixed": fixed, "classify": classify, "overhead": overhead, "threads": threads, "batched": batched,
    "floor": floor, "projection": projection, "folders": folders, "spark": spark,
}
TITLES = {"train": "Reference protocol vs `zoo train`", "fixed": "`zoo train`'s fixed cost, phase by phase",
          "classify": "`mlflow models predict` vs `zoo classify`, from a registry alias",
          "overhead": "Fixed cost per study trial", "threads": "Two cores: threads vs processes",
          "batched": "Batched vs sequential trials",
          "floor": "Speed against the floor of each job", "projection": "A 200-trial Fashion-MNIST study, projected",
          "folders": "Image folders: decoding, the cache, training",
          "spark": "Spark vs `zoo classify`: a folder of digits from a registry alias"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "mlflow", "optuna", "onnxruntime"))
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}"


def subsection_markers(name: str) -> tuple[str, str]:
    return f"<!-- python -m benchmarks: {name} -->", f"<!-- python -m benchmarks: {name} end -->"


def write_sections(bodies: dict[str, str], path: Path) -> None:
    """Put each benchmark's ``bodies[name]`` into the generated part of ``path``, replacing that
    benchmark's previous result and keeping the others' (so ``--only`` refreshes some); the rest of
    the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    previous = text[text.index(BEGIN) + len(BEGIN): text.index(END)] if BEGIN in text and END in text else ""
    kept = {}
    for name in BENCHMARKS:
        begin, end = subsection_markers(name)
        if begin in previous and end in previous:
            kept[name] = previous[previous.index(begin) + len(begin): previous.index(end)].strip()
    kept.update(bodies)
    inner = "\n\n".join(f"{subsection_markers(n)[0]}\n{kept[n]}\n{subsection_markers(n)[1]}" for n in BENCHMARKS if n in kept)
    section = f"{BEGIN}\n{INTRO}\n\n{inner}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


INTRO = ("## All benchmarks side by side: `python -m benchmarks`\n\n"
         "Generated: each part says the command that produced it, when, on which machine, and the load average "
         "before and after (above the number of cores, other jobs shared the machine and the seconds are inflated).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every benchmark runs")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--train-pairs", type=int, default=2, metavar="N",
                        help="A B pairs of the train benchmark (default: %(default)s)")
    parser.add_argument("--projection-trials", type=int, default=20, metavar="N",
                        help="trials of the full Fashion-MNIST study measured for the projection (default: %(default)s)")
    parser.add_argument("--floor-pairs", type=int, default=3, metavar="N", help="A B pairs of the floor benchmark")
    parser.add_argument("--floor-train-images", type=int, default=bench_floor.TRAIN_IMAGES, metavar="N")
    parser.add_argument("--floor-classify-images", type=int, default=bench_floor.CLASSIFY_IMAGES, metavar="N")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write (default: %(default)s)")
    args = parser.parse_args()

    command, where = shlex.join(sys.orig_argv), machine()
    for name in args.only:
        print(f"benchmark {name} ...", file=sys.stderr, flush=True)
        started, load_before, began = time.gmtime(), os.getloadavg()[0], time.monotonic()
        try:
            options = {"projection": {"projection_trials": args.projection_trials},
                       "train": {"pairs": args.train_pairs},
                       "floor": {"pairs": args.floor_pairs, "train_images": args.floor_train_images,
                                 "classify_images": args.floor_classify_images}}.get(name, {})
            body = BENCHMARKS[name](args.quick, **options)
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            lines = str(exc).strip().splitlines()
            body = f"**Failed:** `{type(exc).__name__}: {lines[-1] if lines else ''}`"
        body = (f"### {TITLES[name]}{' (--quick: toy sizes, not figures to quote)' if args.quick else ''}\n\n"
                f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', started)}, {time.monotonic() - began:.0f} s; "
                f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {where}.\n\n{body}")
        print(body + "\n", flush=True)
        write_sections({name: body}, args.results)  # at once: a later benchmark's crash loses nothing
    print(f"wrote {args.results}", file=sys.stderr)

if __name__ == "__main__":
    main()
