"""`mlflow run . -e ENTRY --env-manager local` as a user runs it, in real subprocesses."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent


def mlflow_run(*args: str, project: Path = PROJECT) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    # The entry points call `python`: the one of this environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), *args, "--env-manager", "local"],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_mlflow_run_train_entry_point_logs_one_finished_run_in_the_zoo_experiment():
    proc = mlflow_run("-e", "train", "-P", "epochs=1", "-P", "register=mlproject-cnn", "-P", "alias=candidate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    # `mlflow run` given no experiment files its own run in Default; the training lands in `zoo`,
    # beside what the `zoo` commands log, and the project run points at it.
    (run,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["mean"] == "0.1307"
    assert run.data.metrics["test_accuracy"] > 0.8  # one epoch on 3,500 real digits
    assert run.info.run_name == "mnist_cnn default · mnist-5k 1ep s1"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert client.get_model_version_by_alias("mlproject-cnn", "candidate").run_id == run.info.run_id
    (project_run,) = client.search_runs(["0"])
    assert run.data.tags["zoo.project_run_id"] == project_run.info.run_id
    assert project_run.data.tags["zoo.run_id"] == run.info.run_id and project_run.info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_run_with_an_experiment_logs_into_its_own_run():
    proc = mlflow_run("-e", "train", "-P", "epochs=1", "-P", "precision=bf16-mixed", "--experiment-name", "mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert client.get_experiment(run.info.experiment_id).name == "mine"
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] > 0.8
    assert run.data.params["precision"] == "bf16-mixed"  # the entry point's parameter reached zoo train
    assert client.get_experiment_by_name("mine").tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_mlflow_run_with_auto_normalization_and_a_folder_typed_with_a_slash_keeps_what_was_asked(tmp_path, mnist_5k):
    """`mlflow run` logs every -P into the run before zoo starts: zoo keeps those params as typed (MLflow
    refuses a changed value) and records what they resolved to beside them."""
    from training.renorm_demo import write_image_folder
    from zoo.data import load_dataset

    folder = write_image_folder(mnist_5k.test.subset(200), mnist_5k.classes, tmp_path / "digits")
    typed = f"{folder}{os.sep}"
    proc = mlflow_run("-e", "train", "--experiment-name", "mine", "-P", f"dataset={typed}", "-P", "mean=auto",
                      "-P", "std=auto", "-P", "epochs=1", "-P", "max_batches=2", "-P", "batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["mean"], params["std"], params["dataset"]) == ("auto", "auto", typed)  # as asked
    statistics = load_dataset(str(folder)).pixel_statistics()
    assert params["normalization_from"] == "data"
    assert (params["mean_resolved"], params["std_resolved"]) == tuple(statistics.as_params().values())
    assert params["dataset_resolved"] == str(folder)
    # Every digit of what was used in the tag, and a word for it in the name, not numbers nobody chose.
    assert tuple(map(float, run.data.tags["zoo.normalization"].split("/"))) == (statistics.mean[0], statistics.std[0])
    assert run.info.run_name == "mnist_cnn auto · digits 1ep s1 2 batches/epoch"


def project_copy(tmp_path: Path) -> Path:
    """The MLproject file alone in a folder of its own: `mlflow run` runs the entry point's command in
    the project folder, so what an entry point writes to relative paths (demo-out/, optuna.db) lands
    here, not in the checkout. The code comes from the installed package (or PYTHONPATH)."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(PROJECT / "MLproject", folder / "MLproject")
    return folder


def zoo_runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("zoo").experiment_id])


@pytest.mark.slow
def test_main_entry_point_runs_the_demo_from_training_to_classified_digits(tmp_path):
    project = project_copy(tmp_path)
    proc = mlflow_run("-e", "main", "-P", "epochs=1", "-P", "images=5", project=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_demo_ran(proc.stdout, project, epochs=1, images=5)


@pytest.mark.slow
def test_make_demo_runs_zoo_demo_from_the_installed_environment(tmp_path):
    """`make demo` as the README gives it (5 epochs, 20 digits), in this environment: the Makefile alone is
    copied to a folder of its own, and -o keeps make from reinstalling the environment."""
    shutil.copy(PROJECT / "Makefile", tmp_path / "Makefile")
    venv = Path(sys.prefix)
    proc = subprocess.run(["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_demo_ran(proc.stdout, tmp_path, epochs=5, images=20)


def assert_demo_ran(stdout: str, folder: Path, epochs: int, images: int) -> None:
    """The demo's promises: a finished run, registered, exported, and its digits classified in a table."""
    client = MlflowClient()
    (run,) = zoo_runs(client)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == str(epochs)
    assert client.get_model_version_by_alias("mnist-cnn", "champion").run_id == run.info.run_id
    assert (folder / "demo-out" / "mnist_cnn.onnx").is_file()
    assert len(list((folder / "demo-out" / "digits").glob("*.png"))) == images
    # One table row per written digit with its true and predicted label, then the tally.
    rows = [line.split() for line in stdout.splitlines() if ".png " in line]
    assert len(rows) == images and all(row[1] in "0123456789" and row[2] in "0123456789" for row in rows), stdout
    correct = sum(row[1] == row[2] for row in rows)
    accuracy = run.data.metrics["test_accuracy"]
    assert f"{correct}/{images} correct; test accuracy over all 1000 held-out digits: {accuracy:.4f}" in stdout
    assert accuracy > 0.8  # one epoch on 3,500 real digits already gets there


@pytest.mark.slow
def test_study_entry_point_runs_a_study_with_its_default_storage_and_no_registration(tmp_path):
    project = project_copy(tmp_path)
    # val_fraction and max_batches are not declared: MLflow appends them as --val_fraction, --max_batches.
    proc = mlflow_run("-e", "study", "-P", "trials=2", "-P", "jobs=1", "-P", "train_size=192",
                      "-P", "test_size=200", "-P", "val_fraction=0.3", "-P", "max_batches=2", project=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = zoo_runs(client)
    (parent,) = [r for r in runs if r.data.tags.get("zoo.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert parent.info.run_name == "study mnist_cnn-mnist-5k-normalization"  # study_name=default: the default name
    assert parent.data.params["trials"] == "2"
    assert (parent.data.params["val_fraction"], parent.data.params["max_batches"]) == ("0.3", "2")
    assert {c.data.params["val_size"] for c in children} == {"1500"}  # 30 % of mnist-5k's 5,000 digits
    assert (project / "optuna.db").is_file()  # storage=sqlite:///optuna.db, relative to the project folder
    assert parent.data.params["optuna_storage"] == f"sqlite:///{project / 'optuna.db'}"  # which opens it from anywhere
    assert client.search_registered_models() == []  # register=default: nothing registered


@pytest.mark.slow
def test_renorm_entry_point_evaluates_every_image_by_default(tmp_path, mnist_5k):
    import torch
    import torchvision

    from training.renorm_demo import save_checkpoint, write_image_folder
    from zoo.normalization import IMAGENET

    project = project_copy(tmp_path)
    data = write_image_folder(mnist_5k.test.subset(10), mnist_5k.classes, tmp_path / "digits")
    torch.manual_seed(0)
    weights = save_checkpoint(torchvision.models.resnet18(num_classes=10), IMAGENET, mnist_5k.classes,
                              tmp_path / "resnet18.pt")
    # Few evaluations (the entry point has no --resize/--crop: 224x224 crops, a second each on this CPU).
    proc = mlflow_run("-e", "renorm", "-P", f"weights={weights}", "-P", f"data={data}", "-P", "norms=imagenet 0:1",
                      "-P", "adapt=none", "-P", "grid_steps=2", project=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = zoo_runs(MlflowClient())
    (parent,) = [r for r in runs if r.data.tags.get("zoo.kind") == "renorm"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 + 2 * 2  # norms + grid cells, one adaptation
    # limit="" means every image (none split off for calibration without bn-recalibrate)
    assert parent.data.params["eval_images"] == "10" and parent.data.params["calibration_images"] == "0"
    assert MlflowClient().search_registered_models() == []  # register="": nothing registered


@pytest.mark.slow
def test_export_and_classify_entry_points_use_a_registered_model(registered_model, tmp_path, mnist_5k):
    from zoo.cli.demo import write_digit_images

    project = project_copy(tmp_path)
    onnx_path = tmp_path / "digits.onnx"
    exported = mlflow_run("-e", "export", "-P", "model_uri=models:/digits@champion", "-P", f"output={onnx_path}",
                          project=project)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert onnx_path.is_file()
    test = mnist_5k.test.subset(10)
    written = write_digit_images(test.images, test.labels, mnist_5k.classes, tmp_path / "digits")
    classified = mlflow_run("-e", "classify", "-P", "model_uri=models:/digits@champion",
                            "-P", f"path={tmp_path / 'digits'}", "-P", "top_k=2", project=project)
    assert classified.returncode == 0, classified.stderr[-3000:]
    # One line per image: PATH<TAB>LABEL PROBABILITY  LABEL PROBABILITY (top_k=2)
    rows = [line.split("\t") for line in classified.stdout.splitlines() if ".png\t" in line]
    predicted = {Path(path).name: top.split() for path, top in rows}
    assert len(predicted) == len(written) == 10 and all(len(top) == 4 for top in predicted.values()), classified.stdout
    correct = sum(predicted[path.name][0] == label for path, label in written)
    assert correct >= 8, classified.stdout  # the 2-epoch model is right on about 95 % of test digits
