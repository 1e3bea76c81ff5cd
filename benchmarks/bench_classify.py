"""`zoo classify` on a folder of real 28x28 digit PNGs: images/s and peak memory, as a user runs it.

Makes a real ONNX model (a freshly initialised mnist_cnn exported through zoo.model_format.onnx_graph: the
speed does not depend on the weights) and N PNGs of real mnist-5k digits in a temporary folder,
then times the whole `zoo classify MODEL.onnx FOLDER --format jsonl` process (start-up included)
and samples the resident memory of its process tree (the command plus its decode workers).

    python benchmarks/bench_classify.py --images 10000
    python benchmarks/bench_classify.py --images 10000 --baseline-src /tmp/zoo-main   # old code, side by side
    python benchmarks/bench_classify.py --images 10000 --keep /tmp/bench   # keep the model and PNGs

--baseline-src is a checkout of another revision (e.g. `git archive main | tar -x -C /tmp/zoo-main`);
it runs with the same interpreter and the same model and files.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_model(path: Path) -> Path:
    """mnist_cnn, freshly initialised, exported with its normalization and metadata like `zoo export`."""
    import torch

    from zoo.model_format.onnx_graph import export_onnx
    from zoo.model_format.model import LoadedModel
    from zoo.normalization import NormalizedModel
    from zoo.models.registry import create_model, get_model_spec

    torch.manual_seed(0)
    spec = get_model_spec("mnist_cnn")
    module = NormalizedModel(create_model("mnist_cnn").eval(), spec.normalization).eval()  # takes pixels in [0, 1]
    loaded = LoadedModel("benchmark:mnist_cnn", module, spec.normalization, [str(i) for i in range(10)],
                         spec.input_shape, "mnist_cnn")
    export_onnx(loaded, path)
    return path


def write_pngs(folder: Path, n: int) -> Path:
    """n PNG files of real MNIST digits (mnist-5k, cycled)."""
    from PIL import Image

    from zoo.data import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    images = load_dataset("mnist-5k").train.images.numpy()
    for i in range(n):
        Image.fromarray(images[i % len(images)][0], mode="L").save(folder / f"{i:06d}.png")
    return folder


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_classify(src: Path, model: Path, folder: Path, extra: list[str]) -> dict:
    """One `zoo classify` process from the code in ``src``: wall seconds, rows, peak memory."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    fmt = ["--format", "jsonl"] if "--format" not in extra else []
    cmd = [sys.executable, "-m", "zoo.cli", "classify", str(model), str(folder), *fmt, *extra]
    peak = 0
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=src)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    rows = out.count(b'"path"')
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers, once reaped
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "rows": rows, "images_per_s": rows / wall, "peak_tree_mb": peak / 2**20}


def predict_vs_classify(pairs: int = 3) -> dict[str, dict[str, float]]:
    """`mlflow models predict` against `zoo classify` on one 28x28 PNG, from one registry alias, and the
    floor of any command that reads that alias: `import mlflow` and one `get_model_version_by_alias`.

    A freshly trained (2 batches) mnist_cnn is registered as models:/bench@champion in a temporary
    SQLite store; one `zoo classify` call first fills its export cache (as a user's first call
    does), then the three commands run in rounds, whole processes. Returns median wall seconds
    per command, and checks that both classifiers answer the same label.
    """
    import json
    import statistics

    from benchmarks.bench_train import timed

    bin_dir = Path(sys.executable).parent
    uri = "models:/bench@champion"
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "ZOO_CACHE_DIR": str(work / "cache")}
        png = next(write_pngs(work / "png", 1).iterdir())
        request = work / "request.json"
        request.write_text(json.dumps({"dataframe_split": {"columns": ["image"],
                                                           "data": [[base64.b64encode(png.read_bytes()).decode()]]}}))
        zoo = [str(bin_dir / "zoo"), "classify", uri, str(png), "--format", "json"]
        mlflow = [str(bin_dir / "mlflow"), "models", "predict", "-m", uri, "-i", str(request), "-t", "json",
                  "-o", str(work / "predicted.json"), "--env-manager", "local"]
        subprocess.run([str(bin_dir / "zoo"), "train", "--dataset", "mnist-5k", "--epochs", "1", "--dry-run",
                        "--register", "bench", "--alias", "champion"], env=env, cwd=work, check=True, capture_output=True)
        first = subprocess.run(zoo, env=env, cwd=work, check=True, capture_output=True, text=True)
        lookup = [sys.executable, "-c", "import mlflow; mlflow.MlflowClient().get_model_version_by_alias('bench', 'champion')"]
        commands = {"zoo classify": zoo, "mlflow models predict": mlflow, "import mlflow + one alias lookup": lookup}
        walls: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(pairs):
            for name, command in commands.items():
                walls[name].append(timed(command, env, cwd=work))
        predicted = json.loads((work / "predicted.json").read_text())["predictions"][0]["label"]
        if predicted != json.loads(first.stdout)[0]["label"]:
            raise RuntimeError(f"mlflow models predict answered {predicted!r}, zoo classify {first.stdout!r}")
    return {name: {"wall_s": statistics.median(w)} for name, w in walls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per variant; the median is reported.")
    parser.add_argument("--baseline-src", type=Path, default=None, help="A checkout of the old code to compare.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the model and PNGs here and keep them.")
    parser.add_argument("--variants", default="default", help="Comma-separated: default, workers0, batch512, ...")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-classify-"))
    model = work / "mnist_cnn.onnx"
    folder = work / f"pngs-{args.images}"
    if not model.is_file():
        make_model(model)
    if not folder.is_dir() or len(os.listdir(folder)) != args.images:
        write_pngs(folder, args.images)

    variants = {"default": [], "workers0": ["--workers", "0"], "workers1": ["--workers", "1"], "workers2": ["--workers", "2"],
                "batch512": ["--batch-size", "512"], "batch32": ["--batch-size", "32"]}
    runs: list[tuple[str, Path, list[str]]] = [(v, REPO, variants[v]) for v in args.variants.split(",")]
    if args.baseline_src:
        runs.insert(0, ("baseline", args.baseline_src.resolve(), ["--format", "json"]))
    print(f"{args.images} PNGs of 28x28 in {folder}; {os.cpu_count()} CPUs; median of {args.repeats}")
    # CPU seconds depend far less than wall seconds on what else runs: images per CPU-second
    # times the cores is what a quiet machine could reach at most.
    print(f"{'variant':<10}{'wall s':>9}{'images/s':>10}{'cpu s':>8}{'images/cpu-s':>14}{'peak MB (tree)':>16}")
    for name, src, extra in runs:
        results = sorted((run_classify(src, model, folder, extra) for _ in range(args.repeats)), key=lambda r: r["wall_s"])
        r = results[len(results) // 2]
        assert r["rows"] == args.images, f"{name}: {r['rows']} rows for {args.images} images"
        print(f"{name:<10}{r['wall_s']:>9.2f}{r['images_per_s']:>10.0f}{r['cpu_s']:>8.2f}{r['rows'] / r['cpu_s']:>14.0f}"
              f"{r['peak_tree_mb']:>16.0f}", flush=True)


if __name__ == "__main__":
    main()
