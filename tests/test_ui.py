"""What a person browsing the runs meets: names, descriptions, tags, datasets, figures, `zoo ui`,
and the MLflow UI itself in a real (headless Debian) Chromium driven by Playwright."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from servers import free_port, mlflow_server, postgres_bin, postgres_server
from zoo.cli.main import cli
from training import tracking
from training.study.config import StudyConfig
from training.study.workers import run_study

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def png_artifact(run_id: str, path: str) -> Image.Image:
    """A run's artifact opened as an image; fails unless it is a valid PNG."""
    data = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_bytes()
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.verify()
    return Image.open(io.BytesIO(data))


def test_a_trained_run_has_a_readable_name_tags_description_datasets_and_figures(registered_model):
    client = MlflowClient()
    run = client.get_run(registered_model["result"].run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "zoo" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "mnist_cnn default · mnist-5k 2ep s1"
    tags = run.data.tags
    assert (tags["zoo.kind"], tags["zoo.model"], tags["zoo.dataset"]) == ("train", "mnist_cnn", "mnist-5k")
    assert (tags["zoo.normalization"], tags["zoo.normalization_is_default"]) == ("0.1307/0.3081", "true")
    note = tags["mlflow.note.content"]
    assert "Trained **mnist_cnn** on **mnist-5k** for 2 epoch(s)" in note and "3,500 training" in note
    assert f"test accuracy **{100 * run.data.metrics['test_accuracy']:.2f} %**" in note

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-5k-train", "mnist-5k-validation", "mnist-5k-test"}
    assert [t.value for t in inputs["mnist-5k-validation"].tags if t.key == "mlflow.data.context"] == ["validation"]
    assert "mnist_5k.csv.gz" in inputs["mnist-5k-train"].dataset.source  # where the digits came from
    assert '"features_shape": [3500, 1, 28, 28]' in inputs["mnist-5k-train"].dataset.profile

    confusion = png_artifact(run.info.run_id, "confusion_matrix.png")
    misclassified = png_artifact(run.info.run_id, "misclassified.png")
    for image in (confusion, misclassified):
        assert 300 <= min(image.size) and max(image.size) <= 1200  # readable, and small
        assert len(set(image.convert("L").getdata())) > 10  # drawn, not blank
    # What the confusion matrix shows: 10 x 10 cells, the diagonal (about 95 of 100 digits per class for
    # this model) dark, every other cell (a few digits at most) light.
    shades = cell_shades(confusion, 10)
    off_diagonal = shades[~np.eye(10, dtype=bool)]
    assert shades.diagonal().max() < 128 < off_diagonal.min(), shades.astype(int)


def cell_shades(image: Image.Image, n: int) -> np.ndarray:
    """The grey level of each cell of an n x n imshow drawn with the "Blues" colormap: the plot's extent is
    where the pixels are blue (the ticks and text are black or white), each cell's the median of its middle."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    rows, columns = np.nonzero(rgb[..., 2] - rgb[..., 0] > 40)
    top, left = rows.min(), columns.min()
    height, width = (rows.max() + 1 - top) / n, (columns.max() + 1 - left) / n
    grey = np.asarray(image.convert("L")).astype(float)

    def middle(r: int, c: int) -> float:  # the cell without its borders
        y, x = top + r * height, left + c * width
        return float(np.median(grey[int(y + 0.15 * height):int(y + 0.85 * height), int(x + 0.15 * width):int(x + 0.85 * width)]))

    return np.array([[middle(r, c) for c in range(n)] for r in range(n)])


def test_two_runs_on_the_same_data_share_its_digest_and_get_told_apart_by_name(mnist_5k):
    from training.train import train
    from training.train_config import TrainConfig

    config = TrainConfig(epochs=1, max_batches=2, checkpoints=False, progress=False)
    runs = [MlflowClient().get_run(train(config, dataset=mnist_5k, log_model=False).run_id) for _ in range(2)]
    # The model, normalization and the number first: the UI's runs table cuts names at about 22 characters.
    # A run cut to --max-batches says so by what it is (--dry-run is --max-batches 2).
    assert [r.info.run_name for r in runs] == ["mnist_cnn default · mnist-5k 1ep s1 2 batches/epoch",
                                               "mnist_cnn default #2 · mnist-5k 1ep s1 2 batches/epoch"]
    assert runs[0].data.tags["zoo.max_batches"] == "2" and "zoo.dry_run" not in runs[0].data.tags
    digests = [{i.dataset.name: i.dataset.digest for i in r.inputs.dataset_inputs} for r in runs]
    assert digests[0] == digests[1] and len(set(digests[0].values())) == 3  # one digest per split


def test_a_training_run_is_named_by_its_model_and_a_normalization_word_and_tagged_with_every_digit():
    """The model and a word for the normalization lead the name (the dataset has its own column in the runs table);
    given values show as given, per-channel ones at 2 significant digits; the tag keeps every digit."""
    from training.train_config import TrainConfig, readable_run_name, training_tags
    from zoo.normalization import Normalization

    config = TrainConfig(model="resnet18", dataset="photos", epochs=14)
    imagenet = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert readable_run_name(config, imagenet) == "resnet18 default · photos 14ep s1"
    assert readable_run_name(config, Normalization.identity(3)) == "resnet18 none · photos 14ep s1"
    assert readable_run_name(config, Normalization((0.5,) * 3, (0.25,) * 3)) == "resnet18 0.5/0.25 · photos 14ep s1"
    assert readable_run_name(config, Normalization((0.52, 0.5, 0.48), (0.25,) * 3)).startswith("resnet18 .52,.5,.48/0.25 ·")
    assert training_tags(config, imagenet, "train")["zoo.normalization"] == "0.485,0.456,0.406/0.229,0.224,0.225"

    measured = Normalization((0.13942411541938782,), (0.3122393488883972,))  # as --mean auto --std auto gives
    auto = replace(config, model="mnist_cnn", dataset="/data/digits", mean="auto", std="auto", max_batches=5)
    assert readable_run_name(auto, measured) == "mnist_cnn auto · digits 14ep s1 5 batches/epoch"
    tags = training_tags(auto, measured, "train")
    assert tags["zoo.normalization"] == "0.13942411541938782/0.3122393488883972"  # float() of it gives the value used
    assert (tags["zoo.normalization_is_default"], tags["zoo.max_batches"]) == ("false", "5")
    given = replace(auto, mean="0.1394", std="0.3122")
    assert readable_run_name(given, Normalization((0.1394,), (0.3122,))) == (
        "mnist_cnn 0.1394/0.3122 · digits 14ep s1 5 batches/epoch")  # given values read as given, not as auto


def test_a_name_taken_in_the_experiment_gets_a_suffix():
    names = []
    for _ in range(3):
        with tracking.start_run(run_name="mnist_cnn mnist-5k norm 0/1 1ep seed1") as run:
            names.append(run.info.run_name)
    with tracking.start_run(experiment="other", run_name="mnist_cnn mnist-5k norm 0/1 1ep seed1") as run:
        names.append(run.info.run_name)
    for _ in range(2):
        with tracking.start_run(run_name=f"0/1 1ep s1{tracking.NAME_DETAIL}mnist_cnn") as run:
            names.append(run.info.run_name)
    assert names == ["mnist_cnn mnist-5k norm 0/1 1ep seed1", "mnist_cnn mnist-5k norm 0/1 1ep seed1 #2",
                     "mnist_cnn mnist-5k norm 0/1 1ep seed1 #3", "mnist_cnn mnist-5k norm 0/1 1ep seed1",
                     "0/1 1ep s1 · mnist_cnn", "0/1 1ep s1 #2 · mnist_cnn"]
    assert MlflowClient().get_experiment_by_name("other").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_created_by_mlflow_run_in_default_points_at_ours_in_zoo(monkeypatch):
    """As `mlflow run` without an experiment does: its run in Default, MLFLOW_RUN_ID/_EXPERIMENT_ID exported."""
    project = MlflowClient().create_run("0", tags={"mlflow.project.entryPoint": "train"})
    monkeypatch.setenv("MLFLOW_RUN_ID", project.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    with tracking.start_run(run_name="ours") as run:
        pass
    ours = MlflowClient().get_run(run.info.run_id)
    assert MlflowClient().get_experiment(ours.info.experiment_id).name == "zoo"
    assert ours.data.tags["zoo.project_run_id"] == project.info.run_id
    assert ours.data.tags["mlflow.project.entryPoint"] == "train"
    pointer = MlflowClient().get_run(project.info.run_id).data.tags
    assert pointer["zoo.run_id"] == run.info.run_id and "experiment **zoo**" in pointer["mlflow.note.content"]
    # The link opens the run in the model-training view, not MLflow 3.17's default GenAI one.
    link = f"(#/experiments/{ours.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning)"
    assert link in pointer["mlflow.note.content"]


@pytest.mark.slow
def test_against_a_tracking_server_zoo_prints_run_links_that_open_the_runs_view_not_mlflows(tmp_path):
    """MLflow prints "View run NAME at: URL" on stdout when a run on a tracking server ends, an address MLflow
    3.17's UI opens in its GenAI view: zoo prints the same lines on stderr with ?workflowType=machine_learning,
    and MLflow's none; a user who turned MLflow's off (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT) gets none."""
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as url:
        env = {key: value for key, value in os.environ.items()
               if key not in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "ZOO_RUN_LINKS")}
        env.update(MLFLOW_TRACKING_URI=url, PYTHONPATH=os.pathsep.join(sys.path))
        train = [sys.executable, "-m", "zoo.cli", "train", "--dataset", "mnist-5k", "--epochs", "1", "--dry-run"]
        done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        [run] = MlflowClient(url).search_runs([MlflowClient(url).get_experiment_by_name("zoo").experiment_id])
        experiment = f"{url}/#/experiments/{run.info.experiment_id}"
        assert (f"View run {run.info.run_name} at: {experiment}/runs/{run.info.run_id}?workflowType=machine_learning\n"
                f"View experiment at: {experiment}?workflowType=machine_learning\n") in done.stderr
        assert "View run" not in done.stdout, done.stdout

        # A study's parent and trials are ended by id (MLflow's client), in other code: their links too.
        study = subprocess.run([sys.executable, "-m", "zoo.cli", "study", "--dataset", "mnist-5k", "--train-size", "64",
                                "--val-size", "64", "--test-size", "64", "--epochs", "1", "--trials", "1",
                                "--log-models", "none", "--study-name", "links"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert study.returncode == 0, study.stderr
        runs = {r.info.run_name: r for r in MlflowClient(url).search_runs([run.info.experiment_id])}
        for name in ("study links", next(n for n in runs if n.startswith("trial 000"))):
            link = f"{experiment}/runs/{runs[name].info.run_id}?workflowType=machine_learning"
            assert study.stderr.count(f"View run {name} at: {link}\n") == 1, study.stderr
        assert "View run" not in study.stdout

        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        quiet = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert quiet.returncode == 0, quiet.stderr
        assert "View run" not in quiet.stdout + quiet.stderr


@pytest.mark.slow
def test_a_study_parent_shows_its_search_and_its_trials_say_what_they_trained(tmp_path):
    result = run_study(StudyConfig(
        dataset="mnist-5k", trials=3, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="look",
        log_models="none", progress=False, heartbeat=2, train_size=192, val_size=200, test_size=200,
    ))
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name == "study look"
    note = parent.data.tags["mlflow.note.content"]
    assert "Optuna study **look**: trains **mnist_cnn** on **mnist-5k**" in note and "3 trials complete" in note
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "study")}
    assert {"study/contour.png", "study/param_importances.png", "study/accuracy_vs_normalization.png",
            "study/interactive.html"} <= artifacts
    png_artifact(result.parent_run_id, "study/accuracy_vs_normalization.png")
    page = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/study/interactive.html")
    assert page.count("Plotly.newPlot") >= 3
    assert '<script src="https://cdn.plot.ly' not in page and len(page) > 1_000_000  # plotly.js inside: works offline

    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(trials) == 3
    study = optuna.load_study(study_name="look", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    suggested = {t.number: t.params for t in study.trials}
    for trial in trials:
        tags = trial.data.tags
        mean, std = (float(value) for value in tags["zoo.normalization"].split("/"))
        assert {"mean": mean, "std": std} == suggested[int(tags["optuna.trial_number"])]  # every digit Optuna chose
        assert tags["zoo.kind"] == "trial" and trial.info.run_name == (
            f"trial {int(tags['optuna.trial_number']):03d} {mean:.4g}/{std:.4g}")
        assert tags["mlflow.note.content"].startswith(f"Trial {tags['optuna.trial_number']} of the Optuna study **look**")
        assert {i.dataset.name for i in trial.inputs.dataset_inputs} == {"mnist-5k-train", "mnist-5k-validation", "mnist-5k-test"}
        png_artifact(trial.info.run_id, "confusion_matrix.png")


# --- zoo ui -----------------------------------------------------------------------------------


def test_zoo_ui_refuses_a_busy_port_and_a_tracking_server(tracking_store):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(cli, ["ui", "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 1 and "is in use" in result.output and "--port" in result.output
    mlflow.set_tracking_uri("http://someone:s3cret@127.0.0.1:1")  # as MLFLOW_TRACKING_URI=http://... does
    try:
        result = CliRunner().invoke(cli, ["ui", "--port", str(free_port())])
    finally:
        mlflow.set_tracking_uri(tracking_store)
    assert result.exit_code == 2 and "open that address in a browser" in result.output
    assert "user name and password" in result.output  # what a locked server asks there
    assert "http://someone:***@127.0.0.1:1" in result.output and "s3cret" not in result.output


@pytest.fixture
def zoo_ui(registered_model):
    """`zoo ui` over the store with the trained run, as a user starts it; yields the URL it prints."""
    yield from _serve_ui({**os.environ, "PYTHONPATH": str(REPO)})


def _serve_ui(env: dict[str, str]):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "ui", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        url = next(line.split()[1] for line in proc.stdout if line.startswith("open "))
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the MLflow UI did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert not _answers(port)  # the server stopped with it


@pytest.mark.slow
@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries not found (apt-get install postgresql)")
def test_zoo_ui_over_a_password_protected_store_keeps_the_password_off_every_command_line(tmp_path):
    """A postgresql:// store's URL carries its password: `zoo ui` serves the store without putting the
    URL on a command line, which every user of the machine can read with ps."""
    password = "pw-" + os.urandom(6).hex()
    with postgres_server("mlflow", password=password) as database:
        store = database.replace("postgresql://zoo@", f"postgresql://zoo:{password}@") + "/mlflow"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store}
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.create_experiment('zoo')"], env=env, check=True,
                       cwd=tmp_path, timeout=300)
        served = _serve_ui(env)
        url = next(served)
        try:
            port = int(url.split(":")[2].split("/")[0])
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name"
                                        "?experiment_name=zoo", timeout=30) as answer:
                assert b'"name": "zoo"' in answer.read().replace(b'":"', b'": "')  # the UI reads the store
            readable = _command_lines()
            assert any(b"mlflow" in line and b"ui" in line for line in readable)  # the server is among them
            assert not [line for line in readable if password.encode() in line]
        finally:
            next(served, None)


def _command_lines() -> list[bytes]:
    """Every process's command line, as `ps` shows them to any user."""
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:  # it ended meanwhile
            pass
    return lines


def _ctrl_c_as_in_a_terminal() -> None:
    """A test suite started in the background (`cmd &`, nohup) runs with SIGINT ignored, and a child
    inherits that: give `zoo ui` the Ctrl-C a user's terminal delivers, which the test then sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium, or run scripts/system-packages.sh)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[dev]')"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_the_mlflow_ui_shows_the_run_its_dataset_description_and_confusion_matrix(zoo_ui, registered_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run = MlflowClient().get_run(registered_model["result"].run_id)
    shots = Path(os.environ.get("ZOO_SCREENSHOTS", tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1000})  # a common desktop screen
        page.set_default_timeout(60_000)  # a shared 2-core machine
        # The experiment, from the address `zoo ui` printed: the runs table, not the GenAI overview.
        page.goto(zoo_ui, wait_until="load")  # the UI polls: never wait for networkidle
        link = page.get_by_role("link", name=run.info.run_name)
        expect(link).to_be_visible()
        # At the column's default width the part that tells runs apart shows whole ("mnist_cnn default").
        distinctive = run.info.run_name.partition(tracking.NAME_DETAIL)[0]
        shown, needed = link.evaluate(
            "(e, n) => { const text = e.querySelector('span').firstChild, r = document.createRange();"
            " r.setStart(text, 0); r.setEnd(text, n); return [e.getBoundingClientRect().width, r.getBoundingClientRect().width]; }",
            len(distinctive))
        assert needed <= shown, f"{distinctive!r} needs {needed:.0f} px, the runs table shows {shown:.0f} px of the name"
        expect(page.get_by_text("Token Usage")).to_have_count(0)
        page.screenshot(path=shots / "experiment.png")

        link.click()
        expect(page.get_by_text("Trained mnist_cnn on mnist-5k for 2 epoch(s)", exact=False)).to_be_visible()
        expect(page.get_by_text("mnist-5k-train").first).to_be_visible()
        page.screenshot(path=shots / "run.png", full_page=True)

        # A run's own address (as a description links it), in a fresh browser: the model-training view too.
        fresh = browser.new_context(viewport={"width": 1920, "height": 1000}).new_page()
        fresh.goto(f"{zoo_ui.split('#')[0]}#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                   f"{tracking.UI_VIEW}", wait_until="load")
        expect(fresh.get_by_text("Model registry")).to_be_visible(timeout=60_000)
        expect(fresh.get_by_text("Evaluation runs")).to_have_count(0)  # the GenAI sidebar
        fresh.close()

        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("confusion_matrix.png").first.click()
        expect(page.locator("img[src*='confusion_matrix.png'], img[alt*='confusion_matrix']").first).to_be_visible()
        page.screenshot(path=shots / "artifacts.png")
        browser.close()


# What shows of a name in the runs table: the text up to where it is cut, before the ellipsis the UI draws.
VISIBLE_NAME = """(link) => {
    const span = link.querySelector('span'), text = span.firstChild, range = document.createRange();
    const width = (n) => { range.setStart(text, 0); range.setEnd(text, n); return range.getBoundingClientRect().width; };
    const shown = span.getBoundingClientRect().width;
    if (width(text.length) <= shown) return text.textContent;
    const context = document.createElement('canvas').getContext('2d');
    context.font = getComputedStyle(span).font;
    const room = shown - context.measureText('\u2026').width;
    let n = 0;
    while (n < text.length && width(n + 1) <= room) n++;
    return text.textContent.slice(0, n);
}"""


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_at_1440_px_the_runs_table_tells_apart_training_runs_that_differ_in_one_thing(tmp_path):
    """Pairs of `zoo train` runs (named and tagged as training names and tags them) that differ only in model (two
    ResNets under ImageNet's default), only in dataset, only in normalization, or not at all (the " #2"): in the
    runs table of a 1440 px wide window, what shows of the two names differs."""
    from playwright.sync_api import expect, sync_playwright

    from training.train_config import TrainConfig, readable_run_name, training_tags
    from zoo.normalization import Normalization

    fashion, again = TrainConfig(dataset="fashion-mnist", epochs=5), TrainConfig(epochs=1)
    measured = Normalization((0.2860,), (0.3530,))  # --mean auto --std auto on Fashion-MNIST
    pairs = {
        "model": [(TrainConfig(model=model, dataset="photos"), None) for model in ("resnet18", "resnet50")],
        "dataset": [(TrainConfig(dataset=dataset), None) for dataset in ("mnist-5k", "fashion-mnist")],
        "normalization": [(fashion, None), (replace(fashion, mean="auto", std="auto"), measured)],
        "nothing": [(again, None), (again, None)],
    }
    names = {}
    for differing, runs in pairs.items():
        names[differing] = []
        for config, normalization in runs:
            normalization = normalization or config.normalization()
            with tracking.start_run(run_name=readable_run_name(config, normalization),
                                    tags=training_tags(config, normalization, "train")) as run:
                names[differing].append(run.info.run_name)
    assert len({name for pair in names.values() for name in pair}) == 8  # names taken get a number

    shots = Path(os.environ.get("ZOO_SCREENSHOTS", tmp_path))
    with contextmanager(_serve_ui)({**os.environ, "PYTHONPATH": str(REPO)}) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})  # a laptop's screen
        page.set_default_timeout(60_000)  # a shared 2-core machine
        page.goto(url, wait_until="load")  # the UI polls: never wait for networkidle
        visible = {}
        for name in {name for pair in names.values() for name in pair}:
            link = page.get_by_role("link", name=name, exact=True)
            expect(link).to_be_visible()
            visible[name] = link.evaluate(VISIBLE_NAME)
        page.screenshot(path=shots / "runs-1440.png")
        browser.close()
    for differing, (first, second) in names.items():
        assert visible[first] != visible[second], f"runs differing in {differing} read alike: {visible[first]!r}"
