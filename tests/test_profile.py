"""FLOP counting: recorded figures, an independent per-layer count, and the training multiple."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nin.models import create_model, list_models
from nin.profile import count_flops

# Recorded forward FLOPs per image at each model's own input size (2 x multiply-accumulates of convs).
RECORDED = {"nin_d2l": 1_524_594_704, "nin_cifar10": 444_973_056, "nin28": 12_261_760}


def conv_flops_by_hooks(model: nn.Module, input_size) -> tuple[int, int]:
    """Forward FLOPs of all convs, and of the first conv, from the output shapes of a real forward pass."""
    counts: list[int] = []

    def hook(m: nn.Conv2d, _inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        counts.append(2 * (m.in_channels // m.groups) * k * out.shape[1] * out.shape[2] * out.shape[3])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return sum(counts), counts[0]


def test_every_model_has_a_recorded_count():
    assert set(RECORDED) == set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_flops_match_the_record_and_an_independent_count(name, one_thread):
    model = create_model(name)
    fwd = count_flops(model)
    assert fwd == RECORDED[name]
    assert fwd == conv_flops_by_hooks(model, model.input_size)[0]


@pytest.mark.parametrize("name", list_models())
def test_training_step_is_three_forwards_less_the_first_layers_input_gradient(name, one_thread):
    model = create_model(name)
    fwd, first = conv_flops_by_hooks(model, model.input_size)
    assert count_flops(model, train=True) == 3 * fwd - first


def test_flops_scale_with_batch_and_input_size(one_thread):
    model = create_model("nin28")
    assert count_flops(model, batch=4) == 4 * count_flops(model)
    assert count_flops(model, (1, 56, 56)) == conv_flops_by_hooks(model, (1, 56, 56))[0]
    assert count_flops(model, (1, 56, 56)) > 3.5 * count_flops(model)


def test_counting_leaves_the_model_alone():
    model = create_model("nin28").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, train=True)
    assert model.training
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
