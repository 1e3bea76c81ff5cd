"""docs/spark.md's Spark job against `zoo classify` on the same folder of real 28x28 digit PNGs: images/s.

A mnist_cnn trained for a few batches is registered as models:/bench@champion in a temporary SQLite
store; N PNGs of real mnist-5k digits go into a temporary folder. Then, in rounds, two whole
processes classify the folder from that alias: `zoo classify models:/bench@champion FOLDER --format
jsonl` (its ONNX cache filled by one earlier call, as a user's first call does) and the Python block
of docs/spark.md (`local[2]`, `spark_udf`, labels written as Parquet), run as the document gives it
with its model, folder and output replaced. Both must answer the same label for every file.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_spark.py --images 2000 --rounds 3
    PYTHONPATH=. .venv/bin/python -m benchmarks --only spark      # the same, into RESULTS.md

Needs pyspark (`pip install -e '.[spark]'`) and Java (`make system-packages`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_classify import write_pngs
from benchmarks.bench_train import timed

DOC = Path(__file__).resolve().parent.parent / "docs" / "spark.md"
# What the document's job names, replaced by what a test or benchmark classifies.
DOC_MODEL, DOC_FOLDER, DOC_OUTPUT = "models:/mnist-cnn@champion", "/data/scans", "/data/scans-labels.parquet"


def spark_job(model_uri: str, folder: Path, output: Path) -> str:
    """The Python block of docs/spark.md that follows its tests/test_spark.py marker, classifying
    ``folder`` with ``model_uri`` into the Parquet file ``output``."""
    text = DOC.read_text()
    found = re.search(r"<!-- tests/test_spark.py runs this block.*?-->\n```python\n(.*?)```", text, re.S)
    if found is None:
        raise LookupError(f"{DOC} has no Python block after its tests/test_spark.py marker")
    code = found.group(1)
    for name in (DOC_MODEL, DOC_FOLDER, DOC_OUTPUT):
        if name not in code:
            raise LookupError(f"the Spark job of {DOC} no longer names {name!r}")
    # The output first: the folder's name is a prefix of it.
    return (code.replace(DOC_OUTPUT, str(output)).replace(DOC_FOLDER, str(folder))
            .replace(DOC_MODEL, model_uri))


def spark_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with Spark's Python workers on this interpreter, which has the model's requirements."""
    return {**env, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def spark_labels(output: Path, folder: Path) -> dict[str, str]:
    """Path in ``folder`` -> label, from the Parquet the Spark job wrote (its paths are ``file:`` URIs)."""
    import pandas as pd

    frame = pd.read_parquet(output)
    return {str(Path(path.removeprefix("file:")).relative_to(folder)): label
            for path, label in zip(frame["path"], frame["label"])}


def compare(images: int = 2000, rounds: int = 3) -> dict:
    """Median wall seconds and images/s of each route, whole processes in rounds, the order
    alternating; raises if the two disagree on any file's label."""
    bin_dir = Path(sys.executable).parent
    uri = "models:/bench@champion"
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "ZOO_CACHE_DIR": str(work / "cache")}
        folder = write_pngs(work / "png", images)
        output = work / "labels.parquet"
        subprocess.run([str(bin_dir / "zoo"), "train", "--dataset", "mnist-5k", "--epochs", "1", "--max-batches", "20",
                        "--register", "bench", "--alias", "champion"], env=env, cwd=work, check=True, capture_output=True)
        zoo = [str(bin_dir / "zoo"), "classify", uri, str(folder), "--format", "jsonl"]
        first = subprocess.run(zoo, env=env, cwd=work, check=True, capture_output=True, text=True)
        job = work / "spark_job.py"
        job.write_text(spark_job(uri, folder, output))
        commands = {"zoo classify": (zoo, env), "Spark (docs/spark.md, local[2])": ([sys.executable, str(job)], spark_env(env))}
        walls: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(rounds):
            for name in (list(commands) if round_ % 2 == 0 else list(reversed(commands))):
                command, command_env = commands[name]
                walls[name].append(timed(command, command_env, cwd=work))
        expected = {str(Path(row["path"]).relative_to(folder)): row["label"] for row in map(json.loads, first.stdout.splitlines())}
        if spark_labels(output, folder) != expected:
            raise RuntimeError("the Spark job and zoo classify disagree on some labels")
    return {name: {"wall_s": statistics.median(w), "images_per_s": images / statistics.median(w), "walls": w}
            for name, w in walls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name, r in compare(args.images, args.rounds).items():
        print(f"{name:<34}{r['wall_s']:>8.2f} s{r['images_per_s']:>9.0f} images/s  "
              f"(runs: {', '.join(f'{w:.2f}' for w in r['walls'])})")


if __name__ == "__main__":
    main()
