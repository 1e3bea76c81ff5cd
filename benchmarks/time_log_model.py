"""Seconds taken by ``training.tracking.log_model`` for an (untrained) MNIST CNN, in a fresh SQLite store.

    PYTHONPATH=. python -m benchmarks.time_log_model [--repeat N]

Prints one line per call; the first call pays one-off imports and is reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import mlflow
    import torch

    from training import tracking
    from zoo.data import load_dataset
    from zoo.models.registry import create_model, get_model_spec

    spec = get_model_spec("mnist_cnn")
    torch.manual_seed(0)
    network = create_model("mnist_cnn").eval()
    samples = load_dataset("mnist-5k").test.subset(2)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("time-log-model")
        for i in range(args.repeat):
            with mlflow.start_run():
                started = time.perf_counter()
                # The "before" figure ran on 2edb5a9, whose log_model took no sample images.
                kwargs = {"sample_images": samples.images} if "sample_images" in tracking.log_model.__code__.co_varnames else {}
                tracking.log_model(network, model_name="mnist_cnn", normalization=spec.normalization,
                                   input_shape=spec.input_shape, class_names=[str(d) for d in range(10)], **kwargs)
                print(f"log_model call {i + 1}: {time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()
