"""A registered model through MLflow's own doors: pyfunc, `mlflow models serve`, `mlflow models predict`.

One contract everywhere: images (or pixels in [0, 1]) in, labels out, the same labels as `zoo classify`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from servers import free_port
from serving.classify import collect_images, load_pixels
from zoo.cli.main import cli
from zoo.cli.demo import write_digit_images
from serving.loading import load_model, load_module

URI = "models:/digits@champion"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
# `mlflow models serve` starts `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
VENV_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_5k) -> list[Path]:
    """20 held-out test digits written as PNG files, 2 per class."""
    folder = tmp_path_factory.mktemp("pyfunc-digits")
    test = mnist_5k.test.subset(20)
    write_digit_images(test.images, test.labels, mnist_5k.classes, folder)
    return collect_images([folder])


def zoo_classify_labels(files: list[Path], runtime: str = "onnx") -> list[str]:
    res = CliRunner().invoke(cli, ["classify", URI, *map(str, files), "--runtime", runtime, "--format", "json"])
    assert res.exit_code == 0, res.output
    return [p["label"] for p in json.loads(res.stdout)]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_pyfunc_takes_png_bytes_or_pixels_and_answers_zoo_classify_labels(registered_model, digits):
    expected = zoo_classify_labels(digits)
    model = mlflow.pyfunc.load_model(URI)

    by_bytes = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in digits]}))
    assert by_bytes["label"].tolist() == expected
    truth = [f.stem.split("true-")[1] for f in digits]
    assert sum(a == b for a, b in zip(expected, truth)) >= 16  # a trained model, not chance
    pixels = load_pixels(digits, (1, 28, 28))  # float32 [N, 1, 28, 28] in [0, 1]
    by_pixels = model.predict(pd.DataFrame({"pixels": list(pixels)}), params={"top_k": 5})
    assert by_pixels["label"].tolist() == expected
    np.testing.assert_allclose(by_pixels["probability"], by_bytes["probability"], atol=1e-5)
    top = by_pixels["top"][0]
    assert len(top) == 5 and top[0]["label"] == expected[0]
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert len(by_bytes["top"][0]) == 3  # the default top_k
    # A dict of lists (MLflow's "inputs" form) and base64 strings work too.
    assert model.predict({"image": [b64(f) for f in digits[:3]]})["label"].tolist() == expected[:3]


def test_pytorch_users_get_a_module_that_takes_pixels(registered_model, digits):
    pixels = torch.from_numpy(load_pixels(digits, (1, 28, 28)))
    module = mlflow.pyfunc.load_model(URI).unwrap_python_model().module
    with torch.inference_mode():
        scores = module(pixels)
        assert torch.allclose(load_module(URI)(pixels), scores)
        trained = registered_model["result"]
        assert torch.allclose(trained.network(trained.normalization.apply(pixels)), scores, atol=1e-5)
    names = load_model(URI).class_names
    assert [names[i] for i in scores.argmax(1)] == zoo_classify_labels(digits, runtime="torch")


def with_nan(pixels: np.ndarray, value: float = np.nan) -> np.ndarray:
    """``pixels`` [C][H][W] with one bad value at [0, 3, 4]."""
    pixels = pixels.copy()
    pixels[0, 3, 4] = value
    return pixels


@pytest.mark.parametrize("frame, message", [
    ({"image": [b"hello, not an image"]}, "row 0 of column 'image': not an image Pillow can read"),
    ({"img": [b"\x89PNG"]}, "expected one column, 'image' (PNG/JPEG bytes, base64 strings over REST) or 'pixels'"),
    ({"pixels": [np.zeros((1, 10, 28))]}, "pixels of row 0 have shape (1, 10, 28); expected [C][H][W] = [1][28][28]"),
    ({"pixels": [np.full((1, 28, 28), 255.0)]}, "holds values in [255, 255]; this model takes pixels in [0, 1]"),
    ({"pixels": [np.full((1, 28, 28), 0.5), with_nan(np.full((1, 28, 28), 0.5))]},
     "pixels of row 1 hold NaN (first at [0, 3, 4]); send numbers in [0, 1]"),
    ({"pixels": [with_nan(np.full((1, 28, 28), 0.5), np.inf)]}, "pixels of row 0 hold inf (first at [0, 3, 4])"),
    ({"pixels": [np.zeros((28, 28))]}, "pixels of row 0 have shape (28, 28); expected [C][H][W] = [1][28][28]"),
    ({"pixels": [np.zeros(784)]}, "pixels of row 0 are a flat list of 784 values; expected [C][H][W] = [1][28][28]"),
])
def test_bad_pyfunc_input_is_one_clear_line(registered_model, frame, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        mlflow.pyfunc.load_model(URI).predict(pd.DataFrame(frame))
    assert message in caught.value.message and "\n" not in caught.value.message
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def ink_in_alpha(digit: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """The digit's strokes as alpha over one ``colour``: transparent background, no drawing in RGB."""
    rgba = Image.new("RGBA", digit.size, colour)
    rgba.putalpha(digit.convert("L"))
    return rgba


def test_the_served_model_decodes_awkward_images_as_zoo_classify_and_refuses_a_bomb(registered_model, digits, tmp_path):
    from mlflow.exceptions import MlflowException
    from test_classify import crafted_bomb

    digit = Image.open(digits[1])
    variants = {
        "grey16.png": Image.fromarray(np.asarray(digit).astype(np.uint16) * 257),  # 16-bit: convert("L") clips it white
        "cmyk.jpg": digit.convert("CMYK"),
        "palette.png": digit.convert("P"),
        # What drawing programs and web canvases export: one colour everywhere, the strokes in alpha.
        "ink-in-alpha-black.png": ink_in_alpha(digit, (0, 0, 0)),
        "ink-in-alpha-white.png": ink_in_alpha(digit, (255, 255, 255)),
    }
    for name, image in variants.items():
        image.save(tmp_path / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    files = [digits[1], *(tmp_path / name for name in variants)]
    model = mlflow.pyfunc.load_model(URI)
    answered = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert answered["label"].tolist() == zoo_classify_labels(files) == zoo_classify_labels(digits[1:2]) * len(files)

    bomb = crafted_bomb(digits[1], tmp_path / "bomb.png")  # a real PNG whose header declares 100,000 x 100,000
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({"image": [digits[0].read_bytes(), bomb.read_bytes()]}))
    assert "row 1 of column 'image'" in caught.value.message and "decompression bomb" in caught.value.message
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_the_registered_model_and_version_are_described(registered_model):
    client = MlflowClient()
    result = registered_model["result"]
    model = client.get_registered_model("digits")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    assert "mnist_cnn image classifier, 10 classes" in model.description
    assert "trained on mnist-5k, normalization mean=0.1307 std=0.3081" in model.description
    assert f"test_accuracy {result.test_accuracy:.4f}" in model.description
    assert model.tags["task"] == "image-classification" and model.tags["zoo_model"] == "mnist_cnn"
    version = client.get_model_version("digits", "1")
    assert version.tags == {
        "zoo_model": "mnist_cnn", "dataset": "mnist-5k", "normalization": "mean=0.1307 std=0.3081",
        "source_run_id": result.run_id, "test_accuracy": f"{result.test_accuracy:.4f}",
    }
    assert "mnist_cnn trained on mnist-5k" in version.description and result.run_id in version.description

    info = mlflow.models.get_model_info(URI)
    assert [i["name"] for i in info.signature.inputs.to_dict()] == ["image", "pixels"]
    assert info.signature.inputs.to_dict()[0]["type"] == "binary"
    assert [o["name"] for o in info.signature.outputs.to_dict()] == ["label", "probability", "top"]
    local = Path(mlflow.artifacts.download_artifacts(URI))
    example = mlflow.models.Model.load(local).load_input_example(local)
    first = Image.open(io.BytesIO(example["image"][0]))
    assert first.size == (28, 28) and np.asarray(first).max() > 200  # a real digit, not zeros
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and f"mlflow=={mlflow.__version__}" in requirements


@pytest.fixture(scope="module")
def served_model(trained_store):
    """`mlflow models serve` of models:/digits@champion on a free port, one for the module; killed at teardown."""
    port = free_port()
    log = trained_store["folder"] / f"serve-{port}.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [MLFLOW, "models", "serve", "-m", URI, "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=trained_store["folder"], start_new_session=True,  # workers die with it
            env={**VENV_ENV, "MLFLOW_TRACKING_URI": trained_store["uri"]},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow models serve not ready:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the server and the workers it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # already gone
            break
        try:
            server.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.slow
def test_served_model_classifies_base64_pngs_and_refuses_bad_input(served_model, registered_model, digits):
    expected = zoo_classify_labels(digits)
    status, answer = post(served_model, {"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in digits]}})
    assert status == 200, answer
    assert [p["label"] for p in answer["predictions"]] == expected
    assert set(answer["predictions"][0]) == {"label", "probability", "top"}
    # docs/classify.md's other request forms: {"inputs": ...} with params.top_k, and a pixels column.
    status, answer = post(served_model, {"inputs": {"image": [b64(f) for f in digits]}, "params": {"top_k": 1}})
    assert status == 200, answer
    assert [p["label"] for p in answer["predictions"]] == expected
    assert all(len(p["top"]) == 1 for p in answer["predictions"])
    pixels = [(np.asarray(Image.open(f), dtype=np.float64)[None] / 255).tolist() for f in digits]  # [C][H][W]
    status, answer = post(served_model, {"dataframe_split": {"columns": ["pixels"], "data": [[p] for p in pixels]},
                                         "params": {"top_k": 5}})
    assert status == 200, answer
    assert [p["label"] for p in answer["predictions"]] == expected
    assert all(len(p["top"]) == 5 for p in answer["predictions"])

    not_an_image = base64.b64encode(b"hello, not an image").decode()
    status, answer = post(served_model, {"dataframe_split": {"columns": ["image"], "data": [[not_an_image]]}})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    # MLflow's scoring server prefixes "Failed to predict data '<input>'." ; the model's own line comes last.
    assert answer["message"].splitlines()[-1].startswith("Error: row 0 of column 'image': not an image Pillow can read")

    status, answer = post(served_model, {"dataframe_split": {"columns": ["img"], "data": [[b64(digits[0])]]}})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].splitlines()[-1].startswith("Error: expected one column, 'image' (PNG/JPEG bytes")

    grey_levels = np.asarray(Image.open(digits[0]), dtype=float)[None].tolist()  # 0-255 floats: confident nonsense before
    status, answer = post(served_model, {"dataframe_split": {"columns": ["pixels"], "data": [[grey_levels]]}})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    line = answer["message"].splitlines()[-1]
    assert line.startswith("Error: column 'pixels' holds values in [0, 2") and "this model takes pixels in [0, 1]" in line


GREY = np.full((1, 28, 28), 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("body, line", [
    ({"dataframe_split": {"columns": ["pixels"], "data": [[GREY.tolist()], [with_nan(GREY).tolist()]]}},
     "pixels of row 1 hold NaN (first at [0, 3, 4]); send numbers in [0, 1]"),
    ({"inputs": {"pixels": [with_nan(GREY, np.inf).tolist()]}}, "pixels of row 0 hold inf (first at [0, 3, 4])"),
    ({"dataframe_split": {"columns": ["pixels"], "data": [[GREY[0].tolist()]]}},
     "pixels of row 0 have shape (28, 28); expected [C][H][W] = [1][28][28]"),
    ({"dataframe_split": {"columns": ["pixels"], "data": [[GREY.ravel().tolist()]]}},
     "pixels of row 0 are a flat list of 784 values; expected [C][H][W] = [1][28][28]"),
    ({"inputs": {"pixels": [GREY.tolist(), with_nan(GREY).tolist()]}}, "pixels of row 1 hold NaN (first at [0, 3, 4])"),
    ({"inputs": {"pixels": [GREY.ravel().tolist()]}}, "pixels of row 0 are a flat list of 784 values"),
    ({"inputs": {"pixels": [GREY.tolist(), GREY[:, :27].tolist()]}}, "pixels of row 1 have shape (1, 27, 28)"),
    ({"dataframe_records": [{"pixels": [[0.5] * 28] * 27 + [[0.5] * 27]}]},
     "pixels of row 0 are not a [C][H][W] array of numbers (rows of different lengths?)"),
])
def test_served_model_names_what_is_wrong_with_bad_pixels(served_model, body, line):
    status, answer = post(served_model, body)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert line in answer["message"].splitlines()[-1]


@pytest.mark.slow
def test_served_model_takes_pixels_in_the_inputs_form(served_model, registered_model, digits):
    pixels = [(np.asarray(Image.open(f), dtype=np.float64)[None] / 255).tolist() for f in digits[:4]]  # [C][H][W] each
    status, answer = post(served_model, {"inputs": {"pixels": pixels}})
    assert status == 200, answer
    assert [p["label"] for p in answer["predictions"]] == zoo_classify_labels(digits[:4])


@pytest.mark.slow
def test_mlflow_models_predict_gives_zoo_classify_labels(registered_model, digits, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in digits[:5]]}}))
    out = tmp_path / "predictions.json"
    done = subprocess.run([MLFLOW, "models", "predict", "-m", URI, "-i", str(request), "-t", "json", "-o", str(out),
                           "--env-manager", "local"], capture_output=True, text=True, timeout=300, env=VENV_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p["label"] for p in json.loads(out.read_text())["predictions"]] == zoo_classify_labels(digits[:5])


@pytest.mark.slow
def test_models_logged_by_the_pytorch_flavor_still_load(mnist_5k):
    """Registered by the previous version: an mlflow.pytorch model whose network takes normalized input."""
    from zoo.model_format.model import model_metadata
    from zoo.normalization import Normalization
    from zoo.models.registry import create_model

    torch.manual_seed(0)
    network = create_model("mnist_cnn").eval()
    normalization = Normalization((0.1307,), (0.3081,))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(network, name="model", input_example=np.zeros((2, 1, 28, 28), np.float32),
                                        metadata=model_metadata(model_name="mnist_cnn", normalization=normalization,
                                                                input_shape=(1, 28, 28), class_names=list("0123456789")))
    loaded = load_model(info.model_uri)
    pixels = mnist_5k.test.images[:4].float() / 255
    with torch.inference_mode():
        expected = network(normalization.apply(pixels))
        assert torch.allclose(loaded.module(pixels), expected, atol=1e-5)
    assert loaded.normalization == normalization and loaded.class_names == list("0123456789")
