"""Issue 32's training loop: schedules, label smoothing, EMA, early stopping and augmentation, resumed exactly;
the seed-only trainers refuse the rest; runs from before recipes resume with the seed recipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient

from training import tracking
from training.train import config_to_resume, fit, resume, train
from training.train_config import TrainConfig
from zoo.errors import UsageError

SMALL = dict(model="mnist_cnn", epochs=3, max_batches=4, batch_size=32, seed=5, progress=False)


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(schedule="onecycle", warmup_epochs=1.0, label_smoothing=0.1),
    # Augmentation (training/augment.py) draws from the shuffling generator; EMA keeps its own weights.
    dict(schedule="cosine", warmup_epochs=0.5, ema=0.9, crop_pad=2, hflip=0.5, mixup=0.2, keep_best=True),
], ids=["onecycle", "cosine-ema-augment"])
def test_a_stopped_run_resumes_to_the_same_metrics_and_weights_as_an_uninterrupted_one(mnist_5k, settings):
    config = TrainConfig(**SMALL, optimizer="adamw", lr=3e-3, **settings)

    def stop_after_epoch_1(result) -> None:
        if result.epoch == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises, once epoch 1's checkpoint is logged

    with pytest.raises(KeyboardInterrupt), tracking.start_run(run_name="stopped") as run:
        fit(config, mnist_5k, on_epoch=stop_after_epoch_1)
    resumed = resume(run.info.run_id, dataset=mnist_5k, log_model=False)
    fresh = train(config, dataset=mnist_5k, log_model=False)

    for key in ("val_accuracy", "val_loss", "train_loss", "lr"):
        assert history(resumed.run_id, key) == history(fresh.run_id, key), key
    assert (resumed.test_loss, resumed.test_accuracy) == (fresh.test_loss, fresh.test_accuracy)
    fresh_weights = fresh.network.state_dict()
    assert all(torch.equal(v, fresh_weights[k]) for k, v in resumed.network.state_dict().items())


def test_the_lr_metric_shows_the_schedule(mnist_5k):
    step = train(TrainConfig(**SMALL, lr=1.0, gamma=0.5), dataset=mnist_5k, log_model=False)
    assert history(step.run_id, "lr") == [1.0, 0.5, 0.25]  # the seed recipe's StepLR, per epoch

    cosine = train(TrainConfig(**{**SMALL, "epochs": 4}, optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=1.0),
                   dataset=mnist_5k, log_model=False)
    lr = history(cosine.run_id, "lr")  # each epoch's first batch: warmup from lr/100, then cosine down
    assert lr[0] == pytest.approx(1e-5) and lr[1] == pytest.approx(1e-3) and lr[1] > lr[2] > lr[3] > 0


def test_ema_weights_are_the_model_validated_tested_and_returned(mnist_5k):
    config = TrainConfig(**SMALL, optimizer="adamw", lr=3e-3)
    plain = train(config, dataset=mnist_5k, log_model=False)
    averaged = train(replace(config, ema=0.9), dataset=mnist_5k, log_model=False)
    # The same training, the same batches: only the average makes the returned weights and results differ.
    assert history(plain.run_id, "train_loss") == history(averaged.run_id, "train_loss")
    assert history(plain.run_id, "val_accuracy") != history(averaged.run_id, "val_accuracy")
    assert not torch.equal(plain.network.state_dict()["conv1.weight"], averaged.network.state_dict()["conv1.weight"])
    last = tracking.load_checkpoint(averaged.run_id, "checkpoints/last.pt")  # the model it holds: the average
    assert torch.equal(last["model"]["conv1.weight"], averaged.network.state_dict()["conv1.weight"])


def test_early_stopping_ends_the_run_finished_and_says_when(mnist_5k, capsys):
    # lr 0: the validation accuracy never improves after epoch 1, so patience 1 stops after epoch 2.
    result = train(TrainConfig(**{**SMALL, "epochs": 6}, lr=0.0, patience=1, keep_best=True), dataset=mnist_5k,
                   log_model=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and len(result.history) == 2
    assert run.data.metrics["stopped_epoch"] == 2 and run.data.metrics["best_epoch"] == 1
    assert "early stopping after epoch 2: no better val_accuracy since epoch 1 (--patience 1)" in capsys.readouterr().err


@pytest.mark.parametrize("settings, expected", [
    (dict(recipe="light"), "use --recipe seed"),
    (dict(schedule="cosine"), "not --schedule cosine"),
    (dict(ema=0.99, patience=3), "not --ema 0.99, --patience 3"),
])
def test_the_scratch_trainer_refuses_all_but_the_seed_recipe_before_data_loads(settings, expected):
    with pytest.raises(UsageError, match="trains the seed recipe only") as error:
        train(TrainConfig(model="scratch_mlp", dataset="no-such-dataset", **settings))
    assert expected in str(error.value)


def test_batch_trials_refuse_all_but_the_seed_recipe_before_logging(mnist_5k):
    from training.train_batch import fit_batch

    run_id = tracking.create_run(experiment="zoo", run_name="member")
    with pytest.raises(UsageError, match="--batch-trials trains the seed recipe only, not --label-smoothing 0.1"):
        fit_batch([TrainConfig(**SMALL, label_smoothing=0.1)], mnist_5k, [run_id])
    assert MlflowClient().get_run(run_id).data.params == {}


def test_a_run_from_before_recipes_resumes_with_the_seed_recipe(mnist_5k, tmp_path):
    run_id = train(TrainConfig(**{**SMALL, "epochs": 1}), dataset=mnist_5k, log_model=False).run_id
    MlflowClient().set_terminated(run_id, "KILLED")
    old = tracking.load_checkpoint(run_id, "checkpoints/last.pt")
    new_fields = {"recipe", "schedule", "warmup_epochs", "label_smoothing", "ema", "patience", "crop_pad", "scale",
                  "hflip", "aa", "reprob", "mixup", "cutmix", "crop_mode"}
    # Its args as an older zoo wrote them, for a timm: model: today's default for those is "light".
    old["args"] = {k: v for k, v in old["args"].items() if k not in new_fields} | {"model": "timm:test_resnet"}
    tracking.log_checkpoints({"last": old}, run_id=run_id)
    config, _ = config_to_resume(run_id, {"epochs": 1})
    assert config.recipe == "seed" and config.resolved().schedule == "step"
    assert TrainConfig(model="timm:test_resnet").resolved().recipe == "light"  # what it would have been
