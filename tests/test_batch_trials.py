"""`zoo study --batch-trials K`: K trials trained in one batched computation are still K trials.

Each gets what it would have got trained alone (same accuracies, losses within float rounding,
its own child run, metrics and checkpoint); a trial that diverges leaves the others as they were.
Real mnist-5k subsets, a real SQLite Optuna storage and conftest's real MLflow store.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from zoo.cli.main import cli
from zoo.cli.study import study as study_command
from tests.test_folder_dataset import rgb_folder, write_folder  # noqa: F401 (rgb_folder: a fixture, RGB digits)
from tests.test_study import SMALL, assert_all_children_of, small_config, study_runs
from training import tracking
from training.study.workers import run_study
from training.train import fit
from training.train_config import TrainConfig
from training.train_batch import fit_batch
from zoo.data import Dataset

if "study" not in cli.commands:
    cli.add_command(study_command)

# Normalizations far apart (the usual one, none, a shifted one): their trainings differ clearly.
NORMALIZATIONS = [("0.1307", "0.3081"), ("0", "1"), ("0.8", "0.2")]


def small_dataset(mnist_5k) -> Dataset:
    return Dataset(mnist_5k.name, mnist_5k.classes, mnist_5k.train.subset(256), mnist_5k.val.subset(200),
                   mnist_5k.test.subset(200), mnist_5k.source)


def configs(normalizations, **overrides) -> list[TrainConfig]:
    base = TrainConfig(model="mnist_cnn", dataset="mnist-5k", epochs=2, progress=False, **overrides)
    return [replace(base, mean=mean, std=std) for mean, std in normalizations]


def alone(config: TrainConfig, dataset: Dataset):
    with tracking.start_run(run_name="alone"):
        return fit(config, dataset)


def together(cfgs: list[TrainConfig], dataset: Dataset):
    parent = tracking.create_run(experiment="zoo", run_name="together")
    run_ids = [tracking.create_run(experiment="zoo", run_name=f"member {i}", parent_run_id=parent) for i in range(len(cfgs))]
    return fit_batch(cfgs, dataset, run_ids)


@pytest.mark.slow
def test_trials_trained_together_get_what_each_gets_alone(mnist_5k):
    dataset = small_dataset(mnist_5k)
    cfgs = configs(NORMALIZATIONS)
    batched = together(cfgs, dataset)
    assert len(batched) == len(cfgs) == len(NORMALIZATIONS) > 1  # zip below would pass on nothing
    for config, member in zip(cfgs, batched):
        lone = alone(config, dataset)
        assert member.stopped is None
        assert member.val_accuracy == pytest.approx(lone.val_accuracy, abs=1 / 200)  # at most one image flips
        assert member.test_accuracy == pytest.approx(lone.test_accuracy, abs=1 / 200)
        for ours, theirs in zip(member.history, lone.history):  # both epochs, the lr schedule included
            assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
            assert ours.val_loss == pytest.approx(theirs.val_loss, rel=1e-4)
        run = MlflowClient().get_run(member.run_id)
        assert run.data.params["mean"] == config.mean and run.data.metrics["test_accuracy"] == member.test_accuracy
        artifacts = {a.path for a in MlflowClient().list_artifacts(member.run_id, "checkpoints")}
        assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
        state = tracking.load_checkpoint(member.run_id, "checkpoints/last.pt")
        assert state["normalization"]["mean"] == [float(config.mean)] and state["epoch"] == 2
        # The member's own optimizer state: Adadelta's running averages for its weights alone.
        first = state["optimizer"]["state"][0]["square_avg"]
        assert first.shape == lone.network.conv1.weight.shape
    accuracies = [m.val_accuracy for m in batched]
    assert len(set(accuracies)) > 1, "the members must have trained under their own normalizations"


@pytest.mark.slow
def test_a_diverging_member_does_not_sink_the_others(mnist_5k):
    dataset = small_dataset(mnist_5k)
    healthy = together(configs(NORMALIZATIONS[:2]), dataset)
    # std 1e-45 (a float32 denormal) makes the inputs infinite: that member's loss is NaN from its first batch.
    with_diverging = together(configs([NORMALIZATIONS[0], ("0", "1e-45"), NORMALIZATIONS[1]]), dataset)

    diverged = with_diverging[1]
    assert "training diverged at epoch 1" in str(diverged.stopped) and len(diverged.history) == 1
    assert diverged.test_accuracy is None
    for ours, unaffected in zip([with_diverging[0], with_diverging[2]], healthy):
        assert ours.stopped is None
        # The second epoch ran without the diverged member (dropped from the stack): still the same.
        assert [r.val_loss for r in ours.history] == pytest.approx([r.val_loss for r in unaffected.history], rel=1e-5)
        assert ours.test_accuracy == pytest.approx(unaffected.test_accuracy, abs=1 / 200)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter std")  # 1e-45 is outside the searched range on purpose
def test_zoo_study_batch_trials_runs_each_trial_as_its_own_child_run(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, [
        "study", "--dataset", "mnist-5k", "--trials", "4", "--batch-trials", "3", "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}", "--study-name", "b", "--log-models", "best", "--no-progress",
        "--enqueue", "0", "1e-45", "--train-size", "192", "--val-size", "200", "--test-size", "200",
    ])
    assert result.exit_code == 0, result.output

    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 4
    assert_all_children_of(parents[0].info.run_id, children)
    by_trial = {int(r.data.params["trial_number"]): r for r in children}
    assert by_trial[0].info.status == "FAILED" and "TrainingDiverged" in by_trial[0].data.tags["zoo.failure"]
    assert all(by_trial[n].info.status == "FINISHED" for n in (1, 2, 3))
    # Trials 0-2 trained together, trial 3 (the last slot) alone in a batch of its own.
    assert {by_trial[n].data.tags["zoo.trained_with_trials"] for n in (0, 1, 2)} == {"0,1,2"}
    assert by_trial[3].data.tags["zoo.trained_with_trials"] == "3"
    points = {(r.data.params["mean"], r.data.params["std"]) for r in children}
    assert len(points) == 4, "trials claimed together must sample different normalizations"
    assert "3 complete, 1 diverged" in result.output
    best = max((by_trial[n] for n in (1, 2, 3)), key=lambda r: r.data.metrics["val_accuracy"])
    assert best.data.tags.get("zoo.model_uri", "").startswith("models:/")


@pytest.mark.slow
def test_batched_trials_match_the_same_study_run_one_trial_at_a_time(tmp_path):
    batched = run_study(small_config(tmp_path, trials=3, batch_trials=3, study_name="together"))
    lone = run_study(small_config(tmp_path, trials=3, study_name="alone"))
    pairs = list(zip(sorted(batched_trials(batched)), sorted(batched_trials(lone))))
    assert len(batched_trials(batched)) == len(batched_trials(lone)) == len(pairs) == 3  # every trial compared
    for a, b in pairs:
        assert a[0] == b[0]  # the same normalizations (seeded sampler)...
        assert a[1] == pytest.approx(b[1], abs=1 / SMALL["val_size"])  # ...give the same accuracy


@pytest.mark.slow
@pytest.mark.parametrize("model, images", [("mnist_cnn", "rgb"), ("timm:test_vit", "grey")])
def test_batched_trials_checkpoint_one_mean_and_std_per_channel_of_the_images(model, images, tmp_path, mnist_5k,
                                                                               rgb_folder):  # noqa: F811
    # The models' registered defaults are grey (mnist_cnn) and RGB (timm's): the checkpoint must follow the images.
    folder = rgb_folder
    if images == "grey":
        folder = tmp_path / "grey-digits"
        write_folder(mnist_5k.train.images[:300], mnist_5k.train.labels[:300], mnist_5k.classes, folder)
    result = run_study(small_config(tmp_path, model=model, dataset=str(folder), image_size="32", trials=2,
                                    batch_trials=2, enqueue=[("0.5", "0.25"), ("auto", "auto")]))
    kept = [(run_id, tracking.load_checkpoint(run_id, "checkpoints/last.pt")["normalization"])
            for run_id in batched_run_ids(result) if MlflowClient().list_artifacts(run_id, "checkpoints")]
    assert len(kept) == 1  # the best trial's
    run_id, normalization = kept[0]
    params = MlflowClient().get_run(run_id).data.params
    channels = 3 if images == "rgb" else 1
    assert len(normalization["mean"]) == len(normalization["std"]) == channels
    assert ",".join(f"{v:g}" for v in normalization["mean"]) == params["mean"]
    assert ",".join(f"{v:g}" for v in normalization["std"]) == params["std"]


def batched_run_ids(result) -> list[str]:
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                      filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    return [r.info.run_id for r in runs]


def batched_trials(result) -> list[tuple[tuple[float, float], float]]:
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                      filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    return [((float(r.data.params["mean"]), float(r.data.params["std"])), r.data.metrics["val_accuracy"]) for r in runs]


@pytest.mark.parametrize("model, why", [("resnet18", "without buffers"), ("scratch_mlp", "'scratch' trainer")])
def test_models_that_cannot_be_batched_are_refused_before_anything_starts(model, why, tmp_path):
    result = CliRunner().invoke(cli, ["study", "--model", model, "--batch-trials", "2",
                                      "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert result.exit_code == 2 and why in result.output and "without --batch-trials" in result.output
    assert not (tmp_path / "optuna.db").exists()
    assert study_runs() == ([], [])
