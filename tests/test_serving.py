"""Registered models -> loading, ONNX export, classification, and the CLI around them."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from serving.classify import load_pixels
from zoo.cli.main import cli
from zoo.cli.demo import write_digit_images
from serving.loading import load_model

@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, mnist_5k):
    """200 held-out test digits written as real PNG files, 20 per class."""
    folder = tmp_path_factory.mktemp("digits")
    test = mnist_5k.test.subset(200)
    written = write_digit_images(test.images, test.labels, mnist_5k.classes, folder)
    return folder, {p.name: label for p, label in written}


def test_alias_and_version_uris_resolve_to_the_trained_model(registered_model):
    by_alias = load_model("models:/digits@champion")
    by_version = load_model("models:/digits/1")
    result = registered_model["result"]
    by_run = load_model(f"runs:/{result.run_id}/model")
    assert by_run.class_names == by_alias.class_names
    assert by_alias.normalization == result.normalization and by_alias.class_names == result.class_names
    assert by_alias.input_shape == (1, 28, 28) and by_version.model_name == "mnist_cnn"
    pixels = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    import torch

    with torch.inference_mode():
        a = by_alias.module(torch.from_numpy(pixels))
        b = result.network(result.normalization.apply(torch.from_numpy(pixels)))
    assert torch.allclose(a, b, atol=1e-5)


def test_export_puts_normalization_and_classes_in_a_dynamic_batch_graph(registered_model, tmp_path):
    out = tmp_path / "digits.onnx"
    res = CliRunner().invoke(cli, ["export", "models:/digits@champion", "-o", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["max_abs_diff"] <= 1e-4 and report["batch_sizes_checked"] == [1, 7]
    assert out.is_file() and not Path(str(out) + ".data").exists()  # one self-contained file
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    assert json.loads(meta["normalization"]) == {"mean": [0.1307], "std": [0.3081]}
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    # The graph holds the normalization: raw pixels in, same scores as PyTorch on normalized input.
    import onnxruntime as ort
    import torch

    loaded = load_model("models:/digits@champion")
    pixels = torch.rand(5, 1, 28, 28)
    (onnx_scores,) = ort.InferenceSession(str(out)).run(None, {"pixels": pixels.numpy()})
    with torch.inference_mode():
        torch_scores = registered_model["result"].network(loaded.normalization.apply(pixels)).numpy()
    assert np.abs(onnx_scores - torch_scores).max() < 1e-4


def _accuracy(predictions, truth):
    return sum(p["label"] == truth[Path(p["path"]).name] for p in predictions) / len(predictions)


def test_classify_real_held_out_digits_on_both_runtimes(registered_model, digit_folder):
    folder, truth = digit_folder
    runner = CliRunner()
    outputs = {}
    for runtime in ("onnx", "torch"):
        res = runner.invoke(cli, ["classify", "models:/digits@champion", str(folder), "--runtime", runtime,
                                  "-k", "2", "--format", "json"])
        assert res.exit_code == 0, res.output
        outputs[runtime] = json.loads(res.stdout)
    onnx_preds, torch_preds = outputs["onnx"], outputs["torch"]
    assert len(onnx_preds) == 200 and all(len(p["top"]) == 2 for p in onnx_preds)
    accuracy = _accuracy(onnx_preds, truth)
    print(f"accuracy over {len(onnx_preds)} held-out digits: {accuracy:.3f}")
    assert accuracy >= 0.9  # the model scores ~0.95 on the full test split after 2 epochs
    for a, b in zip(onnx_preds, torch_preds):
        assert a["label"] == b["label"]
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4


def test_classify_text_output_and_a_local_onnx_file(registered_model, digit_folder, tmp_path):
    folder, truth = digit_folder
    onnx_file = tmp_path / "m.onnx"
    runner = CliRunner()
    assert runner.invoke(cli, ["export", "models:/digits/1", "-o", str(onnx_file)]).exit_code == 0
    files = sorted(folder.glob("*.png"))[:3]
    res = runner.invoke(cli, ["classify", str(onnx_file), *map(str, files), "-k", "1"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(files[0]))
    assert sum(line.split("\t")[1].split()[0] == truth[f.name] for line, f in zip(lines, files)) >= 2


def test_a_bare_registered_name_means_its_latest_version_in_classify_and_export(registered_model, digit_folder, tmp_path):
    """`models:/digits` without version or alias (what `zoo renorm --register` leaves) is MLflow's "logged model
    not found"; zoo resolves it to the latest version and says so on stderr."""
    folder, _ = digit_folder
    files = [str(f) for f in sorted(folder.glob("*.png"))[:5]]
    runner = CliRunner()
    bare = runner.invoke(cli, ["classify", "models:/digits", *files, "--format", "json"])
    assert bare.exit_code == 0, bare.output
    assert "models:/digits names no version or alias: using its latest version, models:/digits/1" in bare.stderr
    pinned = runner.invoke(cli, ["classify", "models:/digits/1", *files, "--format", "json"])
    assert [p["label"] for p in json.loads(bare.stdout)] == [p["label"] for p in json.loads(pinned.stdout)]
    exported = runner.invoke(cli, ["export", "models:/digits", "-o", str(tmp_path / "d.onnx")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "d.onnx").is_file() and "using its latest version" in exported.stderr


def test_images_are_converted_to_the_models_input(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 40), (255, 255, 255)).save(tmp_path / "white.jpg")
    pixels = load_pixels([tmp_path / "white.jpg"], (1, 28, 28))
    assert pixels.shape == (1, 1, 28, 28) and pixels.dtype == np.float32 and np.allclose(pixels, 1.0)
    assert np.allclose(load_pixels([tmp_path / "white.jpg"], (1, 28, 28), invert=True), 0.0)


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["classify", "models:/digits@champion", "no/such.png"], 1, "cannot classify no/such.png: no such file or folder"),
        (["classify", "models:/digits@nope", "."], 1, "no model at 'models:/digits@nope'"),
        (["classify", "models:/unknown-model/3", "."], 1, "no model at 'models:/unknown-model/3'"),
        (["export", "models:/unknown-model", "-o", "x.onnx"], 1, "no registered model 'unknown-model'"),
        (["classify", "s3://bucket/x", "."], 2, "not of a supported form; use models:/NAME@ALIAS"),
        (["export", "models:/digits@champion", "-o", "x.txt"], 2, "should end in .onnx"),
        (["classify", "models:/digits@champion", ".", "--runtime", "tvm"], 2, "'tvm' is not one of 'onnx', 'torch'"),
    ],
)
def test_bad_serving_input_fails_with_one_clear_line(registered_model, args, code, expected):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == code, res.output
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help(command):
    res = CliRunner().invoke(cli, [command, "--help"], prog_name="zoo")
    assert res.exit_code == 0 and res.stdout.startswith(f"Usage: zoo {command} [OPTIONS]"), res.output
    listed = CliRunner().invoke(cli, ["--help"]).stdout
    assert f"\n  {command} " in listed  # and `zoo --help` lists it


def test_version_and_listings_as_json(registered_model):
    runner = CliRunner()
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"zoo, version {importlib.metadata.version('mlflow-zoo')}\n"
    models = json.loads(runner.invoke(cli, ["models", "--format", "json"]).stdout)
    mnist = next(m for m in models if m["name"] == "mnist_cnn")
    assert mnist["input_shape"] == [1, 28, 28] and mnist["normalization"]["mean"] == [0.1307]
    registered = json.loads(runner.invoke(cli, ["models", "--registered", "--format", "json"]).stdout)
    assert {"name": "digits", "latest_version": 1, "aliases": {"champion": 1}} in registered
    datasets = json.loads(runner.invoke(cli, ["datasets", "--format", "json"]).stdout)
    assert {"mnist-5k", "fashion-mnist", "mnist"} <= set(datasets)


def test_the_installed_zoo_command_keeps_stdout_for_json(registered_model, digit_folder):
    """A real subprocess: logs go to stderr, so stdout parses as JSON for scripts."""
    folder, truth = digit_folder
    files = [str(p) for p in sorted(folder.glob("*.png"))[:4]]
    # The console script pip installed beside this Python (setup.cfg's console_scripts), as a user runs it.
    zoo = Path(sys.executable).parent / "zoo"
    assert zoo.is_file(), f"no installed zoo command at {zoo}: run `make venv` (pip install -e .)"
    proc = subprocess.run([str(zoo), "classify", "models:/digits@champion", *files, "--format", "json"],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [Path(p["path"]).name for p in json.loads(proc.stdout)] == [Path(f).name for f in files]
