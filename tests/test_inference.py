"""BatchNorm folding: same outputs, no BatchNorm left, the original untouched; the trainer evaluates with it."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_images
from torch import nn

from nin.data.loader import DeviceLoader
from nin.models import create_model, list_models
from nin.models.fold import fold_batchnorm, has_batchnorm
from nin.training.config import TrainConfig
from nin.training.trainer import Trainer, evaluate


def with_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_folded_model_gives_the_same_outputs(name, one_thread):
    torch.manual_seed(0)
    # VGG-11 at d2l's quarter width: folding is the same algebra per layer at any width, at 1/16 of the MACs
    model = with_stats(create_model(name, batch_norm=True, **({"width": 0.25} if name == "vgg11" else {}))).train()
    c, h, w = model.input_size
    x = torch.randn(2, c, min(h, 96), min(w, 96)) if name == "nin_d2l" else torch.randn(2, c, h, w)
    folded = fold_batchnorm(model)
    assert not has_batchnorm(folded) and has_batchnorm(model)
    assert model.training and not folded.training  # the original keeps its mode
    with torch.no_grad():
        expected = model.eval()(x)
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    names = [n for n, _ in model.named_stages()]
    assert [n for n, _ in folded.named_stages()] == names


def test_folding_does_not_change_the_original(one_thread):
    model = with_stats(create_model("nin28"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_folding_a_model_without_batchnorm_changes_nothing(one_thread):
    model = create_model("nin28", batch_norm=False).eval()
    x = torch.randn(3, 1, 28, 28)
    folded = fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_folding_keeps_channels_last(one_thread):
    model = with_stats(create_model("nin28")).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_trainer_evaluates_with_the_folded_model_and_the_same_result(one_thread):
    x, y = synthetic_images(256, 4, 12)
    xt, yt = synthetic_images(128, 4, 12, seed=1)
    torch.manual_seed(0)
    model = create_model("nin28", num_classes=4, width=0.25)
    train = DeviceLoader(x, y, 32, shuffle=True)
    test = DeviceLoader(xt, yt, 64)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=32, lr=0.05, channels_last=False), train, test)
    hist = trainer.fit()
    eval_model = trainer.eval_model()
    assert eval_model is not model and not has_batchnorm(eval_model)
    plain = evaluate(model, test)
    assert hist[0]["test_acc"] == pytest.approx(plain["acc"], abs=1 / 128)
    assert hist[0]["test_loss"] == pytest.approx(plain["loss"], rel=1e-3)
    off = Trainer(model, TrainConfig(epochs=1, batch_size=32, fold_bn=False, channels_last=False), train, test)
    assert off.eval_model() is model
