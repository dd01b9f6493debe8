"""nin.analysis.profile: our own per-layer counts, cross-checked against PyTorch's FLOP counter and autograd,
and memory estimates against memory measured by real training steps and inference."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nin.analysis.measure import measure_inference, measure_training
from nin.analysis.profile import ModelProfile, count_flops, flop_counts_by_module, profile_model
from nin.errors import NinError
from nin.models import create_model, list_models

ALL = list_models()

# Recorded forward FLOPs per image at each model's own input size (2 x the MACs of convs and linear layers).
RECORDED = {"nin_d2l": 1_524_594_704, "nin_cifar10": 444_973_056, "nin28": 12_261_760, "nin28_s": 19_844_608,
            "nin28_m": 78_224_384, "nin28_l": 319_646_208,
            "lenet": 833_040, "alexnet": 1_876_292_352, "vgg11": 15_094_464_512}

pytestmark = pytest.mark.usefixtures("one_thread")


def flops_by_hooks(model: nn.Module, input_size) -> tuple[int, int]:
    """Forward FLOPs of all convs and linear layers, and of the first layer, from a real forward pass."""
    counts: list[int] = []

    def conv(m: nn.Conv2d, _inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        counts.append(2 * (m.in_channels // m.groups) * k * out.shape[1] * out.shape[2] * out.shape[3])

    def linear(m: nn.Linear, _inp, out):
        counts.append(2 * m.in_features * m.out_features)

    handles = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return sum(counts), counts[0]


def test_every_model_has_a_recorded_count():
    assert set(RECORDED) == set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_forward_flops_match_the_record_and_an_independent_count(name):
    model = create_model(name)
    fwd = count_flops(model)
    assert fwd == RECORDED[name]
    assert fwd == flops_by_hooks(model, model.input_size)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_training_step_is_three_forwards_less_the_first_layers_input_gradient(name):
    model = create_model(name)
    fwd, first = flops_by_hooks(model, model.input_size)
    assert count_flops(model, train=True) == 3 * fwd - first


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_our_per_layer_macs_are_torch_flop_counters_halved_and_params_add_up(name):
    model = create_model(name)
    prof = profile_model(model, batch=1)
    by_module = flop_counts_by_module(model)
    ours = {lp.name: lp.macs for lp in prof.layers if lp.macs}
    assert ours == {k: v // 2 for k, v in by_module.items() if v}
    assert all(v % 2 == 0 for v in by_module.values())
    assert prof.params == sum(p.numel() for p in model.parameters()) == sum(lp.params for lp in prof.layers)
    assert prof.param_bytes == 4 * prof.params
    assert prof.flops == RECORDED[name]
    assert prof.train_flops == count_flops(model, train=True)


@pytest.mark.slow
def test_known_figures():
    d2l = profile_model(create_model("nin_d2l"))
    assert d2l.params == 1_992_166
    assert d2l.macs == 762_297_352  # "about 762.3 M"; the seed's hand table rounds to 762.2 M
    assert d2l.first_fc_params == 0
    cifar = profile_model(create_model("nin_cifar10"))
    assert cifar.params == 966_986 and cifar.macs == 222_486_528
    # the wider 28x28 NiNs (issue 20): parameters and MACs per image
    assert [(p.params, p.macs) for p in map(profile_model, map(create_model, ("nin28_s", "nin28_m", "nin28_l")))] \
        == [(116_138, 9_922_304), (459_594, 39_112_192), (1_399_786, 159_823_104)]
    assert profile_model(create_model("vgg11")).first_fc_params == 512 * 7 * 7 * 4096 + 4096


def test_the_seeds_hand_table_rows_for_nin_d2l():
    layers = {lp.name: lp for lp in profile_model(create_model("nin_d2l")).layers}
    assert layers["features.block1.0"].macs == 121 * 54 * 54 * 96  # 33.87 M
    assert layers["features.block2.0"].macs == 25 * 96 * 26 * 26 * 256  # 415.29 M
    assert layers["features.block4.0"].macs == 9 * 384 * 5 * 5 * 10  # 0.86 M: 384x5x5 -> 10x5x5 in one step
    assert layers["features.block4.0"].shape == (10, 5, 5)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd really keeps for the backward pass of ``model(x)``: each storage once,
    weights, buffers and the input itself excluded."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_kept_for_backward_is_what_autograd_keeps(name):
    small = {"nin_d2l": (96, 96), "alexnet": (96, 96), "vgg11": (32, 32)}
    model = create_model(name, **({"input_size": small[name]} if name in small else {})).train()
    batch = 3
    prof = profile_model(model, batch=batch)
    x = torch.randn(batch, *model.input_size)
    # BatchNorm also keeps its batch mean and inverse std: 8 bytes per channel, left out of the estimate
    stats = sum(8 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert batch * sum(lp.kept for lp in prof.layers) + stats == saved_activation_bytes(model, x)


def test_memory_parts_add_up_to_the_peaks():
    prof = profile_model(create_model("nin_d2l"), batch=16)
    for mem in (prof.inference, prof.training):
        assert sum(mem.parts.values()) == mem.peak
    assert prof.training.parts["weights"] == prof.training.parts["optimizer state"] == 4 * 1_992_166
    assert profile_model(create_model("nin_d2l"), batch=16, optimizer="sgd").training.parts["optimizer state"] == 0
    assert prof.training.peak > prof.inference.peak


def test_bf16_halves_the_activations_but_not_the_pooling_indices():
    fp32 = profile_model(create_model("nin_d2l"), batch=16)
    bf16 = profile_model(create_model("nin_d2l"), batch=16, amp="bf16")
    first, *rest = zip(fp32.layers, bf16.layers)
    assert first[1].kept == first[0].kept // 2 + 2 * 224 * 224  # plus the input's bfloat16 copy the conv keeps
    for f, b in rest:
        if f.kind.startswith("MaxPool"):
            assert f.kept // 2 < b.kept <= f.kept  # int64 indices stay 8 bytes
        else:
            assert 2 * b.kept == f.kept, f.name
    assert bf16.training.parts["weights"] == fp32.training.parts["weights"]  # autocast keeps float32 weights


def test_a_profile_survives_its_json_round_trip():
    prof = profile_model(create_model("nin28"), batch=8)
    prof.measured = {"training": 1, "inference": 2, "device": "cpu", "method": "test"}
    assert ModelProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


@pytest.mark.parametrize("kw, what", [({"amp": "fp8"}, "amp"), ({"optimizer": "lion"}, "optimizer"),
                                      ({"batch": 0}, "batch")])
def test_bad_settings_raise_nin_error(kw, what):
    with pytest.raises(NinError, match=what):
        profile_model(create_model("nin28"), **kw)


def test_an_input_too_small_is_one_clear_error():
    with pytest.raises(NinError, match="does not fit"):
        profile_model(create_model("nin_d2l"), input_size=(1, 16, 16))


# Batch 128 where a step is cheap; the larger models at a smaller batch, and VGG-11 at a
# quarter of its width, as d2l trains it (the estimate is the same sum over the same layers at any width; the
# full-width step is 7.5 G MACs an image, seconds a step on a CPU without bf16). docs/resources.md has them all
# at full width and batch 128, from `nin profile`.
BATCHES = {"nin28": 128, "nin28_s": 128, "nin28_m": 128, "nin28_l": 64,
           "lenet": 128, "nin_cifar10": 32, "nin_d2l": 16, "alexnet": 8, "vgg11": 8}
OPTIONS = {"vgg11": {"width": 0.25}}


def test_every_model_has_a_measured_batch():
    assert set(BATCHES) == set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_estimates_are_within_15_percent_of_measured_memory(name):
    options = OPTIONS.get(name, {})
    model = create_model(name, **options)
    batch = BATCHES[name]
    prof = profile_model(model, batch=batch)
    cpu = torch.device("cpu")
    trained = measure_training(lambda: create_model(name, **options), model.input_size, batch, cpu)
    inferred = measure_inference(lambda: create_model(name, **options), model.input_size, batch, cpu)
    assert abs(prof.training.peak / trained - 1) < 0.15, (prof.training.peak, trained)
    assert abs(prof.inference.peak / inferred - 1) < 0.15, (prof.inference.peak, inferred)
    # The measurement sees real allocations: at least the weights, gradients and momentum.
    assert trained > 3 * prof.param_bytes
