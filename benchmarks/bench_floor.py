"""zoo's jobs against the floor of each, measured in the same run: ratios hold where absolute speeds do not.

The machines these run on differ by 2x or more from day to day, and this one is shared, so each job is
set against the plainest code that does the same work, side by side:

- training: `zoo train`'s loop (its trainer, its shuffled uint8 batches normalized per batch, its
  progress bar) against a plain in-memory loop of the same network, optimizer and batch size over
  float tensors already normalized, contiguous slices, nothing logged; the two epochs interleaved
  in blocks of 16 batches, so both meet the same load. Target: at least 0.95x.
- folder classification: `zoo classify MODEL.onnx FOLDER --format jsonl` against a plain script
  (list the folder, decode each PNG with PIL, onnxruntime on batches of 128), each as a whole
  process (start-up included) and as its path alone (timed in a fresh process after its imports).
  Target: at least 1.0x.
- CLI start-up: `zoo classify MODEL.onnx ONE.png` against the same script on one file, and against the
  bare imports of numpy, Pillow and onnxruntime, as whole processes.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

BATCH = 64  # mnist_cnn's recipe
BLOCK = 16  # batches per turn when the two training loops alternate (about half a second)
CLASSIFY_BATCH = 128  # zoo classify's default --batch-size


def _training_data(images: int):
    from zoo.data import load_dataset

    dataset = load_dataset("fashion-mnist")
    return dataset.train.subset(images), dataset


def plain_steps(split, normalization, seed: int = 1) -> Iterator[int]:
    """The floor, one batch per ``next()``: the same network, optimizer and batch size over float tensors
    normalized before the first batch (untimed), contiguous slices, nothing logged; yields the batch's size."""
    import torch
    import torch.nn.functional as F

    from zoo.models.registry import create_model

    torch.manual_seed(seed)
    order = torch.randperm(len(split))
    images = normalization.apply(split.images[order].float() / 255).contiguous()
    labels = split.labels[order].contiguous()
    model = create_model("mnist_cnn")
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()

    def steps() -> Iterator[int]:  # set up above, now: its seeding never lands in the middle of zoo's epoch
        for start in range(0, len(labels), BATCH):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images[start:start + BATCH]), labels[start:start + BATCH])
            loss.backward()
            optimizer.step()
            yield len(labels[start:start + BATCH])

    return steps()


def interleaved_epochs(split, normalization, block: int = BLOCK, plain_first: bool = True, seed: int = 1) -> dict:
    """One epoch of each side, interleaved in blocks of ``block`` batches: seconds of each and their ratio per block.

    The zoo side is `zoo train`'s own epoch (its trainer, the uint8 data shuffled, gathered and normalized per
    batch, its progress bar); the plain side's next block runs inside zoo's per-batch callback, off zoo's clock.
    Side by side within a second, both meet the same load from the machine's other jobs: pairs of whole
    epochs one after the other (as before) swung from 0.88 to 1.80 on this shared machine.
    """
    import io

    import torch

    from training.train import trainer_for
    from training.train_config import TrainConfig
    from zoo.models.registry import create_model
    from zoo.progress import tqdm

    plain = plain_steps(split, normalization, seed)
    torch.manual_seed(seed)
    config = TrainConfig(model="mnist_cnn", dataset="fashion-mnist", epochs=1)
    trainer = trainer_for(config, create_model("mnist_cnn"))
    generator = torch.Generator().manual_seed(seed)
    clock = {"zoo": [], "plain": []}  # seconds per block
    state = {"batches": 0, "mark": 0.0}

    def plain_block() -> None:
        started = time.perf_counter()
        if sum(1 for _ in zip(range(block), plain)):
            clock["plain"].append(time.perf_counter() - started)

    if plain_first:
        plain_block()
    with tqdm(total=len(split), unit="img", file=io.StringIO(), leave=False) as bar:  # zoo train draws one

        def on_batch(images: int) -> None:
            bar.update(images)
            state["batches"] += 1
            if state["batches"] % block == 0:
                clock["zoo"].append(time.perf_counter() - state["mark"])
                plain_block()
                state["mark"] = time.perf_counter()

        state["mark"] = time.perf_counter()
        trainer.train_epoch(split, normalization, config.resolved().batch_size, generator, on_batch=on_batch)
        clock["zoo"].append(time.perf_counter() - state["mark"])
    plain_block()  # the floor's last batches, when zoo's epoch ended first
    for _ in plain:
        raise AssertionError("both sides train on the same number of batches")
    zoo_s, plain_s = sum(clock["zoo"]), sum(clock["plain"])
    blocks = [p / z for p, z in zip(clock["plain"], clock["zoo"]) if z > 0]  # the i-th block of each
    return {"zoo_s": zoo_s, "plain_s": plain_s, "ratio": plain_s / zoo_s, "block_ratios": blocks}


def training(images: int, pairs: int) -> dict:
    from zoo.normalization import Normalization

    split, _ = _training_data(images)
    normalization = Normalization((0.2860,), (0.3530,))
    for _ in zip(range(4), plain_steps(split, normalization)):  # oneDNN sets up its kernels on first use: off the clock
        pass
    # Pairs alternate which side opens, so neither always pays the switch from the other first.
    runs = [interleaved_epochs(split, normalization, plain_first=i % 2 == 0) for i in range(pairs)]
    ratios = [r["ratio"] for r in runs]
    blocks = [b for r in runs for b in r["block_ratios"]]
    quartiles = statistics.quantiles(blocks, n=4) if len(blocks) > 1 else blocks * 3
    return {"images": len(split), "floor": statistics.median(len(split) / r["plain_s"] for r in runs),
            "zoo": statistics.median(len(split) / r["zoo_s"] for r in runs), "ratios": ratios,
            "ratio": statistics.median(ratios), "block": BLOCK, "block_quartiles": [quartiles[0], quartiles[2]],
            "blocks": len(blocks)}


def _write_folder(folder: Path, images: int) -> list[Path]:
    """Fashion-MNIST test images as 28x28 grayscale PNG files."""
    from PIL import Image

    from zoo.data import load_dataset

    files = []
    for i, image in enumerate(load_dataset("fashion-mnist").test.subset(images).images):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(files[-1])
    return files


def _onnx_model(path: Path) -> Path:
    """An (untrained) mnist_cnn exported as `zoo export` does: the speed does not depend on the weights."""
    from zoo.model_format.onnx_graph import export_onnx
    from zoo.model_format.model import LoadedModel
    from zoo.normalization import NormalizedModel
    from zoo.models.registry import create_model, get_model_spec

    spec = get_model_spec("mnist_cnn")
    module = NormalizedModel(create_model("mnist_cnn").eval(), spec.normalization).eval()
    export_onnx(LoadedModel("bench", module, spec.normalization, [str(i) for i in range(10)], (1, 28, 28), "mnist_cnn"), path)
    return path


# The floor of folder classification, as a user would write it: list the folder, decode each file with
# PIL (grayscale: the graph's one channel; the files are already 28x28, so nothing is resized, as in zoo),
# scale to [0, 1] and run onnxruntime (its default session) on batches of 128. No labels, no output.
PLAIN_CLASSIFY = """
import os, sys
import numpy as np, onnxruntime as ort
from PIL import Image

def plain_classify(model, folder, batch):
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(files), batch):
        pixels = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.uint8)[None] for f in files[start:start + batch]])
        session.run(None, {name: pixels.astype(np.float32) / np.float32(255)})
    return len(files)

if __name__ == "__main__":
    plain_classify(sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


def _project_env() -> dict[str, str]:
    """This environment, with the project importable (`python -m zoo.cli`, `from serving...`) in a child process."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _timed_in_a_fresh_process(setup: str, call: str, count: int) -> float:
    """images/s of ``call`` (which returns how many it classified), timed inside a fresh interpreter after
    ``setup`` (its imports): each side's path without start-up, in a process like the command's (zoo forks
    its workers before onnxruntime loads; this one has torch loaded, where it would have to spawn them)."""
    code = f"import time\n{setup}\nstarted = time.perf_counter()\nn = {call}\nprint(n, time.perf_counter() - started)"
    n, seconds = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_project_env(),
                                check=True).stdout.split()
    assert int(n) == count
    return count / float(seconds)


def plain_classify(model: Path, folder: Path, count: int) -> float:
    """The floor's path (listing, session, decoding, inference) without start-up: images/s of :data:`PLAIN_CLASSIFY`."""
    return _timed_in_a_fresh_process(f"import numpy, onnxruntime, PIL.Image\ncode = {{}}\nexec({PLAIN_CLASSIFY!r}, code)",
                                     f"code['plain_classify']({str(model)!r}, {str(folder)!r}, {CLASSIFY_BATCH})", count)


def plain_classify_command(model: Path, folder: Path, count: int) -> float:
    """The floor as a whole process, as the command is measured: `python -c PLAIN_CLASSIFY`, start-up included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN_CLASSIFY, str(model), str(folder), str(CLASSIFY_BATCH)], check=True)
    return count / (time.perf_counter() - started)


def zoo_classify_inside(model: Path, folder: Path, count: int) -> float:
    """zoo classify's path without start-up: open the model, walk, decode and classify the folder (its workers
    included, as the command runs them), nothing printed."""
    return _timed_in_a_fresh_process("from serving.classify import classify_paths",
                                     f"sum(map(len, classify_paths({str(model)!r}, [{str(folder)!r}])))", count)


def zoo_classify_command(model: Path, folder: Path, count: int) -> float:
    """The whole `zoo classify MODEL.onnx FOLDER --format jsonl` process, start-up included."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "zoo.cli", "classify", str(model), str(folder), "--format", "jsonl"],
                          capture_output=True, text=True, env=_project_env(), check=True)
    seconds = time.perf_counter() - started
    assert len(done.stdout.splitlines()) == count
    return count / seconds


def classification(images: int, pairs: int) -> dict:
    """Rounds of the four: each side against its own floor (in process, and as a whole process), in order
    floor, zoo in one round and zoo, floor in the next."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        count = len(_write_folder(folder, images))
        model = _onnx_model(Path(tmp) / "model.onnx")
        sides = {"floor (in process)": plain_classify, "zoo classify (in process)": zoo_classify_inside,
                 "floor (command)": plain_classify_command, "zoo classify (command)": zoo_classify_command}
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(pairs):
            for name in sides if round_ % 2 == 0 else reversed(sides):
                rates[name].append(sides[name](model, folder, count))
    pair_ratios = {zoo: [z / f for z, f in zip(rates[zoo], rates[floor])]
                   for zoo, floor in (("zoo classify (in process)", "floor (in process)"),
                                      ("zoo classify (command)", "floor (command)"))}
    return {"images": count, "images_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "pair_ratios": pair_ratios, "ratios": {name: statistics.median(r) for name, r in pair_ratios.items()}}


def startup(rounds: int) -> dict:
    """One PNG through `zoo classify MODEL.onnx PNG` against the floor script on a folder of that one file
    (import numpy, Pillow and onnxruntime, a session, one decode, one run) and against the imports alone;
    whole processes, in rounds of the three, the order reversed every other round. Medians in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "one"
        folder.mkdir()
        png = _write_folder(folder, 1)[0]
        model = _onnx_model(Path(tmp) / "model.onnx")
        commands = {"zoo classify MODEL.onnx ONE.png": [sys.executable, "-m", "zoo.cli", "classify", str(model), str(png)],
                    "floor script, one file": [sys.executable, "-c", PLAIN_CLASSIFY, str(model), str(folder), "1"],
                    "import numpy, PIL.Image, onnxruntime": [sys.executable, "-c", "import numpy, PIL.Image, onnxruntime"]}
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(rounds):
            for name in commands if round_ % 2 == 0 else reversed(commands):
                started = time.perf_counter()
                subprocess.run(commands[name], env=_project_env(), check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - started)
    zoo, floor = seconds["zoo classify MODEL.onnx ONE.png"], seconds["floor script, one file"]
    ratios = [f / z for f, z in zip(floor, zoo)]
    return {"seconds": {name: statistics.median(s) for name, s in seconds.items()}, "rounds": rounds,
            "ratio": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4)[::2]}


TRAIN_IMAGES, CLASSIFY_IMAGES = 12_000, 10_000


def measure(quick: bool = False, pairs: int = 3, train_images: int = TRAIN_IMAGES,
            classify_images: int = CLASSIFY_IMAGES) -> dict:
    return {"training": training(1024 if quick else train_images, 1 if quick else pairs),
            "classification": classification(512 if quick else classify_images, 1 if quick else pairs),
            "startup": startup(4 if quick else 15)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--classify-images", type=int, default=CLASSIFY_IMAGES)
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.pairs, args.train_images, args.classify_images), indent=2))


if __name__ == "__main__":
    main()
