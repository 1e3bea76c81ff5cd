"""Recipes by name (`zoo train --recipe`): which one a run takes, what it logs, and what is refused."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from training.recipes import RECIPES, SETTINGS, recipe_settings
from training.renorm_demo import write_image_folder
from training.train import train
from training.train_config import TrainConfig
from zoo.cli.main import cli


def zoo_train(*args: str):
    return CliRunner().invoke(cli, ["train", "--epochs", "1", "--max-batches", "1", "--no-checkpoints", *args])


def only_run():
    client = MlflowClient()
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return run


def assert_logs_recipe(params: dict[str, str], recipe: str, optimizer: str) -> None:
    assert params["recipe"] == recipe
    for name, value in recipe_settings(recipe, optimizer).items():
        if name in SETTINGS:
            assert params[name] == str(value), name


def test_a_timm_model_on_a_folder_trains_with_the_light_recipe_and_the_zoos_own_models_keep_seed(tmp_path, mnist_5k):
    folder = write_image_folder(mnist_5k.test.subset(100), mnist_5k.classes, tmp_path / "digits")
    res = zoo_train("--dataset", str(folder), "--model", "timm:test_resnet")
    assert res.exit_code == 0, res.output
    run = only_run()
    assert_logs_recipe(run.data.params, "light", "adamw")
    assert run.data.params["schedule"] == "cosine" and run.data.params["hflip"] == "0.5"
    assert run.data.params["crop_mode"] == "squash" and run.data.params["keep_best"] == "True"
    assert "Recipe **light**" in run.data.tags["mlflow.note.content"]
    # LeNet-5 and the other registry models train their own protocol on a folder too (they underfit augmented).
    assert TrainConfig(model="lenet5", dataset=str(folder)).resolved().recipe == "seed"


def test_the_catalog_datasets_keep_the_seed_protocol_and_log_todays_params_beside_the_seed_settings():
    res = zoo_train()
    assert res.exit_code == 0, res.output
    params = only_run().data.params
    today = {"model": "mnist_cnn", "dataset": "mnist-5k", "epochs": "1", "batch_size": "64", "optimizer": "adadelta",
             "lr": "1.0", "lr_gamma": "0.7", "weight_decay": "0.0", "momentum": "0.0", "seed": "1",
             "precision": "fp32", "mean": "0.1307", "std": "0.3081", "keep_best": "False"}
    assert {k: params[k] for k in today} == today
    assert_logs_recipe(params, "seed", "adadelta")
    assert {k: params[k] for k in ("schedule", "warmup_epochs", "ema", "patience", "aa", "mixup")} == {
        "schedule": "step", "warmup_epochs": "0.0", "ema": "0.0", "patience": "0", "aa": "none", "mixup": "0.0"}


def test_recipe_strong_logs_strongs_settings_and_a_given_option_wins():
    res = zoo_train("--recipe", "strong", "--mixup", "0.4")
    assert res.exit_code == 0, res.output
    params = only_run().data.params
    assert params["recipe"] == "strong" and params["aa"] == "trivialaugment" and params["cutmix"] == "1.0"
    assert params["reprob"] == str(RECIPES["strong"]["reprob"]) and params["mixup"] == "0.4"


@pytest.mark.parametrize("args, recipe, lr", [
    ([], "finetune", RECIPES["finetune"]["lr"]),
    (["--lr", "0.003"], "finetune", 0.003),
    (["--recipe", "light"], "light", None),  # None: the model's own lr
])
def test_weights_from_a_file_imply_the_finetune_recipe_unless_told_otherwise(tmp_path, args, recipe, lr):
    timm = pytest.importorskip("timm")
    weights = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    res = zoo_train("--model", "timm:test_resnet", "--weights", str(weights), *args)
    assert res.exit_code == 0, res.output
    params = only_run().data.params
    assert params["recipe"] == recipe and params["model_weights"] == str(weights)
    expected = lr if lr is not None else TrainConfig(model="timm:test_resnet").spec().lr
    assert float(params["lr"]) == expected


@pytest.mark.parametrize("args, message", [
    (["--recipe", "fancy"], "'fancy' is not one of 'seed', 'light', 'strong', 'finetune'"),
    (["--scale", "0.5"], "--scale"),
    (["--scale", "1,0.2"], "--scale"),
    (["--aa", "autoaugment"], "'autoaugment' is not one of 'trivialaugment', 'randaugment', 'none'"),
    (["--hflip", "2"], "--hflip"),
    (["--schedule", "cosine", "--gamma", "0.5"], "--gamma is the step schedule's decay per epoch, and the schedule is cosine"),
    (["--recipe", "light", "--gamma", "0.5"], "leave --gamma out, or give --schedule step"),
    (["--warmup-epochs", "1"], "--warmup-epochs applies to the cosine and onecycle schedules"),
])
def test_bad_or_contradicting_options_exit_2_naming_what_is_valid_before_any_run(args, message):
    res = zoo_train(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    client = MlflowClient()
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_resume_refuses_another_recipe_or_setting_than_the_runs(mnist_5k):
    result = train(TrainConfig(epochs=2, max_batches=1, progress=False), dataset=mnist_5k, log_model=False)
    MlflowClient().set_terminated(result.run_id, "KILLED")
    for args, differing in ((["--recipe", "light"], "--recipe light (the run has seed)"),
                            (["--label-smoothing", "0.1"], "--label-smoothing 0.1 (the run has 0.0)")):
        res = CliRunner().invoke(cli, ["train", "--resume", result.run_id, *args])
        assert res.exit_code == 2 and differing in res.output, res.output
    assert MlflowClient().get_run(result.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_mlflow_run_passes_the_recipe_and_its_settings_to_zoo_train(tmp_path, mnist_5k):
    from test_mlproject import mlflow_run

    folder = write_image_folder(mnist_5k.test.subset(100), mnist_5k.classes, tmp_path / "digits")
    proc = mlflow_run("-e", "train", "--experiment-name", "mine", "-P", f"dataset={folder}", "-P", "epochs=1",
                      "-P", "max_batches=1", "-P", "recipe=strong", "-P", "label_smoothing=0.2", "-P", "crop_mode=center")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = only_run().data.params
    assert (params["recipe"], params["label_smoothing"], params["crop_mode"]) == ("strong", "0.2", "center")
    assert params["mixup"] == str(RECIPES["strong"]["mixup"]) and "recipe_resolved" not in params
