"""Measure the zoo's MLP, scratch MLP, LeNet-5 and AlexNet on the offline datasets (docs/models.md).

Every run goes through training.train.train, so each row is an ordinary MLflow run in
the current tracking store. Usage (from the repository root):

    OMP_NUM_THREADS=1 python -m benchmarks.measure_models mlp scratch lenet alexnet

One thread each, because the 2-core machine was shared: with contention, two OpenMP
threads made the scratch MLP's small matrix products 20x slower.
"""

from __future__ import annotations

import sys
import time

from training.train import load_training_data, train
from training.train_config import TrainConfig
from zoo.data import Dataset

MLP_VARIANTS = {
    "plain": {},
    "L2 (weight decay 1e-5)": {"weight_decay": 1e-5},
    "dropout 0.2": {"model_config": {"dropout": 0.2}},
    "BatchNorm": {"model_config": {"batchnorm": True}},
}


def runs(group: str) -> list[tuple[str, TrainConfig]]:
    if group == "mlp":
        return [
            (f"mlp, {label}", TrainConfig(model="mlp", dataset=dataset, epochs=5, **settings))
            for dataset in ("mnist-5k", "fashion-mnist")
            for label, settings in MLP_VARIANTS.items()
        ]
    if group == "scratch":
        return [
            ("scratch_mlp (Xavier, momentum 0.4)", TrainConfig(model="scratch_mlp", dataset="mnist-5k", epochs=30)),
            ("scratch_mlp, N(0, 1) init, no momentum", TrainConfig(model="scratch_mlp", dataset="mnist-5k", epochs=30,
                                                                   momentum=0.0, model_config={"init": "normal"})),
            ("scratch_mlp (Xavier, momentum 0.4)", TrainConfig(model="scratch_mlp", dataset="fashion-mnist", epochs=10)),
        ]
    if group == "lenet":
        return [("lenet5 (best epoch by val)", TrainConfig(model="lenet5", dataset="fashion-mnist", epochs=10))]
    if group == "alexnet":
        # 5 "epochs" of 20 steps of 32 images: 100 steps, enough to see the loss fall on a CPU.
        return [("alexnet, 100 steps of 32", TrainConfig(model="alexnet", dataset="fashion-mnist", epochs=5,
                                                         batch_size=32, max_batches=20))]
    raise ValueError(f"unknown group {group!r}; valid: mlp, scratch, lenet, alexnet")


def small_eval(dataset: Dataset, n: int) -> Dataset:
    """The same training split with ``n`` validation and test images, for models too slow to evaluate on 16,000."""
    return Dataset(dataset.name, dataset.classes, dataset.train, dataset.val.subset(n), dataset.test.subset(n))


def main(groups: list[str]) -> None:
    print("| run | dataset | epochs | val_accuracy (last) | test_accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for group in groups:
        for label, config in runs(group):
            config.progress, config.checkpoints = False, False
            dataset = load_training_data(config)
            if group == "alexnet":
                dataset = small_eval(dataset, 500)
            started = time.perf_counter()
            result = train(config, dataset=dataset, experiment="zoo-models", log_model=False)
            losses = ", ".join(f"{h.train_loss:.3f}" for h in result.history)
            print(f"| {label} | {config.dataset} | {config.epochs} | {result.val_accuracy:.4f} | "
                  f"{result.test_accuracy:.4f} | {time.perf_counter() - started:.0f} |  <!-- run {result.run_id}; "
                  f"train_loss per epoch: {losses} -->", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["mlp", "scratch", "lenet", "alexnet"])
