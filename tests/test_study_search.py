"""`zoo study --search` and `--recipe`: training settings searched beside the normalization, still one parent run
with nested trials, on a real SQLite Optuna storage and conftest's real MLflow store."""

from __future__ import annotations

import optuna
import pytest
from click.testing import CliRunner

from test_study import SMALL_ARGS, study_runs
from training.study.config import CONFIG_ATTR, StudyConfig
from zoo.cli.main import cli
from zoo.errors import UsageError


@pytest.fixture(autouse=True)
def no_inherited_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLFLOW_EXPERIMENT_ID left by an earlier test names an experiment this test's fresh store lacks."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


def study_args(tmp_path, *args: str) -> list[str]:
    return ["study", "--trials", "2", "--jobs", "1", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
            "--study-name", "search", "--log-models", "none", "--no-progress", "--max-batches", "2", *SMALL_ARGS, *args]


@pytest.mark.slow
def test_search_lr_and_weight_decay_gives_each_nested_trial_its_own_values_in_the_ranges(tmp_path):
    result = CliRunner().invoke(cli, study_args(tmp_path, "--search", "lr,weight_decay", "--format", "json"))
    assert result.exit_code == 0, result.output

    (parent,), children = study_runs()
    assert len(children) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert parent.data.params["search"] == "lr=1e-05:0.1,weight_decay=1e-06:0.1"
    assert parent.data.params["recipe"] == "seed"  # mnist_cnn on a catalog dataset: the seed protocols
    assert "lr in [1e-05, 0.1], weight_decay in [1e-06, 0.1]" in parent.data.tags["mlflow.note.content"]
    lrs = [float(r.data.params["lr"]) for r in children]
    decays = [float(r.data.params["weight_decay"]) for r in children]
    assert all(1e-5 <= v <= 0.1 for v in lrs) and all(1e-6 <= v <= 0.1 for v in decays)
    assert lrs[0] != lrs[1] and decays[0] != decays[1]

    trials = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    by_run = {t.user_attrs["mlflow_run_id"]: t.params for t in trials}
    for run in children:
        searched = by_run[run.info.run_id]
        assert searched["lr"] == pytest.approx(float(run.data.params["lr"]))
        assert searched["weight_decay"] == pytest.approx(float(run.data.params["weight_decay"]))
    assert '"lr"' in result.output and '"mean"' in result.output  # the best trial's report: searched values beside mean/std

    again = CliRunner().invoke(cli, study_args(tmp_path, "--search", "lr"))
    assert again.exit_code == 2 and "search: study has" in again.output, again.output


def test_search_of_an_unknown_setting_is_bad_usage_naming_the_valid_ones(tmp_path):
    result = CliRunner().invoke(cli, study_args(tmp_path, "--search", "lr,bogus"))
    assert result.exit_code == 2, result.output
    assert "unknown setting 'bogus'" in result.output and "lr, weight_decay, label_smoothing" in result.output
    assert study_runs() == ([], [])
    assert not (tmp_path / "optuna.db").exists()


def test_search_ranges_default_from_the_table_and_can_be_given():
    config = StudyConfig(search=("lr=1e-4:1e-2", "crop_pad", "hflip=0.2:0.8"))
    assert config.search_space() == {"lr": (1e-4, 1e-2, "log"), "crop_pad": (0, 8, "int"), "hflip": (0.2, 0.8, "linear")}
    assert config.identity()["search"] == {"lr": [1e-4, 1e-2], "crop_pad": [0, 8], "hflip": [0.2, 0.8]}
    for search, message in [(("lr=0:1",), "0 < LOW < HIGH"), (("mixup=1:0",), "LOW < HIGH"),
                            (("crop_pad=0:2.5",), "crop_pad=0:8"), (("lr", "lr"), "twice")]:
        with pytest.raises(UsageError, match=message):
            StudyConfig(search=search).validate()


def test_batch_trials_train_the_seed_recipe_only():
    with pytest.raises(UsageError, match="seed recipe only, and this study searches lr"):
        StudyConfig(batch_trials=2, search=("lr",)).validate()
    with pytest.raises(UsageError, match="seed recipe only, and this study trains the strong recipe"):
        StudyConfig(batch_trials=2, recipe="strong").validate()
    with pytest.raises(UsageError, match="unknown recipe 'bogus'"):
        StudyConfig(recipe="bogus").validate()
    StudyConfig(batch_trials=2, recipe="seed").validate()


def test_a_study_made_before_recipes_resumes_only_with_the_seed_recipe_its_trials_trained(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = CliRunner().invoke(cli, study_args(tmp_path, "--trials", "1"))
    assert first.exit_code == 0, first.output
    # What a study created before recipes stored: its identity without recipe and search.
    rdb = optuna.storages.RDBStorage(storage)
    study_id = rdb.get_study_id_from_name("search")
    old = {k: v for k, v in rdb.get_study_system_attrs(study_id)[CONFIG_ATTR].items() if k not in ("recipe", "search")}
    rdb.set_study_system_attr(study_id, CONFIG_ATTR, old)

    light = CliRunner().invoke(cli, study_args(tmp_path, "--trials", "2", "--recipe", "light"))
    assert light.exit_code == 2 and "recipe: study has seed, command has light" in light.output, light.output
    assert len(study_runs()[1]) == 1  # no trial trained with another recipe
