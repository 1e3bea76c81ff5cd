"""`zoo study`: one Optuna study = one MLflow parent run with every trial nested under it,
under --jobs 2, several processes, a killed-and-resumed study and a diverging trial.

Real data (small mnist-5k subsets, 1 epoch), a real SQLite Optuna storage (and a private
PostgreSQL server when its binaries are installed) and the real SQLite MLflow store of
conftest's autouse fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from zoo.cli.main import cli
from zoo.cli.study import study as study_command
from serving.loading import read_metadata
from training.study.config import PARENT_ATTR, RUN_ATTR, WORKER_TAG, StudyConfig
from training.study.storage import make_storage, open_study
from training.study.workers import load_study_dataset, run_study

REPO = Path(__file__).resolve().parent.parent
# Small enough for seconds per trial on a shared 2-core machine, large enough to learn something.
SMALL = {"train_size": 192, "val_size": 200, "test_size": 200}
SMALL_ARGS = ["--train-size", "192", "--val-size", "200", "--test-size", "200"]

if "study" not in cli.commands:
    cli.add_command(study_command)


@pytest.fixture(autouse=True)
def no_inherited_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; an id left by an earlier test names an
    experiment this test's fresh store does not have (and subprocesses would inherit it)."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


@contextmanager
def started(*commands: list[str], env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[list[subprocess.Popen]]:
    """CLI subprocesses that are killed if the test ends before they do."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env or subprocess_env(), cwd=cwd) for c in commands]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def small_config(tmp_path: Path, **overrides) -> StudyConfig:
    settings = dict(dataset="mnist-5k", trials=3, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s",
                    log_models="none", progress=False, heartbeat=2, **SMALL)
    return StudyConfig(**{**settings, **overrides})


def study_runs() -> tuple[list, list]:
    """(parent runs, every other run) over all experiments."""
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    parents = [r for r in runs if r.data.tags.get("zoo.kind") == "study"]
    return parents, [r for r in runs if r.data.tags.get("zoo.kind") != "study"]


def assert_all_children_of(parent_id: str, children: list) -> None:
    orphans = [r.info.run_id for r in children if r.data.tags.get("mlflow.parentRunId") != parent_id]
    assert not orphans, f"runs not nested under the study's parent: {orphans}"


def cli_process(storage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--storage", storage,
            "--study-name", "shared", "--log-models", "none", "--no-progress", "--heartbeat", "2",
            "--format", "json", *SMALL_ARGS, *args]


def subprocess_env() -> dict[str, str]:
    # (conftest points MLFLOW_TRACKING_URI at this test's store; the children inherit it)
    return {**os.environ, "PYTHONPATH": str(REPO), "ZOO_DEBUG": "1"}  # a failure shows its traceback


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter mean")  # -10 is outside the searched range on purpose
def test_two_jobs_nest_every_trial_under_one_parent_and_publish_the_best_model(tmp_path):
    # Two trials first that surely differ (measured 0.345 and 0.105 against a collapse threshold of
    # 0.145), so that the collapsed count is neither 0 nor all; then 4 sampled in the published range.
    config = small_config(tmp_path, trials=6, jobs=2, log_models="best", register="best-norm",
                          enqueue=[("0.1307", "0.3081"), ("-10", "0.1")])
    result = run_study(config)

    parents, children = study_runs()
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    assert_all_children_of(result.parent_run_id, children)
    assert sorted(int(r.data.params["trial_number"]) for r in children) == list(range(6))
    for run in children:
        assert {"mean", "std", "model", "epochs"} <= run.data.params.keys()
    # The published normalization learns (chance is 0.1): the accuracy a user compares trials by is real.
    published = next(r.data.metrics for r in children if r.data.params["mean"] == "0.1307")
    assert published["val_accuracy"] >= 0.2 and published["test_accuracy"] >= 0.2, published

    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["seed"] == "0"
    summary = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/study/summary.json")
    assert summary["trials_complete"] == 6 and summary["best"]["trial"] in range(6)
    # The best trial the summary names is a child run with the highest tracked val_accuracy.
    named = next(r for r in children if int(r.data.params["trial_number"]) == summary["best"]["trial"])
    best = max(r.data.metrics["val_accuracy"] for r in children)
    assert summary["best"]["val_accuracy"] == named.data.metrics["val_accuracy"] == best, summary["best"]
    table = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/study/trials.csv").strip().splitlines()
    assert len(table) == 1 + 6 and "val_accuracy" in table[0] and "test_accuracy" in table[0]
    plots = {a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "study")}
    assert {"study/contour.png", "study/param_importances.png"} <= plots
    # The best trial (by validation accuracy) carries the MLflow model, registered under --register.
    best_run = summary["best"]["run_id"]
    assert max(children, key=lambda r: r.data.metrics["val_accuracy"]).data.metrics["val_accuracy"] == summary["best"]["val_accuracy"]
    assert MlflowClient().get_model_version("best-norm", "1").run_id == best_run
    # Only the best trial keeps its checkpoints.
    assert [r.info.run_id for r in children if MlflowClient().list_artifacts(r.info.run_id, "checkpoints")] == [best_run]
    assert_summary_matches_the_trials(parent, children, summary, config)


def val_accuracy_by_normalization(parent_run_id: str) -> dict[tuple[str, str], float]:
    """(mean, std) -> val_accuracy of each trial of one study, from its child runs."""
    _, runs = study_runs()
    return {(r.data.params["mean"], r.data.params["std"]): r.data.metrics["val_accuracy"]
            for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id}


@pytest.mark.slow
def test_a_trials_result_does_not_depend_on_jobs(tmp_path):
    """Every trial starts from seed 1 (the same initial weights, the same dropout draws) whatever trains beside it:
    the same normalizations give the same val accuracies under --jobs 1 and --jobs 2, and on a re-run."""
    pairs = [("0.1307", "0.3081"), ("0", "1"), ("0.5", "0.5"), ("1", "0.2")]
    results = {}
    # One torch thread per trial whatever --jobs is: otherwise --jobs 1 and --jobs 2 sum floats in another
    # order (cores / jobs threads per trial), which moves the weights' last bits (docs/study.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, jobs in (("two", 2), ("two-again", 2), ("one", 1)):
            result = run_study(small_config(tmp_path, study_name=name, trials=len(pairs), jobs=jobs, enqueue=pairs,
                                            train_size=640))
            results[name] = val_accuracy_by_normalization(result.parent_run_id)
    finally:
        torch.set_num_threads(threads)
    assert len(results["two"]) == len(pairs)
    assert results["two-again"] == results["two"]
    assert results["one"] == results["two"]


def assert_summary_matches_the_trials(parent, children: list, summary: dict, config: StudyConfig) -> None:
    """The parent's headline figures are those of its child runs, recomputed here from MLflow alone,
    and every trial's normalization was drawn from the searched ranges."""
    val = [r.data.metrics["val_accuracy"] for r in children]
    test = [r.data.metrics["test_accuracy"] for r in children]
    assert len(val) == len(test) == summary["trials_complete"] > 1
    for split, values in (("val", val), ("test", test)):
        expected = {"median": statistics.median(values), "sd": statistics.stdev(values),
                    "min": min(values), "max": max(values)}
        assert summary[f"{split}_accuracy"] == pytest.approx(expected), split
        for stat, value in expected.items():  # the parent's metrics, what the runs table shows
            assert parent.data.metrics[f"{stat}_{split}_accuracy"] == pytest.approx(value), (stat, split)
    # Collapsed: no better than always answering the validation split's most frequent class.
    labels = load_study_dataset(config).val.labels.tolist()
    threshold = max(labels.count(c) for c in set(labels)) / len(labels) + config.collapse_margin
    collapsed = sum(v <= threshold for v in val)
    assert 0 < collapsed < len(val), f"the extreme range should collapse some trials, not all: {val}"
    assert summary["trials_collapsed"] == parent.data.metrics["trials_collapsed"] == collapsed
    description = parent.data.tags["mlflow.note.content"]
    assert (f"{len(val)} trials complete ({collapsed} collapsed to predicting one class" in description
            and f"median **{100 * statistics.median(val):.2f} %**, sd {100 * statistics.stdev(val):.2f} pt, "
                f"range {100 * min(val):.2f}-{100 * max(val):.2f} %" in description), description
    for run in children:
        if int(run.data.params["trial_number"]) < len(config.enqueue):
            continue  # enqueued as given, not sampled
        assert config.mean_range[0] <= float(run.data.params["mean"]) <= config.mean_range[1]
        assert config.std_range[0] <= float(run.data.params["std"]) <= config.std_range[1]
    # The registered model normalizes as the best trial did.
    best = max(children, key=lambda r: r.data.metrics["val_accuracy"])
    registered = read_metadata("models:/best-norm/1")["normalization"]
    assert registered == {"mean": [pytest.approx(float(best.data.params["mean"]))],
                          "std": [pytest.approx(float(best.data.params["std"]))]}


@pytest.mark.slow
def test_log_models_all_registers_the_best_with_its_onnx_graph(tmp_path, mnist_5k):
    from PIL import Image
    from test_classify import classify_in_subprocess

    from training.study.config import MODEL_URI_TAG
    from zoo.model_format.mlflow_model import ships_onnx

    result = run_study(small_config(tmp_path, trials=2, log_models="all", register="every"))
    _, children = study_runs()
    uris = {r.info.run_id: r.data.tags[MODEL_URI_TAG] for r in children}  # every trial logged its model
    assert {r.data.tags[WORKER_TAG] for r in children} == {f"{socket.gethostname()}:{os.getpid()}"}
    assert len(set(uris.values())) == 2
    # Logged during the trials without the ONNX graph (an export per trial would cost seconds); the
    # one registered gets it, so `zoo classify models:/every@...` downloads rather than exports it.
    best_uri = result.best_model_uri
    version = MlflowClient().get_model_version("every", "1")
    assert uris[version.run_id] == best_uri and ships_onnx(best_uri)
    assert [uri for uri in uris.values() if uri != best_uri and ships_onnx(uri)] == []
    png = tmp_path / "digit.png"
    Image.fromarray(mnist_5k.test.images[0, 0].numpy()).save(png)
    rows, loaded = classify_in_subprocess("models:/every/1", png)
    assert loaded == ["mlflow"] and len(rows) == 1  # the shipped graph, downloaded: no torch, no export


@pytest.mark.slow
def test_two_processes_share_one_parent_run(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = cli_process(storage, "--trials", "4")
    with started(command, command) as procs:
        outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]

    reports = [json.loads(out) for out, _ in outputs]
    parents, children = study_runs()
    assert len(parents) == 1
    assert {r["parent_run_id"] for r in reports} == {parents[0].info.run_id}
    assert_all_children_of(parents[0].info.run_id, children)
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4  # exactly --trials, not one per process more
    # Every Optuna trial is exactly one child run, and every child run is a trial.
    assert sorted(t.user_attrs[RUN_ATTR] for t in trials) == sorted(r.info.run_id for r in children)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def process_group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def mid_trial(storage: str) -> bool:
    """At least one trial finished and the last one is training in its child run (params logged)."""
    try:
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    except KeyError:  # the study does not exist yet
        return False
    if not trials:
        return False
    last = trials[-1]
    if not (any(t.state == TrialState.COMPLETE for t in trials) and last.state == TrialState.RUNNING
            and RUN_ATTR in last.user_attrs):
        return False
    # Training has begun once fit has logged the run's params (the run exists a moment earlier).
    return "mean" in MlflowClient().get_run(last.user_attrs[RUN_ATTR]).data.params


@pytest.mark.slow
def test_a_killed_study_resumes_under_the_same_parent(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Trials long enough (47 batches x 2 epochs, seconds) that the kill lands while one trains:
    # with 3 batches a trial could finish between the poll and the kill, leaving nothing to kill.
    # One trial at a time (not the default one per core), so that the kill leaves exactly one to retry.
    command = cli_process(storage, "--trials", "4", "--train-size", "3000", "--epochs", "2", "--jobs", "1")
    with started(command) as (first,):
        wait_until(lambda: mid_trial(storage), 600, "a trial in progress")
        first.send_signal(signal.SIGKILL)
        first.wait()
    frozen = optuna.load_study(study_name="shared", storage=storage)
    dead = [t.number for t in frozen.get_trials() if t.state == TrialState.RUNNING]
    assert len(dead) == 1, f"the kill should leave exactly one trial RUNNING, found {dead}"
    parent_id = frozen.user_attrs[PARENT_ATTR]

    rerun = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    assert json.loads(rerun.stdout)["parent_run_id"] == parent_id
    parents, children = study_runs()
    assert [p.info.run_id for p in parents] == [parent_id]
    assert MlflowClient().get_run(parent_id).info.status == "FINISHED"
    assert_all_children_of(parent_id, children)
    finished = [r for r in children if r.info.status == "FINISHED"]
    numbers = [r.data.params["trial_number"] for r in finished]
    assert len(finished) == 4 and len(set(numbers)) == 4
    # The trial that died is not left RUNNING nor lost: its run ended KILLED and its params were retried.
    killed = [r for r in children if r.info.status == "KILLED"]
    assert len(killed) == 1 and "process died" in killed[0].data.tags["zoo.failure"]
    retry = [r for r in finished if r.data.tags.get("zoo.retry_of_run_id") == killed[0].info.run_id]
    assert len(retry) == 1 and retry[0].data.params["mean"] == killed[0].data.params["mean"]


@pytest.mark.slow
def test_sigterm_stops_a_study_cleanly_and_the_same_command_resumes_it(tmp_path):
    """kill, a scheduler's time limit or docker stop: the trial in flight must not be left RUNNING."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = cli_process(storage, "--trials", "3", "--train-size", "3000", "--epochs", "2", "--jobs", "1")
    with started(command, env={**subprocess_env(), "ZOO_DEBUG": ""}) as (proc,):
        wait_until(lambda: mid_trial(storage), 600, "a trial in progress")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    states = [t.state for t in optuna.load_study(study_name="shared", storage=storage).get_trials()]
    assert states[-1] == TrialState.FAIL and TrialState.RUNNING not in states, states
    done = states.count(TrialState.COMPLETE)
    last_line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith(f"Error: study shared stopped with {done} of 3 trials finished; "
                                "re-run the same command to resume it"), last_line
    (parent,), children = study_runs()
    assert parent.info.status == "KILLED"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * done + ["KILLED"]

    rerun = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["parent_run_id"] == parent.info.run_id
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"
    _, children = study_runs()
    assert sum(r.info.status == "FINISHED" for r in children) == 3


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_process_of_jobs_2(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the processes --jobs 2 started end with the
    first one, no trial is left RUNNING, and the same command resumes the study."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = cli_process(storage, "--trials", "3", "--train-size", "3000", "--epochs", "2", "--jobs", "2")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), "ZOO_DEBUG": ""}, start_new_session=True)
    try:
        wait_until(lambda: mid_trial(storage), 600, "a trial in progress")
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-2000:]
    # No worker process outlives it (multiprocessing's resource tracker leaves a moment after the first process).
    wait_until(lambda: not process_group_alive(proc.pid), 60, "the study's processes to end")
    states = [t.state for t in optuna.load_study(study_name="shared", storage=storage).get_trials()]
    assert TrialState.RUNNING not in states and TrialState.FAIL in states, states
    last_line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith("Error: study shared stopped with"), last_line
    (parent,), children = study_runs()
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in children}

    rerun = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter std")  # 1e-45 is outside the searched range on purpose
def test_a_diverging_trial_fails_and_the_study_goes_on(tmp_path):
    # std = 1e-45 is a float32 denormal: inputs become infinite and the loss NaN.
    result = run_study(small_config(tmp_path, trials=3, enqueue=[("0", "1e-45")]))

    _, children = study_runs()
    by_status = {s: [r for r in children if r.info.status == s] for s in ("FINISHED", "FAILED")}
    assert len(by_status["FAILED"]) == 1 and len(by_status["FINISHED"]) == 2
    failed = by_status["FAILED"][0]
    assert failed.data.params["std"] == "1e-45"
    assert "TrainingDiverged" in failed.data.tags["zoo.failure"]
    assert result.summary["trials_diverged"] == 1 and result.summary["trials_complete"] == 2


def test_bad_ranges_are_usage_errors():
    result = CliRunner().invoke(cli, ["study", "--std-range", "0", "1"])
    assert result.exit_code == 2 and "--std-range needs 0 < LOW < HIGH" in result.output
    result = CliRunner().invoke(cli, ["study", "--mean-range", "2", "1"])
    assert result.exit_code == 2 and "--mean-range" in result.output


def test_resuming_with_other_settings_names_the_difference(tmp_path):
    config = small_config(tmp_path)
    open_study(config, make_storage(config.storage, config.heartbeat))
    with pytest.raises(ValueError, match="epochs: study has 1, command has 2"):
        run_study(small_config(tmp_path, epochs=2))


def test_optunas_own_clients_see_a_named_objective_and_a_narrow_studies_table(tmp_path):
    config = small_config(tmp_path)
    study, created = open_study(config, make_storage(config.storage, config.heartbeat))
    assert created and study.metric_names == ["val_accuracy"]  # optuna-dashboard's label, not "Objective 0"
    table = subprocess.run([str(Path(sys.executable).with_name("optuna")), "studies", "--storage", config.storage],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert " s " in table and max(map(len, table.splitlines())) <= 160, table  # the whole configuration made it ~300


@pytest.mark.slow
def test_a_postgresql_storage_nests_trials_under_one_parent(tmp_path, postgres):
    postgres_url = f"{postgres}/optuna"
    result = run_study(small_config(tmp_path, trials=2, jobs=2, storage=postgres_url))

    parents, children = study_runs()
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert_all_children_of(result.parent_run_id, children)
    stored = optuna.load_study(study_name="s", storage=postgres_url)
    assert stored.user_attrs[PARENT_ATTR] == result.parent_run_id
    assert sum(t.state == TrialState.COMPLETE for t in stored.get_trials()) == 2


@pytest.mark.parametrize("unreachable", ["tracking server", "storage"])
def test_an_unreachable_tracking_server_or_storage_fails_before_the_data_are_decoded(unreachable, tmp_path, monkeypatch,
                                                                                     mnist_5k):
    from servers import free_port
    from test_folder_dataset import write_folder

    folder = tmp_path / "digits"
    write_folder(mnist_5k.train.images[:100], mnist_5k.train.labels[:100], mnist_5k.classes, folder)
    closed = f"127.0.0.1:{free_port()}"
    if unreachable == "tracking server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{closed}")
        mlflow.set_tracking_uri(f"http://{closed}")  # the next test's autouse fixture sets its own
        config = small_config(tmp_path, dataset=str(folder))
    else:
        config = small_config(tmp_path, dataset=str(folder), storage=f"postgresql://zoo@{closed}/optuna")
    with pytest.raises(ConnectionError, match=f"cannot reach the (MLflow|Optuna) {unreachable}"):
        run_study(config)
    assert not (tmp_path / "cache").exists(), "the folder was decoded (and cached) before the check"


def test_collapse_is_measured_against_predicting_the_most_frequent_class(mnist_5k):
    from training.study.config import one_class_accuracy

    assert one_class_accuracy(mnist_5k.val) == pytest.approx(0.1)  # 50 of each digit
    assert one_class_accuracy(mnist_5k.val.subset(7)) >= 2 / 7  # 7 images of 10 classes: some class repeats


def test_study_and_train_show_the_same_range_for_max_batches():
    def max_batches_help(command: str) -> str:
        lines = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--max-batches"))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-"))
        return " ".join(" ".join(lines[start:end]).split())

    assert max_batches_help("study") == max_batches_help("train")
    assert "[x>=1]" in max_batches_help("study")


def test_a_study_splits_off_its_val_fraction_and_a_rerun_must_repeat_it(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["study", "--trials", "1", "--jobs", "1", "--study-name", "vf", "--storage", storage, "--log-models", "none",
              "--no-progress", "--max-batches", "2", "--train-size", "192"]
    result = CliRunner().invoke(cli, [*common, "--val-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    (parent,), (trial,) = study_runs()
    assert parent.data.params["val_fraction"] == "0.3"
    assert trial.data.params["val_size"] == "1500"  # 30 % of mnist-5k's 5,000 digits (the recipe's 10 %: 500)
    again = CliRunner().invoke(cli, [*common, "--val-fraction", "0.2"])
    assert again.exit_code == 2 and "val_fraction: study has 0.3, command has 0.2" in again.output


def test_a_bad_val_fraction_is_one_line_of_bad_usage_as_in_train(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for command in (["train", "--dry-run"], ["study", "--storage", storage, "--no-progress"]):
        result = CliRunner().invoke(cli, [*command, "--val-fraction", "0.9"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            "Error: the val fraction (0.9) and test fraction (0.2) leave no images to train on: together they must "
            "be below 1"], result.output


def test_a_sqlite_study_records_an_absolute_storage_that_opens_from_another_folder(tmp_path, monkeypatch):
    """`optuna-dashboard sqlite:///optuna.db` started elsewhere would silently open a new, empty database:
    the parent run, its description and the command's output name the study's database by its absolute path."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    monkeypatch.delenv("ZOO_OPTUNA_STORAGE", raising=False)
    monkeypatch.chdir(here)
    result = CliRunner().invoke(cli, ["study", "--trials", "1", "--jobs", "1", "--study-name", "here", "--log-models",
                                      "none", "--no-progress", "--max-batches", "2", *SMALL_ARGS])  # default storage
    assert result.exit_code == 0, result.output
    recorded = f"sqlite:///{here / 'optuna.db'}"
    (parent,), _ = study_runs()
    assert parent.data.params["optuna_storage"] == recorded and parent.data.tags["optuna.storage"] == recorded
    assert f"optuna-dashboard {recorded}" in parent.data.tags["mlflow.note.content"]
    assert f"optuna-dashboard {recorded}" in result.output
    monkeypatch.chdir(elsewhere)
    trials = optuna.load_study(study_name="here", storage=parent.data.params["optuna_storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    assert not (elsewhere / "optuna.db").exists()
