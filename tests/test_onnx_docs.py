"""docs/onnx.md's examples, run as written: onnxruntime and OpenCV outside zoo give `zoo classify`'s labels.

The code blocks are read from the page itself, so the page cannot drift from what the graph does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from zoo.cli.main import cli
from test_classify import digits, onnx_model  # noqa: F401 (fixtures: the trained digits model as .onnx, real PNGs)

DOC = Path(__file__).resolve().parent.parent / "docs" / "onnx.md"


def doc_examples() -> dict:
    """The names the page's python blocks define, executed in order in one namespace."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def zoo_classify(model: Path, files: list[Path]) -> list[dict]:
    res = CliRunner().invoke(cli, ["classify", str(model), *map(str, files), "--format", "json", "--workers", "0"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def check_examples_agree(model: Path, files: list[Path]) -> list[str]:
    rows = zoo_classify(model, files)
    labels = [r["label"] for r in rows]
    examples = doc_examples()
    by_onnxruntime = examples["classify_onnxruntime"](str(model), files)
    assert [label for label, _ in by_onnxruntime] == labels
    np.testing.assert_allclose([p for _, p in by_onnxruntime], [r["top"][0]["probability"] for r in rows], atol=1e-5)
    assert examples["classify_opencv"](str(model), files) == labels
    return labels


def test_the_documented_examples_give_zoo_classify_labels_on_digit_pngs(onnx_model, digits):  # noqa: F811
    folder, truth = digits
    files = sorted(folder.glob("*.png"))[:12]
    labels = check_examples_agree(onnx_model, files)
    assert sum(label == truth[f.name] for label, f in zip(labels, files)) >= 9  # a trained model, not chance


def test_the_documented_examples_resize_rgb_non_square_images_as_zoo_does(tmp_path):
    """An RGB graph with `resize` in its metadata (zoo renorm's shorter side + center crop) and
    photos of several sizes and aspects, PNG and JPEG (JPEG: decoded at reduced scale)."""
    from zoo.model_format.onnx_graph import export_onnx_file
    from zoo.models.registry import create_model
    from zoo.normalization import Normalization

    torch.manual_seed(0)
    network = create_model("mnist_cnn", input_shape=(3, 32, 32))
    model = export_onnx_file(network, Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (3, 32, 32),
                             list("0123456789"), "mnist_cnn", tmp_path / "rgb.onnx", source="test", resize=36)
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(96, 80), (41, 130), (300, 200), (36, 36), (20, 50)]):
        # Smooth colour gradients plus noise: resizing differences show, as on photos.
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 30, (h, w, 3))
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        files.append(tmp_path / f"photo{i}.{'jpg' if i % 2 else 'png'}")
        image.save(files[-1])
    check_examples_agree(model, files)
