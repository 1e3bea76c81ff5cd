"""The zoo package on its own: registry, normalization, dataset catalog."""

import os
import subprocess
import sys

import pytest
import torch

from zoo.data import DatasetUnavailable, load_dataset, stratified_split
from zoo.normalization import Normalization, NormalizedModel
from zoo.models.registry import create_model, get_model_spec, list_models, register_model


def test_registry_lists_and_describes_mnist_cnn():
    assert "mnist_cnn" in list_models()
    assert list_models("mnist*") == [n for n in list_models() if n.startswith("mnist")]
    spec = get_model_spec("mnist_cnn")
    assert spec.input_shape == (1, 28, 28) and spec.num_classes == 10
    assert spec.normalization == Normalization((0.1307,), (0.3081,))


def test_unknown_and_duplicate_model_names_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"unknown model 'resnet1000'.*mnist_cnn"):
        get_model_spec("resnet1000")
    with pytest.raises(ValueError, match="'mnist_cnn' is already registered"):
        register_model("mnist_cnn", input_shape=(1, 28, 28), num_classes=10, normalization=Normalization.identity())(
            lambda **_: None
        )


def test_create_model_keeps_builder_defaults_for_none_options():
    net = create_model("mnist_cnn", num_classes=None)
    assert net.fc2.out_features == 10
    assert create_model("mnist_cnn", num_classes=3).fc2.out_features == 3


def test_mnist_cnn_is_the_pytorch_examples_net_layer_for_layer():
    net = create_model("mnist_cnn")
    layers = [(name, type(m).__name__) for name, m in net.named_children()]
    assert layers == [("conv1", "Conv2d"), ("conv2", "Conv2d"), ("dropout1", "Dropout"), ("dropout2", "Dropout"),
                      ("fc1", "Linear"), ("fc2", "Linear")]
    assert sum(p.numel() for p in net.parameters()) == 1_199_882  # the upstream Net's parameter count
    out = net.eval()(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.allclose(out.exp().sum(1), torch.ones(4))  # log-probabilities


def test_normalization_parses_broadcasts_and_rejects_bad_values():
    n = Normalization.parse("0.5", "0.25", channels=3)
    assert n.mean == (0.5, 0.5, 0.5) and n.as_params() == {"mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25"}
    assert Normalization.parse("-10", "10").as_params() == {"mean": "-10", "std": "10"}
    with pytest.raises(ValueError, match="std must be positive"):
        Normalization.parse("0.1307", "0")
    with pytest.raises(ValueError, match="not a number"):
        Normalization.parse("zero", "1")
    with pytest.raises(ValueError, match="give 1 or 3"):
        Normalization.parse("0.1,0.2", "1", channels=3)


def test_normalization_of_uint8_equals_torchvision_normalize_of_float_pixels():
    from torchvision.transforms import v2

    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    n = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = v2.Normalize(n.mean, n.std)(pixels.float() / 255)
    assert torch.allclose(n.apply(pixels), expected, atol=1e-6)
    net = torch.nn.Identity()
    assert torch.allclose(NormalizedModel(net, n)(pixels.float() / 255), expected, atol=1e-6)


def test_mnist_5k_is_real_digits_in_a_deterministic_stratified_split(mnist_5k):
    d = mnist_5k
    assert (len(d.train), len(d.val), len(d.test)) == (3500, 500, 1000)
    assert d.train.images.dtype == torch.uint8 and d.image_shape == (1, 28, 28)
    for split, per_class in ((d.train, 350), (d.val, 50), (d.test, 100)):
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    again = load_dataset("mnist-5k")
    assert torch.equal(again.test.images, d.test.images)
    # No image is in two splits: compare whole images.
    seen = {bytes(img.numpy()) for img in d.train.images}
    assert not any(bytes(img.numpy()) in seen for img in d.test.images)


@pytest.mark.parametrize("val_fraction, sizes", [(0.05, (3750, 250, 1000)), (0.75, (250, 3750, 1000))])
def test_any_valid_val_fraction_of_mnist_5k_gives_disjoint_splits_and_the_same_test_split(mnist_5k, val_fraction,
                                                                                          sizes):
    d = load_dataset("mnist-5k", val_fraction=val_fraction)
    assert (len(d.train), len(d.val), len(d.test)) == sizes
    seen = [{bytes(img.numpy()) for img in split.images} for split in (d.train, d.val, d.test)]
    assert seen[2] == {bytes(img.numpy()) for img in mnist_5k.test.images}  # test scores stay comparable
    assert sum(map(len, seen)) == len(set().union(*seen)) == 5000


def test_stratified_split_keeps_class_proportions():
    labels = torch.arange(10).repeat_interleave(100)
    a, b = stratified_split(labels, [0.8, 0.2], seed=3)
    assert len(a) == 800 and len(b) == 200
    assert torch.bincount(labels[b]).tolist() == [20] * 10
    assert set(a.tolist()).isdisjoint(b.tolist())


def test_fashion_mnist_loads_offline_from_the_debian_package(tmp_path):
    d = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert (len(d.train) + len(d.val), len(d.test)) == (60000, 10000)
    assert d.classes[9] == "Ankle boot" and d.image_shape == (1, 28, 28)


def test_missing_dataset_error_names_where_it_looked_and_the_offline_alternatives(tmp_path):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path) in message and "mnist-5k" in message
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; valid datasets: cifar10, cifar100, "
                       r"emnist-letters, fashion-mnist, kmnist, mnist, mnist-5k, stl10, svhn"):
        load_dataset("cifar")


@pytest.mark.parametrize("url, shown", [
    ("postgresql://zoo:s3cret@db:5432/optuna", "postgresql://zoo:***@db:5432/optuna"),
    ("postgresql://zoo@db/optuna?password=s3cret", "postgresql://zoo@db/optuna?password=***"),
    ("postgresql://zoo@db/optuna?sslmode=require&PassWord=s3cret&connect_timeout=5",
     "postgresql://zoo@db/optuna?sslmode=require&PassWord=***&connect_timeout=5"),
    ("https://mlflow.example.org/?access_token=s3cret&api_key=s3cret&client_secret=s3cret&x=1",
     "https://mlflow.example.org/?access_token=***&api_key=***&client_secret=***&x=1"),
    ("mysql://zoo:s3cret@db/optuna?sslkey=/home/zoo/s3cret.pem", "mysql://zoo:***@db/optuna?sslkey=***"),
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ("sqlite:///file:optuna.db?mode=ro&uri=true", "sqlite:///file:optuna.db?mode=ro&uri=true"),
])
def test_masked_url_hides_passwords_in_the_user_info_and_the_query(url, shown):
    from zoo.access import masked_url

    assert masked_url(url) == shown


class _RunsACommand:
    """What a weights file from a stranger can hold: an object whose unpickling runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_that_holds_more_than_tensors_is_refused_before_it_runs_anything(tmp_path):
    """`zoo train --weights FILE` (timm:) and `zoo renorm --weights FILE` read tensors and state dicts only."""
    from click.testing import CliRunner

    from zoo.cli.main import cli
    from zoo.pretrained import load_pretrained

    pytest.importorskip("timm")
    marker, path = tmp_path / "ran", tmp_path / "weights.pth"
    torch.save({"state_dict": _RunsACommand(marker)}, path)
    result = CliRunner().invoke(cli, ["train", "--model", "timm:test_resnet", "--weights", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert str(path) in line and "only tensors and state dicts" in line and "posix.system" in line
    with pytest.raises(ValueError, match="only tensors and state dicts") as refused:
        load_pretrained("resnet18", str(path))
    assert str(path) in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"ZOO_OFFLINE": "1"}],
                         ids=["hub-unreachable", "zoo-offline"])
def test_pretrained_timm_weights_without_a_network_fail_at_once_in_one_line(tmp_path, env):
    """No network (the hub's address refuses connections, or ZOO_OFFLINE=1) and an empty Hugging Face cache: one
    line that says what the weights need, without the hub's retries of every file."""
    pytest.importorskip("timm")
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "--model", "timm:resnet18", "--weights", "pretrained",
                             "--dry-run"],
                            capture_output=True, text=True, env={**os.environ, "HF_HOME": str(tmp_path / "hf"), **env})
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "timm:resnet18" in error and "need a network" in error, result.stderr
    assert str(tmp_path / "hf") in error and "--weights FILE" in error
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr and "ZOO_DEBUG" not in error
