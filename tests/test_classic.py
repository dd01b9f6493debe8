"""Tests for nin.models.classic: the LeNet, AlexNet and VGG-11 baselines the seed compares NiN with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nin.errors import NinError
from nin.models import create_model, list_models
from nin.models.classic import Conv, ConvNet, Dense
from nin.models.specs import CLASSES, Pool

pytestmark = pytest.mark.usefixtures("one_thread")

# Parameter counts of the d2l models (1 input channel, 10 classes), and of their first fully
# connected layer: the seed's 48k (16x5x5x120), 26M (256x5x5x4096) and 102M (512x7x7x4096), plus biases.
COUNTS = {"lenet": (61_706, 48_120), "alexnet": (46_764_746, 26_218_496), "vgg11": (128_806_154, 102_764_544)}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_classic_model_has_recorded_counts():
    assert set(COUNTS) == set(list_models("classic"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_and_first_fully_connected_layer(name):
    model = create_model(name)
    total, first_fc = COUNTS[name]
    assert n_params(model) == total
    fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert n_params(fc) == first_fc


def test_alexnet_with_imagenet_input_and_classes_has_the_papers_62_million_parameters():
    model = create_model("alexnet", in_channels=3, num_classes=1000, input_size=(227, 227))
    assert n_params(model) == 62_378_344  # 256x6x6 -> 4096 -> 4096 -> 1000, without the paper's grouping


def test_lenet_is_d2ls_sigmoid_and_average_pooling_net():
    model = create_model("lenet")
    kinds = {type(m) for m in model.modules()}
    assert nn.Sigmoid in kinds and nn.AvgPool2d in kinds and nn.ReLU not in kinds
    with pytest.raises(NinError, match="dropout"):
        create_model("lenet", dropout=0.1)  # LeNet has no dropout to override


def test_width_and_batch_norm_options():
    model = create_model("vgg11", width=0.25, batch_norm=True, input_size=(32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_input_too_small_is_one_clear_error():
    with pytest.raises(NinError, match="too small"):
        create_model("alexnet", input_size=(32, 32))


def test_a_spec_builds_with_the_flatten_size_worked_out_in_advance():
    spec = (Conv(4, 3, padding=1), Pool("max", 2, 2), Dense(8), Dense(CLASSES))
    model = ConvNet(spec, num_classes=3, in_channels=2, input_size=(10, 6))
    fc1 = model.classifier.fc1[0]
    assert fc1.in_features == 4 * 5 * 3
    assert model(torch.randn(2, 2, 10, 6)).shape == (2, 3)


@pytest.mark.slow
def test_lenet_trains_like_any_model_and_learns(tmp_path, fashion_mnist):
    from nin.inference.trained import load_trained
    from nin.training.config import preset
    from nin.training.run import train

    cfg = preset("default")
    cfg.model.name, cfg.model.options = "lenet", {}
    cfg.data.subset, cfg.data.test_subset = 4096, 1000
    # A sigmoid net saturates under the NiN recipe's large steps; smaller batches and lr learn in seconds.
    cfg.train.epochs, cfg.train.lr, cfg.train.batch_size = 2, 0.2, 32
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.history[-1]["test_acc"] > 0.55  # chance is 0.1; this run reaches about 0.69
    assert n_params(load_trained(result.checkpoint).model) == COUNTS["lenet"][0]


@pytest.mark.slow
def test_a_resized_classic_model_is_built_for_the_new_size_and_reloads(tmp_path, fashion_mnist):
    from nin.inference.trained import load_trained
    from nin.training.config import preset
    from nin.training.run import train

    cfg = preset("default")
    cfg.model.name, cfg.model.options = "lenet", {}
    cfg.data.subset, cfg.data.test_subset, cfg.data.resize = 256, 100, 32
    cfg.train.epochs, cfg.train.max_steps = 1, 2
    result = train(cfg, tmp_path / "run", progress=False)
    model = load_trained(result.checkpoint).model
    assert model.input_size == (1, 32, 32)
    assert model.classifier.fc1[0].in_features == 16 * 6 * 6
