"""The renorm job: fold and BN recalibration on real images, the class-folder rules, the tracked job, classify."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

from zoo.cli.main import ZooGroup
from zoo.cli.main import cli as zoo_cli
from zoo.cli.renorm import renorm as renorm_command
from training.renorm_demo import as_rgb, save_checkpoint, train_small_resnet, write_image_folder
from zoo.data import load_dataset
from zoo.errors import UsageError
from zoo.image_folder import decode_crops, list_labelled_files, map_folders
from zoo.normalization import (
    IMAGENET, BorderPaddedConv2d, Normalization, fold_normalization, parse_spec, recalibrate_batchnorm,
)
from zoo.pretrained import load_pretrained

SIZE = 28  # Fashion-MNIST's own size: no resize, the cheapest input a ResNet-18 still takes
FOLD_TOLERANCE = 1e-4  # max |logit difference| relative to the largest |logit|: float32 rounding only
FOLD_ABS_TOLERANCE = 1e-3  # max |logit difference| of a fold: float32 rounding (measured under 1e-4)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def real_batch(fashion) -> torch.Tensor:
    """64 real Fashion-MNIST images as uint8 RGB crops."""
    return as_rgb(fashion.test.subset(64), SIZE).images


def calibrated_resnet(real_batch: torch.Tensor, normalization: Normalization) -> nn.Module:
    """A random-weight resnet18 whose BatchNorm statistics come from real images (not the trivial 0/1 defaults)."""
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10)
    recalibrate_batchnorm(network, [normalization.apply(real_batch)])
    return network.eval()


def logits(network: nn.Module, pixels: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    with torch.inference_mode():
        return network(normalization.apply(pixels))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def resnet_and_reference(real_batch) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated resnet18 (conv1: 7x7, zero padding 3) and its logits under its own (ImageNet) normalization."""
    network = calibrated_resnet(real_batch, IMAGENET)
    return network, logits(network, real_batch, IMAGENET)


GRID = [f"{mean}:{std}" for mean in (-3, -1, 0.5, 3) for std in (0.05, 0.3, 1)]


@pytest.mark.parametrize("spec", [*GRID, "0:1", "0.1,-2,3:0.2,1,0.07"])
def test_fold_is_exact_borders_included(real_batch, resnet_and_reference, spec):
    original, reference = resnet_and_reference
    target = parse_spec(spec, 3)
    folded = fold_normalization(copy.deepcopy(original), IMAGENET, target)
    # conv1's border now holds what ImageNet's normalization maps to zero, in the new units.
    expected = [(m - mt) / st for m, mt, st in zip(IMAGENET.mean, target.mean, target.std)]
    assert isinstance(folded.conv1, BorderPaddedConv2d) and folded.conv1.padding == (0, 0)
    assert folded.conv1.pad_value == pytest.approx(expected)
    new = logits(folded, real_batch, target)
    assert torch.equal(new.argmax(dim=1), reference.argmax(dim=1))
    assert float((new - reference).abs().max()) < FOLD_ABS_TOLERANCE
    assert relative_difference(new, reference) < FOLD_TOLERANCE
    # Unfolded, the same network under the new normalization is far off.
    assert relative_difference(logits(original, real_batch, target), reference) > 0.01


def test_fold_of_a_std_change_keeps_zero_padding(real_batch, resnet_and_reference):
    original, reference = resnet_and_reference
    same_mean = Normalization(IMAGENET.mean, (0.5, 0.5, 0.5))
    folded = fold_normalization(copy.deepcopy(original), IMAGENET, same_mean)
    assert type(folded.conv1) is nn.Conv2d and folded.conv1.padding == (3, 3)  # zeros still stand for the mean
    assert relative_difference(logits(folded, real_batch, same_mean), reference) < FOLD_TOLERANCE


def test_folding_a_folded_model_again_stays_exact(real_batch, resnet_and_reference):
    original, reference = resnet_and_reference
    middle, last = parse_spec("0.5:0.5", 3), parse_spec("0.1,-2,3:0.2,1,0.07", 3)
    twice = fold_normalization(fold_normalization(copy.deepcopy(original), IMAGENET, middle), middle, last)
    assert relative_difference(logits(twice, real_batch, last), reference) < FOLD_TOLERANCE
    back = fold_normalization(twice, last, IMAGENET)  # home again: the border is zeros again
    assert back.conv1.pad_value == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    assert relative_difference(logits(back, real_batch, IMAGENET), reference) < FOLD_TOLERANCE
    assert relative_difference(back.bn1.running_mean, original.bn1.running_mean) < FOLD_TOLERANCE


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on the original conv
@pytest.mark.parametrize(
    "kernel, padding, mode",
    [(5, 2, "zeros"), (4, "same", "zeros"), (5, "valid", "zeros"), (5, 2, "reflect"), (5, 2, "replicate"), (5, 2, "circular")],
)
def test_fold_is_exact_for_every_padding_of_a_first_convolution(real_batch, kernel, padding, mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel, padding=padding, padding_mode=mode, bias=False)
    network = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
    recalibrate_batchnorm(network, [IMAGENET.apply(real_batch)])
    target = parse_spec("-2:0.1", 3)
    folded = fold_normalization(copy.deepcopy(network), IMAGENET, target)
    # Only zero padding needs a new border: "same" with an even kernel pads 1 left/top and 2 right/bottom.
    padded = mode == "zeros" and padding != "valid"
    assert isinstance(folded[0], BorderPaddedConv2d) == padded
    if padding == "same":
        assert folded[0].border == (1, 2, 1, 2)
    reference = logits(network, real_batch, IMAGENET)
    assert relative_difference(logits(folded, real_batch, target), reference) < FOLD_TOLERANCE
    assert relative_difference(logits(network, real_batch, target), reference) > 10 * FOLD_TOLERANCE  # unfolded


def test_fold_refuses_an_unknown_padding_mode_and_grouped_convolutions():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    conv.padding_mode = "mirror"  # not one torch makes, but a subclass could
    with pytest.raises(ValueError, match="padding_mode 'mirror'; valid: zeros, reflect, replicate, circular"):
        fold_normalization(conv, IMAGENET, parse_spec("0:1", 3))
    with pytest.raises(ValueError, match="groups=1 only"):
        fold_normalization(nn.Conv2d(3, 6, 3, groups=3), IMAGENET, parse_spec("0:1", 3))
    alone = fold_normalization(nn.Conv2d(3, 6, 3, padding=1), IMAGENET, parse_spec("0:1", 3))
    assert isinstance(alone, BorderPaddedConv2d)  # a bare convolution is replaced, not changed in place


def test_renorm_warns_when_a_fold_is_not_exact(real_batch, capsys):
    from training.renorm import Crops, score, warn_if_fold_inexact

    torch.manual_seed(0)  # a layer before the first Conv2d: the fold cannot know what it does to the input
    network = nn.Sequential(nn.Tanh(), nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).eval()
    crops, target = Crops(real_batch, torch.zeros(len(real_batch), dtype=torch.long)), parse_spec("0:1", 3)
    reference = logits(network, real_batch, IMAGENET)
    folded = fold_normalization(copy.deepcopy(network), IMAGENET, target)
    warn_if_fold_inexact(score(folded, crops, target, reference, torch.device("cpu"), 32, "fold"), reference, "tanh-net under 0:1")
    assert "warning: fold of tanh-net under 0:1 is not exact" in capsys.readouterr().err
    exact = fold_normalization(copy.deepcopy(network[1:]), IMAGENET, target)  # without the Tanh it is
    plain = logits(network[1:], real_batch, IMAGENET)
    warn_if_fold_inexact(score(exact, crops, target, plain, torch.device("cpu"), 32, "fold"), plain, "conv-net")
    assert "warning" not in capsys.readouterr().err


def test_bn_recalibrate_moves_statistics_to_the_new_normalization(real_batch):
    network = calibrated_resnet(real_batch[:32], IMAGENET)
    before = network.bn1.running_mean.clone()
    target = parse_spec("0:1", 3)
    calibration = real_batch[32:]
    seen = recalibrate_batchnorm(network, [target.apply(calibration[:16]), target.apply(calibration[16:])])
    assert seen == 32
    with torch.inference_mode():  # bn1's statistics are now those of conv1's output on the calibration images
        conv_out = network.conv1(target.apply(calibration))
    assert torch.allclose(network.bn1.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert (network.bn1.running_mean - before).abs().max() > 0.05
    assert not network.training and network.bn1.momentum == 0.1  # eval mode and the momentum restored


def test_class_folders_map_by_synset_index_by_name_or_by_sorted_index():
    synsets = [f"n{i:08d}" for i in (3, 1, 2)]
    assert map_folders(synsets, ["a", "b", "c"]) == ({"n00000001": 0, "n00000002": 1, "n00000003": 2}, "imagenet-synsets")
    classes = ["T-shirt/top", "Trouser", "Ankle boot"]
    assert map_folders(["ankle_boot", "T-shirt_top"], classes) == ({"T-shirt_top": 0, "ankle_boot": 2}, "class-names")
    assert map_folders(["x", "y", "z"], classes)[1] == "sorted-index"
    with pytest.raises(ValueError, match="name no class"):
        map_folders(["x", "y"], classes)
    with pytest.raises(ValueError, match="all of them must be present"):
        map_folders(synsets[:2], classes)


def test_torchvision_imagenet_root_reads_its_val_folder(tmp_path):
    from zoo.image_folder import image_folder_root

    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    assert image_folder_root(tmp_path) == tmp_path  # a plain folder is taken as it is
    (tmp_path / "meta.bin").write_bytes(b"")  # torchvision's ImageNet layout: meta.bin beside train/ and val/
    assert image_folder_root(tmp_path) == tmp_path / "val"
    with pytest.raises(UsageError, match="no such image folder"):
        image_folder_root(tmp_path / "missing")


def renorm_cli() -> ZooGroup:
    """The renorm command under the zoo group's error handling (exit 2 for bad usage)."""
    return ZooGroup(commands={"renorm": renorm_command})


@pytest.fixture(scope="module")
def fashion_folder(fashion, tmp_path_factory) -> Path:
    """200 real Fashion-MNIST test images as PNG class folders (``T-shirt_top``, ``Trouser``, ...)."""
    return write_image_folder(fashion.test.subset(200), fashion.classes, tmp_path_factory.mktemp("fashion") / "images")


def test_calibration_images_are_disjoint_from_evaluation_images(fashion, fashion_folder):
    from training.renorm import RenormConfig, split_files

    files, classes = list_labelled_files(fashion_folder, fashion.classes)
    assert files.class_mapping == "class-names" and classes == fashion.classes
    assert [fashion.classes[int(y)].replace("/", "_") for y in files.labels] == [f.parent.name for f in files.files]
    config = RenormConfig(data=str(fashion_folder), adaptations=["none", "bn-recalibrate"], limit=50, calibration=30)
    evaluation, calibration = split_files(config, files, classes)
    assert len(evaluation) == 50 and len(calibration) == 30
    assert not set(evaluation.files) & set(calibration.files)
    assert len(set(evaluation.labels.tolist())) > 5  # --limit draws across classes, not the first folders


def test_crops_spill_to_a_memmap_on_disk_beyond_the_memory_limit(fashion_folder, tmp_path):
    files, _ = list_labelled_files(fashion_folder, None)
    in_memory = decode_crops(files.files[:20], resize=32, crop=28)
    spill = tmp_path / "spill"
    on_disk = decode_crops(files.files[:20], resize=32, crop=28, memory_limit_bytes=0, spill_dir=spill)
    assert in_memory.shape == (20, 3, 28, 28) and in_memory.dtype == torch.uint8
    assert torch.equal(in_memory, on_disk)
    assert str(spill) in Path("/proc/self/maps").read_text()  # mapped from a file there...
    assert not list(spill.iterdir())  # ...that is already unlinked: nothing left behind


def test_renorm_reads_zoo_trains_layout_and_leaves_out_unreadable_files(fashion_folder, tmp_path):
    import shutil

    from training.renorm import RenormConfig, decode

    root = tmp_path / "split"
    shutil.copytree(fashion_folder, root / "val")
    shutil.copytree(fashion_folder, root / "train")
    (root / "val" / "Trouser" / "notes.txt").write_text("not an image")
    broken = sorted((root / "val" / "Bag").glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    files, classes = list_labelled_files(root, None)
    assert files.root == root / "val" and len(files) == 200  # the held-out split; notes.txt is no image file
    crops = decode(RenormConfig(data=str(root)), files, 32, 28, "decoding")
    assert crops.skipped == 1 and len(crops.images) == len(crops.labels) == 199
    bag = classes.index("Bag")
    assert int((crops.labels == bag).sum()) == int((files.labels == bag).sum()) - 1  # its label left out with it


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapt", "retrain"], "unknown adaptation retrain; valid: none, bn-recalibrate, fold"),
        (["--norm", "0.5"], "is not imagenet or identity or MEAN:STD"),
        (["--norm", "0:0"], "std must be positive"),
        (["--grid-mean", "-1", "1", "3"], "give both --grid-mean and --grid-std"),
        (["--register", "x", "--register-norm", "0:1"], "is not among the evaluated normalizations"),
        (["--weights", "missing.pt"], "no state dict at missing.pt"),
        (["--model", "mnist_cnn"], "model 'mnist_cnn' has no torchvision weights"),
        (["--weights", "IMAGENET1K_V9"], "unknown weights 'IMAGENET1K_V9' for resnet18; valid: DEFAULT, IMAGENET1K_V1"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(fashion_folder, args, message):
    result = CliRunner().invoke(renorm_cli(), ["renorm", "--data", str(fashion_folder), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.fixture(scope="module")
def trained_checkpoint(fashion, tmp_path_factory) -> Path:
    """resnet18 trained here on 512 real Fashion-MNIST images (28x28 RGB) under ImageNet's normalization."""
    network, _ = train_small_resnet(fashion, IMAGENET, train_images=512, size=SIZE)
    return save_checkpoint(network, IMAGENET, fashion.classes, tmp_path_factory.mktemp("weights") / "resnet18.pt")


def child_runs(parent_run_id: str):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.slow
def test_renorm_job_tracks_every_pair_and_registers_a_model_that_classifies(trained_checkpoint, fashion_folder, fashion, tmp_path):
    result = CliRunner().invoke(renorm_cli(), [
        "renorm", "--model", "resnet18", "--weights", str(trained_checkpoint), "--data", str(fashion_folder),
        "--norm", "imagenet", "--norm", "0:1", "--grid-mean", "-3", "3", "3", "--grid-std", "0.05", "1", "2",
        "--adapt", "none", "--adapt", "bn-recalibrate,fold", "--calibration", "50", "--limit", "100", "--resize", "28", "--crop", "28",
        "--workers", "0", "--register", "fashion-renorm", "--alias", "zero-one", "--register-norm", "0:1",
        "--register-adapt", "fold", "--experiment", "renorm-test", "--format", "json",
    ])
    assert result.exit_code == 0, result.output
    assert "not exact" not in result.stderr  # renorm warns when a fold misses its reference
    report = json.loads(result.stdout)  # progress bars go to stderr
    rows = {(r["normalization"], r["adaptation"]): r for r in report["results"]}
    assert len(rows) == (2 + 6) * 3

    children = child_runs(report["parent_run_id"])
    assert len(children) == 24
    parent = mlflow.get_run(report["parent_run_id"])
    assert mlflow.get_experiment(parent.info.experiment_id).name == "renorm-test"
    assert set(children["experiment_id"]) == {parent.info.experiment_id}
    assert set(children["params.adaptation"]) == {"none", "bn-recalibrate", "fold"}
    assert (children["metrics.top5"] >= children["metrics.top1"]).all()
    # The weights under their own normalization classify well above chance (0.1), and folding 0:1 into
    # the first layer gives that accuracy back, where 0:1 without adaptation may not.
    own, folded = rows[("imagenet", "none")]["top1"], rows[("0:1", "fold")]["top1"]
    assert own >= 0.25 and folded == pytest.approx(own, abs=0.02), (own, folded)  # measured: 0.4 after one epoch
    assert sorted(children["metrics.top1"]) == pytest.approx(sorted(r["top1"] for r in rows.values()))
    # What a person browsing the runs reads: a description and tags on the parent and every child.
    note = parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["zoo.kind"] == "renorm" and "Re-evaluated the pretrained **resnet18**" in note
    assert f"| 0:1 | {100 * rows[('0:1', 'none')]['top1']:.1f} %" in note
    assert [i.dataset.name for i in parent.inputs.dataset_inputs] == [f"{fashion_folder.name}-evaluation"]
    assert set(children["tags.zoo.kind"]) == {"renorm-eval"}
    assert children["tags.mlflow.note.content"].str.contains("top-1").all()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(report["parent_run_id"])}
    assert {"renorm_results.csv", "heatmap_top1_none.png", "heatmap_top1_fold.png", "heatmap_top1_bn-recalibrate.png"} <= artifacts

    assert rows[("imagenet", "none")]["top1"] > 0.3  # three times chance after 512 training images
    # Every fold child run, mean -3 to 3 and std 0.05 to 1 included, is the original network to float rounding;
    # unadapted, 0:1 changes most predictions.
    folds = children[children["params.adaptation"] == "fold"]
    assert len(folds) == 8 and (folds["metrics.agreement"] == 1.0).all()
    assert (folds["metrics.max_abs_logit_diff"] < FOLD_ABS_TOLERANCE).all()
    assert rows[("0:1", "none")]["agreement"] < 0.5

    # The registered fold, exported by `zoo export` and run by `zoo classify` on onnxruntime, labels the
    # images as the original network does under its own normalization.
    onnx_path = tmp_path / "folded.onnx"
    exported = CliRunner().invoke(zoo_cli, ["export", "models:/fashion-renorm@zero-one", "-o", str(onnx_path)])
    assert exported.exit_code == 0, exported.output
    import onnx

    assert "Pad" in {node.op_type for node in onnx.load(str(onnx_path)).graph.node}  # conv1's border, in the graph
    classified = CliRunner().invoke(zoo_cli, ["classify", str(onnx_path), str(fashion_folder), "--top-k", "1", "--format", "json"])
    assert classified.exit_code == 0, classified.output
    predicted = {p["path"]: p["label"] for p in json.loads(classified.stdout)}
    metadata = mlflow.models.get_model_info("models:/fashion-renorm@zero-one").metadata
    assert metadata["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3} and metadata["adaptation"] == "fold"
    version = mlflow.MlflowClient().get_model_version_by_alias("fashion-renorm", "zero-one")
    assert version.tags["dataset"] == fashion_folder.name  # the evaluation data, not the weights file
    assert version.tags["weights"] == str(trained_checkpoint)
    files, _ = list_labelled_files(fashion_folder, fashion.classes)
    original = load_pretrained("resnet18", str(trained_checkpoint)).network
    expected = logits(original, decode_crops(files.files, resize=SIZE, crop=SIZE), IMAGENET).argmax(dim=1)
    assert len(predicted) == len(files) == 200
    assert predicted == {str(f): fashion.classes[int(i)] for f, i in zip(files.files, expected)}
    on_torch = CliRunner().invoke(zoo_cli, ["classify", "models:/fashion-renorm@zero-one", str(fashion_folder),
                                            "--runtime", "torch", "--top-k", "1", "--format", "json"])
    assert on_torch.exit_code == 0, on_torch.output
    assert {p["path"]: p["label"] for p in json.loads(on_torch.stdout)} == predicted  # the logged model itself, too
    correct = sum(predicted[str(f)] == fashion.classes[int(y)] for f, y in zip(files.files, files.labels))
    assert correct / len(files) > 0.2  # twice chance


@pytest.mark.slow
def test_renorm_reads_calibration_data_a_source_norm_and_spills_with_decoding_workers(fashion, fashion_folder, tmp_path):
    torch.manual_seed(0)
    weights = save_checkpoint(torchvision.models.resnet18(num_classes=10), IMAGENET, fashion.classes, tmp_path / "r18.pt")
    calibration = write_image_folder(fashion.train.subset(20), fashion.classes, tmp_path / "calibration")
    spill = tmp_path / "spill"

    def renorm(*args: str) -> tuple[dict, dict]:
        result = CliRunner().invoke(renorm_cli(), [
            "renorm", "--weights", str(weights), "--data", str(fashion_folder), "--limit", "40", "--resize", "28",
            "--crop", "28", "--norm", "0.5:0.5", "--adapt", "none,bn-recalibrate", "--calibration", "20",
            "--format", "json", *args])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        rows = {(r["normalization"], r["adaptation"]): r for r in report["results"]}
        return rows, mlflow.get_run(report["parent_run_id"]).data.params

    # Decoded by 2 worker processes into a memmap (a 0 GB memory limit), calibrated on another folder,
    # for weights said to be trained under 0.5/0.5 ...
    spilled, params = renorm("--calibration-data", str(calibration), "--source-norm", "0.5:0.5", "--workers", "2",
                             "--memory-limit-gb", "0", "--spill-dir", str(spill))
    assert (params["calibration_data"], params["calibration_images"], params["eval_images"]) == (str(calibration), "20", "40")
    assert set(params["source_mean"].split(",")) == set(params["source_std"].split(",")) == {"0.5"}
    assert spilled[("0.5:0.5", "none")]["agreement"] == 1.0  # evaluated under its own normalization: unchanged
    assert spill.is_dir() and not list(spill.iterdir())  # the memmap was there, and is gone
    # ... and in memory, in this process, under the checkpoint's own normalization (ImageNet's): 0.5/0.5
    # is then a change, and the same 40 images give the same top-1.
    in_memory, params = renorm("--workers", "0", "--calibration-data", str(calibration))
    assert (params["source_mean"], params["eval_images"]) == ("0.485,0.456,0.406", "40")
    assert in_memory[("0.5:0.5", "none")]["top1"] == spilled[("0.5:0.5", "none")]["top1"]
    assert in_memory[("0.5:0.5", "none")]["agreement"] < 1.0


def non_square_rgb_folder(fashion, root: Path, n: int = 40) -> Path:
    """``n`` real Fashion-MNIST images as 48x40 (width x height) RGB PNGs in class folders: the garment
    stretched across the width, on a paper colour of its own, with a coloured band at the left and right
    edges that a center crop cuts off and a stretch keeps."""
    from PIL import Image

    rng = np.random.default_rng(0)
    split = fashion.test.subset(n)
    for i, (image, label) in enumerate(zip(split.images, split.labels)):
        grey = np.asarray(Image.fromarray(image[0].numpy()).resize((48, 40), Image.Resampling.BILINEAR), np.float32) / 255
        paper, ink = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = paper * (1 - grey[..., None]) + ink * grey[..., None]
        rgb[:, :4], rgb[:, -4:] = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        folder = root / fashion.classes[int(label)].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb.round().astype(np.uint8), mode="RGB").save(folder / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_a_registered_renorm_model_is_served_with_the_preprocessing_it_was_scored_with(fashion, tmp_path):
    """resize 36 / crop 32 on 48x40 images: zoo classify (in worker processes too) and the pyfunc model
    decode as renorm scored (shorter side to 36, center crop 32), not by stretching the image to 32x32."""
    import pandas as pd

    from training.renorm import RenormConfig, renorm

    folder = non_square_rgb_folder(fashion, tmp_path / "images")
    torch.manual_seed(0)
    weights = save_checkpoint(torchvision.models.resnet18(num_classes=10), IMAGENET, fashion.classes, tmp_path / "r18.pt")
    result = renorm(RenormConfig(data=str(folder), weights=str(weights), norms=["0.5:0.5"], resize=36, crop=32,
                                 workers=0, register="wide", alias="served"))
    scored = mlflow.get_run(result.rows[0]["run_id"]).data.metrics["top1"]

    # What renorm scored, image by image: its own decoder, the same network and normalization.
    files, _ = list_labelled_files(folder, fashion.classes)
    network = load_pretrained("resnet18", str(weights)).network
    expected = torch.softmax(logits(network, decode_crops(files.files, resize=36, crop=32), parse_spec("0.5:0.5", 3)), 1)
    labels = [fashion.classes[int(i)] for i in expected.argmax(dim=1)]
    assert sum(label == fashion.classes[int(y)] for label, y in zip(labels, files.labels)) / len(files) == scored

    for runtime, workers in (("onnx", "0"), ("onnx", "2"), ("torch", "0")):
        classified = CliRunner().invoke(zoo_cli, ["classify", "models:/wide@served", str(folder), "--top-k", "1",
                                                  "--runtime", runtime, "--workers", workers, "--batch-size", "8",
                                                  "--format", "json"])
        assert classified.exit_code == 0, classified.output
        rows = {r["path"]: r for r in json.loads(classified.stdout)}
        assert [rows[str(f)]["label"] for f in files.files] == labels, (runtime, workers)
        assert [rows[str(f)]["top"][0]["probability"] for f in files.files] == pytest.approx(
            expected.max(dim=1).values.tolist(), abs=1e-4), (runtime, workers)

    served = mlflow.pyfunc.load_model("models:/wide@served").predict(
        pd.DataFrame({"image": [f.read_bytes() for f in files.files]}))
    assert list(served["label"]) == labels
    assert list(served["probability"]) == pytest.approx(expected.max(dim=1).values.tolist(), abs=1e-4)
