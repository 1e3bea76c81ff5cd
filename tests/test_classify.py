"""`zoo classify` on hostile input: real digit PNGs beside broken, empty, fake and bomb files.

Every readable image is classified, every unreadable one gets an error row and one stderr line,
and the exit code says whether any failed. The model is the trained models:/digits@champion
(tests/conftest.py), exported once per module to a local .onnx file.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import use_tracking_store
from training import registration
from zoo.cli.main import cli
from zoo.cli.demo import write_digit_images


@pytest.fixture(scope="module")
def onnx_model(trained_store, tmp_path_factory) -> Path:
    from zoo.model_format.onnx_graph import export_onnx
    from serving.loading import load_model

    path = tmp_path_factory.mktemp("model") / "digits.onnx"
    with pytest.MonkeyPatch.context() as mp:
        use_tracking_store(trained_store["folder"], mp)
        export_onnx(load_model(trained_store["model_uri"]), path)
    mlflow.set_tracking_uri(None)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_5k) -> tuple[Path, dict[str, str]]:
    """30 held-out test digits as real PNG files (named NNNN_true-LABEL.png) and their true labels."""
    folder = tmp_path_factory.mktemp("digits")
    test = mnist_5k.test.subset(30)
    written = write_digit_images(test.images, test.labels, mnist_5k.classes, folder)
    return folder, {p.name: label for p, label in written}


def crafted_bomb(png: Path, out: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A real PNG whose IHDR declares width x height (CRC fixed): what a decompression bomb's header says."""
    data = bytearray(png.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    out.write_bytes(bytes(data))
    return out


def hostile_files(folder: Path, good_png: Path) -> dict[Path, str]:
    """The unreadable inputs, made for real on disk, each with words its error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / "source.jpg"
    Image.open(good_png).convert("RGB").resize((200, 200)).save(jpeg, quality=90)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    (folder / "text.png").write_text("this is a text file, not a PNG\n")
    (folder / "noise.xyz").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "no-images").mkdir()
    (folder / "no-images" / "notes.txt").write_text("no pictures here")
    return {
        folder / "empty.png": "empty file",
        folder / "truncated.png": "truncated",
        folder / "truncated.jpg": "truncated",
        folder / "text.png": "unknown format",
        folder / "noise.xyz": "unknown format",
        crafted_bomb(good_png, folder / "bomb.png"): "decompression bomb",
        folder / "no-images": "no images",
        folder / "missing.png": "no such file or folder",
    }


def invoke(*args: str):
    return CliRunner().invoke(cli, ["classify", *map(str, args)])


def test_bad_files_get_error_rows_and_the_good_ones_are_still_classified(onnx_model, digits, tmp_path):
    folder, truth = digits
    good = sorted(folder.glob("*.png"))
    bad = hostile_files(tmp_path / "bad", good[0])
    inputs = [good[0], *bad, *good[1:]]
    res = invoke(onnx_model, *inputs, "--format", "json", "-k", "1")

    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    rows = json.loads(res.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in inputs]  # one row per input, in order
    by_path = {r["path"]: r for r in rows}
    for path, reason in bad.items():
        row = by_path[str(path)]
        assert row["label"] is None and reason in row["error"], row
        assert f"cannot classify {path}: {row['error']}" in res.stderr.splitlines()
    assert f"{len(bad)} of {len(inputs)} inputs could not be classified" in res.stderr.splitlines()[-1]
    classified = [by_path[str(p)] for p in good]
    assert all(r["error"] is None and r["top"][0]["label"] == r["label"] for r in classified)
    correct = sum(r["label"] == truth[Path(r["path"]).name] for r in classified)
    assert correct >= 0.9 * len(good), correct  # the 2-epoch model scores about 0.95


def test_awkward_but_valid_images_are_classified_like_the_plain_png(onnx_model, digits, tmp_path):
    folder, truth = digits
    png = sorted(folder.glob("*.png"))[1]
    digit = Image.open(png)
    other = Image.open(sorted(folder.glob("*.png"))[2])
    pixels = np.asarray(digit)
    variants = {
        "grey16.png": Image.fromarray(pixels.astype(np.uint16) * 257),  # 16-bit grayscale
        "cmyk.jpg": digit.convert("CMYK"),
        "rgba.png": digit.convert("RGBA"),
        "palette.png": digit.convert("P"),
        "large.png": digit.resize((3000, 3000), Image.Resampling.NEAREST),  # 9 Mpixel, within the limit
    }
    for name, image in variants.items():
        image.save(tmp_path / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really 16 bits on disk
    digit.save(tmp_path / "animated.gif", save_all=True, append_images=[other])  # first frame counts
    assert Image.open(tmp_path / "animated.gif").n_frames == 2

    res = invoke(onnx_model, png, tmp_path, "--format", "json", "-k", "1")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    expected = rows[0]["label"]
    assert expected == truth[png.name]
    assert {Path(r["path"]).name: r["label"] for r in rows[1:]} == {name: expected for name in [*variants, "animated.gif"]}


def test_a_declared_size_above_max_pixels_is_refused_before_decoding(onnx_model, digits, tmp_path):
    folder, _ = digits
    png = sorted(folder.glob("*.png"))[0]
    big = tmp_path / "big.png"
    Image.open(png).resize((2000, 1000)).save(big)
    res = invoke(onnx_model, big, png, "--max-pixels", "1000000", "--format", "jsonl")
    assert res.exit_code == 1
    bad, good = (json.loads(line) for line in res.stdout.splitlines())
    assert "declares 2000x1000 = 2,000,000 pixels, above the limit of 1,000,000" in bad["error"]
    assert good["error"] is None and good["label"] is not None
    assert invoke(onnx_model, big, png, "--max-pixels", "2000000").exit_code == 0


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["--batch-size", "0"], 2, "Invalid value for '--batch-size'"),
        (["--workers", "-1"], 2, "Invalid value for '--workers'"),
        (["--format", "xml"], 2, "'xml' is not one of 'text', 'json', 'jsonl'"),
    ],
)
def test_bad_options_are_usage_errors(onnx_model, digits, args, code, expected):
    res = invoke(onnx_model, digits[0], *args)
    assert res.exit_code == code and expected in res.stderr and "Traceback" not in res.output


def test_exit_codes_all_good_all_bad_and_unknown_uri_form(onnx_model, digits, tmp_path):
    folder, _ = digits
    assert invoke(onnx_model, folder).exit_code == 0
    (tmp_path / "empty.png").write_bytes(b"")
    only_bad = invoke(onnx_model, tmp_path / "empty.png")
    assert only_bad.exit_code == 1 and only_bad.stdout == ""
    assert "cannot classify" in only_bad.stderr and "Traceback" not in only_bad.output
    unknown = invoke("ftp://host/model", folder)
    assert unknown.exit_code == 2 and "not of a supported form" in unknown.stderr


def test_jsonl_streams_every_row_in_order_over_many_batches_and_workers(onnx_model, digits, tmp_path):
    """Batches of 4 decoded by 2 worker processes give the same rows, in the same order, as one batch here."""
    folder, truth = digits
    (folder_with_bad := tmp_path / "mixed").mkdir()
    for png in sorted(folder.glob("*.png")):
        (folder_with_bad / png.name).write_bytes(png.read_bytes())
    (folder_with_bad / "0015_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = invoke(onnx_model, folder_with_bad, "--format", "jsonl", "--batch-size", "4", "--workers", "2")
    assert res.exit_code == 1, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]  # one JSON object per line
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder_with_bad.iterdir())
    assert [r["path"] for r in rows if r["error"]] == [str(folder_with_bad / "0015_broken.png")]

    single = invoke(onnx_model, folder_with_bad, "--format", "json", "--batch-size", "1000", "--workers", "0")
    assert json.loads(single.stdout) == rows


def zoo_classify(*args) -> list[str]:
    """`zoo classify ARGS` as a fresh process: its workers are forked as a user's command forks them."""
    return [sys.executable, "-m", "zoo.cli", "classify", *map(str, args)]


def command_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_worker_processes_give_the_rows_of_one_process_byte_for_byte(onnx_model, digits, tmp_path):
    """By default (one worker per core from two batches on), with --workers 3 and with --workers 0 (all in the
    command's process): the same rows, in input order, the unreadable file included, as the command runs them."""
    folder, _ = digits
    (mixed := tmp_path / "mixed").mkdir()
    for png in sorted(folder.glob("*.png")):
        (mixed / png.name).write_bytes(png.read_bytes())
    (mixed / "0015_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    outputs = []
    for workers in ([], ["--workers", "3"], ["--workers", "0"]):
        done = subprocess.run(zoo_classify(onnx_model, mixed, "--format", "jsonl", "--batch-size", "4", *workers),
                              capture_output=True, text=True, timeout=120, env=command_env())
        assert done.returncode == 1, done.stderr  # the broken file
        assert done.stderr.count("cannot classify") == 1 and "0015_broken.png" in done.stderr
        outputs.append(done.stdout)
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in mixed.iterdir())
    assert sum(r["error"] is None for r in rows) == 30
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_a_worker_killed_mid_folder_ends_classify_with_one_line_and_keeps_the_rows_before(onnx_model, digits, tmp_path):
    """A worker process that dies (the kernel's out-of-memory killer, a kill -9) stops the command with exit 1
    and one line saying what to change; the rows already written are whole and in order."""
    folder, _ = digits
    (big := tmp_path / "big").mkdir()
    for i in range(100):  # 3,000 files, one per batch: seconds of work
        for png in sorted(folder.glob("*.png")):
            os.link(png, big / f"{i:03d}_{png.name}")
    proc = subprocess.Popen(zoo_classify(onnx_model, big, "--format", "jsonl", "--batch-size", "1", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=command_env())
    first = proc.stdout.readline()  # the workers are classifying
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGKILL)
    rest, stderr = proc.stdout.read(), proc.stderr.read()  # not communicate(): it would skip what readline buffered
    assert proc.wait(timeout=120) == 1, stderr
    assert "a worker process died" in stderr and "--workers 0" in stderr and "Traceback" not in stderr, stderr
    rows = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert 0 < len(rows) < 3000 and all(r["error"] is None for r in rows)
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in big.iterdir())[:len(rows)]
    assert not running(int(workers[1]))  # the other worker stopped with the command, not left behind


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_rows_name_files_as_the_folder_was_given(onnx_model, digits, tmp_path, monkeypatch):
    """Paths in rows are the folder argument joined with the names below it, as a Path prints them:
    "." and "./scans" give "scans/NAME.png", never "./scans/NAME.png"."""
    folder, _ = digits
    (scans := tmp_path / "scans" / "sub").mkdir(parents=True)
    names = sorted(p.name for p in folder.glob("*.png"))[:2]
    for name in names:
        (scans / name).write_bytes((folder / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    expected = [f"scans/sub/{name}" for name in names]
    for argument in (".", "./scans", "scans/"):
        res = invoke(onnx_model, argument, "--format", "jsonl")
        assert res.exit_code == 0, res.output
        assert [json.loads(line)["path"] for line in res.stdout.splitlines()] == expected, argument
    absolute = invoke(onnx_model, str(tmp_path / "scans"), "--format", "jsonl")
    assert [json.loads(line)["path"] for line in absolute.stdout.splitlines()] == [str(tmp_path / p) for p in expected]


def test_text_output_lists_the_classified_files(onnx_model, digits):
    folder, truth = digits
    files = sorted(folder.glob("*.png"))[:3]
    res = invoke(onnx_model, *files, "-k", "2")
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 0 and [line.split("\t")[0] for line in lines] == list(map(str, files))
    assert all(len(line.split("\t")[1].split()) == 4 for line in lines)  # 2 labels with 2 probabilities


def test_classifying_with_an_onnx_file_imports_neither_torch_nor_mlflow(onnx_model, digits):
    folder, _ = digits
    script = (
        "import sys\n"
        "import zoo.cli.main\n"
        "loaded = {m for m in ('torch', 'mlflow') if m in sys.modules}\n"
        f"zoo.cli.main.cli.main(['classify', {str(onnx_model)!r}, {str(folder)!r}, '--format', 'json',"
        " '--batch-size', '8'], standalone_mode=False)\n"
        "loaded |= {m for m in ('torch', 'mlflow') if m in sys.modules}\n"
        "print('LOADED', sorted(loaded), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=command_env())
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 30
    assert "LOADED []" in proc.stderr


def classify_in_subprocess(uri: str, png: Path) -> tuple[list, list[str]]:
    """`zoo classify URI PNG --format json` in a fresh interpreter: its rows and which of torch/mlflow it imported."""
    script = (
        "import sys\n"
        "import zoo.cli.main\n"
        f"zoo.cli.main.cli.main(['classify', {uri!r}, {str(png)!r}, '--format', 'json'], standalone_mode=False)\n"
        "print('LOADED', ','.join(sorted(m for m in ('torch', 'mlflow') if m in sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=command_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr.split("LOADED ")[-1].strip().split(",")


def onnx_source(path: Path) -> str:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["source_uri"]


def test_a_registered_model_ships_its_onnx_so_even_the_first_call_needs_no_torch(registered_model, digits, tmp_path):
    folder, _ = digits
    png = sorted(folder.glob("*.png"))[0]
    first, loaded = classify_in_subprocess("models:/digits@champion", png)
    assert loaded == ["mlflow"]  # the alias is looked up and the shipped graph downloaded: no export, no torch
    cached = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".onnx"  # no partial file left beside it
    assert onnx_source(cached[0]) == "models:/digits"  # the graph logged at registration, not a local export
    with_torch = invoke("models:/digits@champion", png, "--format", "json", "--runtime", "torch")
    torch_rows = json.loads(with_torch.stdout)
    assert [[t["label"] for t in r["top"]] for r in first] == [[t["label"] for t in r["top"]] for r in torch_rows]
    assert [t["probability"] for r in first for t in r["top"]] == pytest.approx(
        [t["probability"] for r in torch_rows for t in r["top"]], abs=1e-4)

    again, loaded = classify_in_subprocess("models:/digits@champion", png)
    assert again == first and loaded == ["mlflow"]


@pytest.mark.slow
def test_a_model_that_ships_no_onnx_is_exported_once_then_served_from_the_cache(registered_model, digits, tmp_path,
                                                                                 monkeypatch):
    from training import tracking

    use_tracking_store(tmp_path / "store", monkeypatch)  # a store of its own: the shared one stays as it is
    result = registered_model["result"]
    with mlflow.start_run():  # as an earlier version of zoo logged it: the program only
        uri = tracking.log_model(result.network, model_name="mnist_cnn", normalization=result.normalization,
                                 input_shape=(1, 28, 28), class_names=result.class_names, registered_name="plain",
                                 onnx=False)
    assert not any(a.path.endswith(".onnx") for a in mlflow.MlflowClient().list_logged_model_artifacts(
        uri.removeprefix("models:/"), "artifacts"))
    folder, _ = digits
    png = sorted(folder.glob("*.png"))[0]
    first, loaded = classify_in_subprocess("models:/plain/1", png)
    assert "torch" in loaded  # exported here, once
    cached = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(cached) == 1 and onnx_source(cached[0]) == "models:/plain/1"
    again, loaded = classify_in_subprocess("models:/plain/1", png)
    assert again == first and loaded == ["mlflow"]


def test_a_reader_that_stops_early_ends_classify_quietly(onnx_model, digits):
    """`zoo classify ... | head -1`: no traceback, no broken-pipe error, exit 1."""
    folder, _ = digits
    many = [str(folder)] * 100  # 3,000 rows: more than a pipe holds, so the writer meets the closed end
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "classify", str(onnx_model), *many, "--format", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=command_env())
    assert json.loads(proc.stdout.readline())["error"] is None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "Broken pipe" not in stderr, stderr


def probabilities(rows: list[dict]) -> list[float]:
    return [t["probability"] for r in rows for t in r["top"]]


@pytest.mark.slow
def test_the_onnx_cache_follows_a_moved_alias_and_never_mixes_two_stores(registered_model, digits, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from training import tracking
    from zoo.normalization import Normalization

    folder, _ = digits
    png = sorted(folder.glob("*.png"))[0]
    shared, _ = classify_in_subprocess("models:/digits@champion", png)  # the shared store's digits v1, cached
    use_tracking_store(tmp_path / "store", monkeypatch)  # a second store, the same cache folder
    result, client = registered_model["result"], MlflowClient()

    def logged(normalization: Normalization) -> str:
        with mlflow.start_run():  # the same weights under another normalization give other probabilities
            return tracking.log_model(result.network, model_name="mnist_cnn", normalization=normalization,
                                      input_shape=(1, 28, 28), class_names=result.class_names, onnx=False)

    # This store's digits v1, registered from the model's folder as older clients did: no logged-model id,
    # so its cache key falls back to digits-v1, the key of the shared store's version too.
    half = logged(Normalization((0.5,), (0.5,)))
    client.create_registered_model("digits")
    v1 = client.create_model_version("digits", mlflow.get_logged_model(half.removeprefix("models:/")).artifact_location)
    assert v1.model_id is None
    client.set_registered_model_alias("digits", "champion", "1")
    other, _ = classify_in_subprocess("models:/digits@champion", png)
    on_torch = json.loads(invoke("models:/digits@champion", png, "--format", "json", "--runtime", "torch").stdout)
    assert probabilities(other) == pytest.approx(probabilities(on_torch), abs=1e-4)  # this store's model...
    assert probabilities(other) != pytest.approx(probabilities(shared), abs=1e-3)  # ...not the other store's graph

    # The alias moves to v2 (the shared store's network and normalization): classify follows it.
    version = registration.register(logged(result.normalization), "digits", "champion")
    assert str(version) == str(client.get_model_version_by_alias("digits", "champion").version) == "2"
    moved, _ = classify_in_subprocess("models:/digits@champion", png)
    assert probabilities(moved) == pytest.approx(probabilities(shared), abs=1e-4)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 3  # one graph per model, none reused


def test_a_runs_uri_and_inverted_ink_classify_as_the_registered_model(registered_model, digits, tmp_path):
    folder, truth = digits
    pngs = sorted(folder.glob("*.png"))[:10]
    by_alias = json.loads(invoke("models:/digits@champion", *pngs, "--format", "json").stdout)
    run_uri = f"runs:/{registered_model['result'].run_id}/model"
    by_run = invoke(run_uri, *pngs, "--format", "json")
    assert by_run.exit_code == 0, by_run.output
    assert [r["label"] for r in json.loads(by_run.stdout)] == [r["label"] for r in by_alias]
    assert sum(r["label"] == truth[Path(r["path"]).name] for r in by_alias) >= 8  # about 95 % on test digits

    # Dark ink on light paper, as a scan or a photo of a digit gives: --invert turns it back into MNIST's form.
    paper = tmp_path / "paper"
    paper.mkdir()
    for png in pngs:
        Image.fromarray(255 - np.asarray(Image.open(png))).save(paper / png.name)
    inverted = invoke("models:/digits@champion", paper, "--invert", "--format", "json")
    assert inverted.exit_code == 0, inverted.output
    assert [r["label"] for r in json.loads(inverted.stdout)] == [r["label"] for r in by_alias]
    as_is = json.loads(invoke("models:/digits@champion", paper, "--format", "json").stdout)
    assert sum(r["label"] == truth[Path(r["path"]).name] for r in as_is) <= 5  # what --invert is for


@pytest.mark.slow
def test_export_fails_with_exit_1_beyond_its_tolerance_and_zoo_debug_shows_why(registered_model, tmp_path):
    out = tmp_path / "strict.onnx"
    strict = CliRunner().invoke(cli, ["export", "models:/digits@champion", "-o", str(out), "--tolerance", "1e-12"])
    assert strict.exit_code == 1, strict.output
    assert strict.stderr.startswith("Error: ONNX export of models:/digits@champion differs from PyTorch by ")
    assert "(tolerance 1e-12)" in strict.stderr and "ZOO_DEBUG=1" in strict.stderr and "Traceback" not in strict.stderr
    loose = CliRunner().invoke(cli, ["export", "models:/digits@champion", "-o", str(out), "--tolerance", "1e-3"])
    assert loose.exit_code == 0 and out.is_file(), loose.output
    # ZOO_DEBUG=1: the exception itself (a traceback in a terminal), not the one line.
    debug = subprocess.run([sys.executable, "-m", "zoo.cli", "export", "models:/digits@champion", "-o", str(out),
                            "--tolerance", "1e-12"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "ZOO_DEBUG": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ParityError: ONNX export of models:/digits@champion differs" in debug.stderr


def test_a_local_model_folder_saved_over_is_classified_by_the_new_model(registered_model, digits, tmp_path, monkeypatch):
    """The ONNX cache is keyed on what the model is, not on the path typed: another model saved into
    ./model answers with its own classes, not the old graph's."""
    from training import tracking

    folder, _ = digits
    pngs = sorted(folder.glob("*.png"))[:5]
    model = tmp_path / "model"
    mlflow.artifacts.download_artifacts("models:/digits@champion", dst_path=str(model))
    use_tracking_store(tmp_path / "store", monkeypatch)  # both calls below under this one store
    first = invoke(model, *pngs, "--format", "json")
    assert first.exit_code == 0, first.output
    assert {r["label"] for r in json.loads(first.stdout)} <= set(registered_model["result"].class_names)

    result = registered_model["result"]
    renamed = [f"digit {c}" for c in result.class_names]
    with mlflow.start_run():  # the same network under other class names: a model that answers differently
        uri = tracking.log_model(result.network, model_name="mnist_cnn", normalization=result.normalization,
                                 input_shape=(1, 28, 28), class_names=renamed, onnx=True)
    import shutil

    shutil.rmtree(model)
    mlflow.artifacts.download_artifacts(uri, dst_path=str(model))
    second = invoke(model, *pngs, "--format", "json")
    assert second.exit_code == 0, second.output
    assert [r["label"] for r in json.loads(second.stdout)] == [f"digit {r['label']}" for r in json.loads(first.stdout)]
