"""The hand-written backpropagation and SGD of scratch_mlp against autograd and torch.optim, in float64."""

from __future__ import annotations

import pytest
import torch

from zoo.models.scratch_mlp import ScratchMLP, ScratchSGD, logistic_cross_entropy
from zoo.models.registry import create_model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def batch(mnist_5k) -> tuple[torch.Tensor, torch.Tensor]:
    """12 real digits (the lab's minibatch size) as float64 pixels in [0, 1]."""
    return mnist_5k.train.images[:12].double() / 255, mnist_5k.train.labels[:12]


@pytest.mark.parametrize("init", ["xavier", "normal"])
def test_hand_written_gradients_equal_autograd(batch, init: str) -> None:
    images, labels = batch
    torch.manual_seed(0)
    net = ScratchMLP(init=init).double()
    with torch.no_grad():
        _, activations = net.layers(images)
        manual = net.gradients(activations, labels)
    autograd = torch.autograd.grad(logistic_cross_entropy(net(images), labels), net.parameter_list())
    assert len(manual) == len(autograd) == 6
    for name, m, a in zip(["w1", "b1", "w2", "b2", "w3", "b3"], manual, autograd):
        assert m.shape == a.shape, name
        assert relative_error(m, a) < 1e-5, name


@pytest.mark.parametrize("momentum", [0.0, 0.4])
def test_sgd_steps_equal_torch_sgd_on_autograd_gradients(batch, momentum: float) -> None:
    """Five steps of the lab's update (u = gamma u + alpha g / m) land where torch.optim.SGD does."""
    images, labels = batch
    torch.manual_seed(0)
    scratch = ScratchMLP().double()
    reference = ScratchMLP().double()
    reference.load_state_dict(scratch.state_dict())
    initial = [p.detach().clone() for p in scratch.parameter_list()]
    ours = ScratchSGD(scratch.parameter_list(), lr=0.5, momentum=momentum)
    theirs = torch.optim.SGD(reference.parameter_list(), lr=0.5, momentum=momentum)
    for step in range(5):
        part = slice(2 * step, 2 * step + 8)  # a different batch each step, so the momentum matters
        with torch.no_grad():
            _, activations = scratch.layers(images[part])
            ours.step(scratch.gradients(activations, labels[part]))
        theirs.zero_grad()
        logistic_cross_entropy(reference(images[part]), labels[part]).backward()
        theirs.step()
    for p, q, before in zip(scratch.parameter_list(), reference.parameter_list(), initial):
        assert relative_error(p.detach(), before) > 1e-4  # the parameters did move
        assert relative_error(p.detach(), q.detach()) < 1e-5


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="xavier, normal"):
        create_model("scratch_mlp", init="uniform")
    with pytest.raises(ValueError, match="momentum"):
        ScratchSGD([torch.zeros(1)], lr=0.1, momentum=1.5)


def test_xavier_initialization_scales_weights_by_layer_size() -> None:
    torch.manual_seed(0)
    xavier, normal = ScratchMLP(init="xavier"), ScratchMLP(init="normal")
    assert xavier.weights[0].std().item() == pytest.approx((2 / (784 + 30)) ** 0.5, rel=0.05)
    assert normal.weights[0].std().item() == pytest.approx(1.0, rel=0.05)
    assert all(b.abs().sum() == 0 for b in xavier.biases)


def test_scratch_mlp_refuses_settings_its_own_sgd_does_not_have() -> None:
    from training.train import trainer_for
    from training.train_config import TrainConfig

    with pytest.raises(ValueError, match="own SGD"):
        trainer_for(TrainConfig(model="scratch_mlp", optimizer="adam"), create_model("scratch_mlp"))
    with pytest.raises(ValueError, match="own SGD"):
        trainer_for(TrainConfig(model="scratch_mlp", weight_decay=1e-4), create_model("scratch_mlp"))
