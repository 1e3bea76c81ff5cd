"""Issue 32's measurement: zoo's default training recipe before and after the issue against timm's own
train.py, on a small folder of the user's kind, as whole processes.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_recipes --before /tmp/zoo-before \\
        [--only zoo-before,zoo-after,timm,timm-noaug] [--models resnet18,lenet5] [--folders rgb,grey] [--epochs 6,30]

``--before PATH``: an older checkout, e.g. ``git archive 21f791f | tar -x -C /tmp/zoo-before`` (main before
issue 32), run with PYTHONPATH=PATH. Smoke run: ``--epochs 1 --limit 300`` (300 training images, 120
validation, 120 test).

**The folders** (written once into WORK/folders, WORK being ``--work`` or ``$ZOO_CACHE_DIR/bench-recipes``),
from the IDX files of the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist): per class,
500 training and 200 validation images from the 60,000-image training file and 200 test images from the
10,000-image test file, taken in the order of a ``numpy.random.default_rng(0)`` permutation of that class's
indices (the training file's first 500 go to train/, the next 200 to val/). ``rgb``: each 28x28 grey image
resized to 32x32 by PIL's bilinear resize, then multiplied by a tint drawn per image from
``numpy.random.default_rng(1).uniform(0.4, 1.0, 3)`` (in the order train/, val/, test/, class by class, image by
image), truncated to uint8 and saved as an RGB PNG. ``grey``: the same images as 28x28 greyscale PNGs, untouched.
Class folders are named ``0-T-shirt_top`` ... ``9-Ankle_boot`` so that every tool lists them in label order.

**The runs**, each one process whose whole wall time is measured (start-up, data, training, evaluation):

- ``zoo-before`` / ``zoo-after``: ``python -m zoo.cli train --model timm:resnet18|lenet5 --dataset FOLDER --mean
  auto --std auto --batch-size 64 --optimizer adamw --lr 1e-3 --epochs E --device cpu --keep-checkpoints none
  --format json`` with PYTHONPATH the older checkout or this one, no ``--recipe`` (each side's default), logging
  into one SQLite store made before the first run. Each side first decodes the folder into zoo's cache in an
  untimed one-batch run, as a user's second run finds it. Accuracy: the run's ``test_accuracy`` (the
  best-validation checkpoint's where the recipe keeps the best); images/s: training images x epochs / the sum of
  the run's ``epoch_seconds`` (which include each epoch's validation).
- ``timm`` / ``timm-noaug``: timm's ``train.py`` taken from the repository (``--timm-repo``, ``--timm-rev``)
  into WORK, run against the installed timm: ``python train.py --data-dir FOLDER --model resnet18 --num-classes 10
  --input-size 3 32 32 (1 28 28 for grey) --mean M --std S (the training split's own per-channel statistics, as
  zoo's auto computes them) -b 64 --opt adamw --lr 1e-3 --epochs E --device cpu --train-split train --val-split
  test --workers 2 --output WORK/timm`` with all else its defaults (random resized crop 0.08-1, flip, colour jitter,
  label smoothing 0.1, cosine schedule with 5 warmup epochs, weight decay 2e-5, a checkpoint per epoch (deleted
  after the run), evaluation at resnet18's crop_pct 0.95: bicubic resize to size / 0.95, center crop), and the
  same with ``--no-aug``. Accuracy: the best epoch's ``eval_top1`` of its
  summary.csv, which is measured on the **test** split, so the best epoch is picked on the test set (this
  flatters timm), and the last epoch's; images/s: training images x epochs / the sum over epochs of its logged
  update time (its last "Train:" line per epoch: updates x average seconds per update, loading included,
  evaluation excluded). timm has no lenet5: its runs are skipped for that model.

Every finished run is appended at once to WORK/results.jsonl (all its numbers, the command, the date, the load
average), and the Markdown table (``--results``, default WORK/results.md) is rewritten from that file with the
latest run of each kind, so a partial benchmark keeps what finished and ``--only`` adds the rest later.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
PER_CLASS = {"train": 500, "val": 200, "test": 200}
RUNS = ["zoo-before", "zoo-after", "timm", "timm-noaug"]
MODELS = {"resnet18": "timm:resnet18", "lenet5": "lenet5"}
TIMM_REPO = Path("/work/.mirror/huggingface+pytorch-image-models/repo")
COMMON = ["--batch-size", "64", "--optimizer", "adamw", "--lr", "1e-3", "--device", "cpu"]


def read_idx(name: str) -> np.ndarray:
    """One IDX .gz file of the Debian package as uint8: images [N, 28, 28] or labels [N]."""
    data = gzip.open(FASHION / name).read()
    if "images" in name:
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)


def pick(labels: np.ndarray, rng: np.random.Generator, counts: list[int]) -> list[np.ndarray]:
    """Per class, consecutive slices of a seeded permutation of its indices: ``counts`` images per class per part."""
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for label in range(len(CLASSES)):
        order = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for part, count in zip(parts, counts):
            part.append(order[start:start + count])
            start += count
    return [np.concatenate(p) for p in parts]


def make_folders(work: Path, limit: int | None) -> dict[str, dict]:
    """The rgb and grey folders (written once: a folder without its stats.json is written again), each with the
    training split's normalization as zoo's --mean/--std auto computes it."""
    from PIL import Image

    from zoo.normalization import Normalization

    scale = (limit // 10 / PER_CLASS["train"]) if limit else 1
    per_class = {split: max(1, int(n * scale)) for split, n in PER_CLASS.items()}
    suffix = f"-limit{limit}" if limit else ""
    roots = {kind: work / "folders" / f"fashion-{kind}{suffix}" for kind in ("rgb", "grey")}
    if all((root / "stats.json").exists() for root in roots.values()):
        return {kind: json.loads((root / "stats.json").read_text()) for kind, root in roots.items()}

    train_images, train_labels = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
    test_images, test_labels = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    train_idx, val_idx = pick(train_labels, rng, [per_class["train"], per_class["val"]])
    (test_idx,) = pick(test_labels, rng, [per_class["test"]])
    splits = {"train": (train_images[train_idx], train_labels[train_idx]),
              "val": (train_images[val_idx], train_labels[val_idx]),
              "test": (test_images[test_idx], test_labels[test_idx])}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
    tints = np.random.default_rng(1)
    written: dict[str, list[np.ndarray]] = {"rgb": [], "grey": []}
    for split, (images, labels) in splits.items():
        for i, (grey, label) in enumerate(zip(images, labels)):
            big = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.BILINEAR), np.float32)
            rgb = (big[..., None] * tints.uniform(0.4, 1.0, 3)).astype(np.uint8)
            for kind, pixels in (("rgb", rgb), ("grey", grey)):
                folder = roots[kind] / split / f"{label}-{CLASSES[label]}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{i:05d}.png")
                if split == "train":
                    written[kind].append(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1))
    import torch

    stats = {}
    for kind, root in roots.items():
        norm = Normalization.from_images(torch.from_numpy(np.stack(written[kind])))
        stats[kind] = {"path": str(root), "mean": list(norm.mean), "std": list(norm.std),
                       "shape": list(written[kind][0].shape), "images": {s: len(v[1]) for s, v in splits.items()}}
        (root / "stats.json").write_text(json.dumps(stats[kind]))  # last: marks the folder complete
    return stats


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    """Wall seconds of one whole process; its stdout goes to ``log``, its stderr to LOG.err (raises with the
    stderr's tail if it fails)."""
    started = time.perf_counter()
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=err)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                           f"{log.with_suffix('.err').read_text()[-3000:]}")
    return wall


def run_zoo(side: str, checkout: Path, model: str, folder: dict, epochs: int, work: Path, warm: set) -> dict:
    store = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(checkout), "MLFLOW_TRACKING_URI": store,
           "ZOO_CACHE_DIR": str(work / f"zoo-cache-{side}")}
    command = [sys.executable, "-m", "zoo.cli", "train", "--model", MODELS[model], "--dataset", folder["path"],
               "--mean", "auto", "--std", "auto", *COMMON, "--keep-checkpoints", "none", "--format", "json"]
    log = work / "logs" / f"{side}-{model}-{Path(folder['path']).name}-{epochs}.log"
    if (side, model, folder["path"]) not in warm:  # decode the folder into this side's cache, untimed
        timed(command + ["--epochs", "1", "--max-batches", "1"], env, work, log)
        warm.add((side, model, folder["path"]))
    command += ["--epochs", str(epochs)]
    wall = timed(command, env, work, log)
    summary = json.loads(log.read_text())  # --format json: one object on stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    train_s = sum(m.value for m in client.get_metric_history(summary["run_id"], "epoch_seconds"))
    params = client.get_run(summary["run_id"]).data.params
    return {"test_accuracy": summary["test_accuracy"], "last_accuracy": None, "best_epoch": None, "wall_s": wall,
            "train_s": train_s, "recipe": params.get("recipe", "(none: before the recipes)"), "command": command}


def timm_train_py(work: Path, repo: Path, rev: str) -> tuple[Path, str]:
    """timm's train.py at ``rev`` of the repository, written into WORK; and the commit it came from."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    path = work / "timm-train" / commit / "train.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:train.py"], capture_output=True,
                                text=True, check=True).stdout
        path.write_text(source)
    return path, commit


# The last "Train:" line of an epoch: "Train: EPOCH [ IDX/UPDATES (100%)] ... Time: 0.1s, 500/s  (AVG s, RATE/s)".
TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) .*?Time: [\d.]+s,\s*[\d.]+/s\s+\(([\d.]+)s,")


def run_timm(variant: str, train_py: Path, folder: dict, epochs: int, work: Path) -> dict:
    name = f"{variant}-{Path(folder['path']).name}-{epochs}"
    output = work / "timm"
    shutil.rmtree(output / name, ignore_errors=True)  # train.py appends to an existing summary.csv
    command = [sys.executable, str(train_py), "--data-dir", folder["path"], "--model", "resnet18",
               "--num-classes", "10", "--input-size", *map(str, folder["shape"]),
               "--mean", *map(str, folder["mean"]), "--std", *map(str, folder["std"]), "-b", "64", "--opt", "adamw",
               "--lr", "1e-3", "--epochs", str(epochs), "--device", "cpu", "--train-split", "train",
               "--val-split", "test", "--workers", "2", "--output", str(output), "--experiment", name,
               *(["--no-aug"] if variant == "timm-noaug" else [])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed timm, nothing of zoo's
    log = work / "logs" / f"{name}.log"
    wall = timed(command, env, work, log)
    rows = list(csv.DictReader(open(output / name / "summary.csv")))
    best = max(rows, key=lambda r: float(r["eval_top1"]))
    for checkpoint in (output / name).glob("*.pth.tar"):  # 45 MB each, up to 12 per run: the disk fills otherwise
        checkpoint.unlink()
    last_lines = {}
    for match in TRAIN_LINE.finditer(log.read_text() + log.with_suffix(".err").read_text()):
        epoch, index, updates, average = match.groups()
        if int(index) + 1 == int(updates):
            last_lines[int(epoch)] = int(updates) * float(average)
    return {"test_accuracy": float(best["eval_top1"]) / 100, "last_accuracy": float(rows[-1]["eval_top1"]) / 100,
            "best_epoch": int(best["epoch"]) + 1, "wall_s": wall, "train_s": sum(last_lines.values()) or None,
            "recipe": "timm defaults" + (" --no-aug" if variant == "timm-noaug" else ""), "command": command}


def rate(row: dict) -> float:
    """Training images per second of the training loop."""
    return row["train_images"] * row["epochs"] / row["train_s"]


def markdown(rows: list[dict]) -> str:
    """The latest row of each (run, model, folder, epochs, limit), in the benchmark's order."""
    latest = {(r["run"], r["model"], r["folder"], r["epochs"], r["limit"]): r for r in rows}
    order = sorted(latest, key=lambda k: (k[4] or 0, k[3], k[2] != "rgb", k[1] != "resnet18", RUNS.index(k[0])))
    lines = ["| run | model | folder | epochs | test accuracy | wall (s) | images/s (training) | images/s (whole command) | "
             "recipe | date, load before/after |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for key in order:
        r = latest[key]
        accuracy = f"{100 * r['test_accuracy']:.1f} %"
        if r["run"].startswith("timm"):
            accuracy += f" (best: epoch {r['best_epoch']}; {100 * r['last_accuracy']:.1f} % at the end)"
        train_rate = f"{rate(r):,.0f}" if r["train_s"] else "?"
        limit = f" (--limit {r['limit']})" if r["limit"] else ""
        lines.append(f"| {r['run']} | {r['model']} | {r['folder']}{limit} | {r['epochs']} | {accuracy} | "
                     f"{r['wall_s']:.0f} | {train_rate} | {r['train_images'] * r['epochs'] / r['wall_s']:,.0f} | "
                     f"{r['recipe']} | {r['date']}, {r['load'][0]:.1f}/{r['load'][1]:.1f} |")
    # The target: zoo-after ahead of timm's better variant (by 2 points at 30 epochs), at no fewer images/s.
    targets = []
    for run, model, kind, epochs, limit in order:
        timms = [latest[k] for k in order if k[0].startswith("timm") and k[2:] == (kind, epochs, limit)]
        if run == "zoo-after" and model == "resnet18" and timms:
            zoo, timm = latest[(run, model, kind, epochs, limit)], max(timms, key=lambda r: r["test_accuracy"])
            speed = f", {rate(zoo) / rate(timm):.2f}x timm's training images/s" if zoo["train_s"] and timm["train_s"] else ""
            targets.append(f"- {kind}, {epochs} epochs{f' (--limit {limit})' if limit else ''}: zoo-after - {timm['run']} "
                           f"(best epoch) = {100 * (zoo['test_accuracy'] - timm['test_accuracy']):+.1f} points{speed}, "
                           f"its whole command {timm['wall_s'] / zoo['wall_s']:.2f}x as fast")
    lines += ["", *targets] if targets else []
    return ("timm's accuracy is its best epoch on the test split (its --val-split), which flatters it; zoo's is the "
            "run's test_accuracy. Images/s (training): zoo's sum of epoch_seconds (validation included), timm's logged "
            "update times (evaluation excluded). Method: benchmarks/bench_recipes.py.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an older checkout (git archive extracted) for zoo-before")
    parser.add_argument("--only", default=",".join(RUNS), help=f"runs, comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)} (timm: resnet18 only)")
    parser.add_argument("--folders", default="rgb,grey", help="of rgb, grey")
    parser.add_argument("--epochs", default="6,30", help="comma-separated epoch counts (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="smoke runs only: this many training images (a multiple of 10)")
    parser.add_argument("--work", type=Path,
                        help="folders, logs, stores, results (default: $ZOO_CACHE_DIR/bench-recipes)")
    parser.add_argument("--results", type=Path, help="the Markdown table (default: WORK/results.md)")
    parser.add_argument("--timm-repo", type=Path, default=TIMM_REPO, help="a git directory of pytorch-image-models")
    parser.add_argument("--timm-rev", default="HEAD", help="its revision whose train.py runs (default: %(default)s)")
    args = parser.parse_args()
    runs, models, kinds = args.only.split(","), args.models.split(","), args.folders.split(",")
    for chosen, valid in ((runs, RUNS), (models, list(MODELS)), (kinds, ["rgb", "grey"])):
        if set(chosen) - set(valid):
            parser.error(f"unknown {', '.join(sorted(set(chosen) - set(valid)))}: valid are {', '.join(valid)}")
    if "zoo-before" in runs and not (args.before and (args.before / "zoo").is_dir()):
        parser.error("zoo-before needs --before PATH, a checkout holding zoo/ (or leave it out of --only)")

    from zoo.machine import cache_dir

    work = (args.work or cache_dir("bench-recipes")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    folders = make_folders(work, args.limit)
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()  # the store's creation: before any timed run
    train_py, commit = (timm_train_py(work, args.timm_repo, args.timm_rev) if any(r.startswith("timm") for r in runs)
                        else (None, None))
    journal, results = work / "results.jsonl", args.results or work / "results.md"
    warm: set = set()
    for epochs in map(int, args.epochs.split(",")):
        for kind in kinds:
            for model in models:
                for run in runs:
                    if run.startswith("timm") and model != "resnet18":
                        continue  # timm has no lenet5
                    print(f"{run} {model} {kind} {epochs} epoch(s) ...", file=sys.stderr, flush=True)
                    load, date = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    if run.startswith("zoo"):
                        checkout = args.before.resolve() if run == "zoo-before" else PROJECT
                        row = run_zoo(run, checkout, model, folders[kind], epochs, work, warm)
                    else:
                        row = run_timm(run, train_py, folders[kind], epochs, work)
                        row["timm_commit"] = commit
                    row.update(run=run, model=model, folder=kind, epochs=epochs, limit=args.limit, date=date,
                               load=[load, os.getloadavg()[0]], train_images=folders[kind]["images"]["train"])
                    print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
                    with open(journal, "a") as f:  # at once: a later failure loses nothing
                        f.write(json.dumps(row) + "\n")
                    results.write_text(markdown([json.loads(line) for line in open(journal)]))
    print(f"wrote {results} (all numbers: {journal})", file=sys.stderr)


if __name__ == "__main__":
    main()
