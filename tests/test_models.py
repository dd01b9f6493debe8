"""Tests for nin.models: specs, the mlpconv block, the NiN builder, init and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nin.errors import NinError
from nin.models import DEFAULT_MODEL, MODELS, Registry, create_model, init_weights, list_models, model_entry
from nin.models import nin as models
from nin.models.nin import OVERRIDES, nin_block
from nin.models.specs import CLASSES, Block, Dropout, Pool

ALL = list_models()
NAMES = list_models("nin")  # the NiN-specific tests; ALL also holds the classic baselines


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ helpers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module) -> list[nn.Sequential]:
    """The mlpconv blocks of a NiN, in order."""
    return [m for name, m in model.features.named_children() if name.startswith("block")]


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def random_input(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_size, generator=g)


def hand_param_count(spec, in_channels: int, num_classes: int, batch_norm: bool) -> int:
    """Parameters of a NiN spec counted layer by layer, as one would on paper.

    Each conv has cin*cout*k*k weights; a conv followed by BatchNorm has no bias
    and the BatchNorm has a weight and a bias per channel (its running stats are
    buffers); any other conv has a bias per output channel. A block's last conv
    is linear (no norm) when the block has ``relu_last=False``. The head (global
    average pooling) has no parameters.
    """
    total, cin = 0, in_channels
    for stage in spec:
        if not isinstance(stage, Block):
            continue
        widths = [num_classes if w == CLASSES else w for w in stage.widths()]
        for i, cout in enumerate(widths):
            k = stage.kernel if i == 0 else 1
            linear = i == len(widths) - 1 and not stage.relu_last
            total += cin * cout * k * k
            total += 2 * cout if (batch_norm and not linear) else cout
            cin = cout
    return total


# ----------------------------------------------------------- every model


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_model_builds_quietly_on_cpu_and_classifies_its_own_input(name, capsys):
    entry = model_entry(name)
    model = create_model(name)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    params = list(model.parameters())
    assert params, "no parameters right after construction"
    for p in params:
        assert not isinstance(p, nn.parameter.UninitializedParameter)
        assert p.device.type == "cpu"
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())

    assert tuple(model.input_size) == tuple(entry.input_size)
    model.eval()
    with torch.no_grad():
        out = model(random_input(model, 2))
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()


# -------------------------------------------------------- parameter counts


def test_nin_d2l_has_the_seed_parameter_count():
    assert n_params(create_model("nin_d2l")) == 1_992_166


def test_nin_cifar10_has_the_paper_parameter_count():
    assert n_params(create_model("nin_cifar10")) == 966_986


def test_hand_count_formula_reproduces_nin_d2l():
    # Cross-check of the hand formula against the seed's known fact.
    assert hand_param_count(models.SPECS["nin_d2l"], 1, 10, batch_norm=False) == 1_992_166


# The 28x28 family: parameters as recorded, each also a hand count of its spec (BatchNorm, a linear last conv).
RECORDED_PARAMS = {"nin28": 79_898, "nin28_s": 116_138, "nin28_m": 459_594, "nin28_l": 1_399_786}


@pytest.mark.parametrize("name", sorted(RECORDED_PARAMS))
def test_nin28_family_parameter_counts_match_the_record_and_a_hand_count_of_the_spec(name):
    model = create_model(name)
    expected = hand_param_count(models.SPECS[name], in_channels=1, num_classes=10, batch_norm=True)
    assert n_params(model) == expected == RECORDED_PARAMS[name]
    assert n_params(model) < 2_000_000  # a NiN that beats a 2 M-parameter budget, as issue 20 asks
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # a GAP head, no fully connected layer
    # and the BatchNorm convs really have no bias while the linear classifier conv does
    last = blocks(model)[-1]
    assert isinstance(last[-1], nn.Conv2d) and last[-1].bias is not None


# ----------------------------------------------------------- shape tables


def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple[int, ...]]]:
    rows = []
    model.eval()
    with torch.no_grad():
        for name, stage in model.named_stages():
            x = stage(x)
            rows.append((name, type(stage).__name__, tuple(x.shape[1:])))
    return rows


def test_nin_d2l_stage_shapes_match_the_seed_table():
    rows = stage_outputs(create_model("nin_d2l"), torch.randn(1, 1, 224, 224))
    assert [r[2] for r in rows] == [
        (96, 54, 54),
        (96, 26, 26),
        (256, 26, 26),
        (256, 12, 12),
        (384, 12, 12),
        (384, 5, 5),
        (384, 5, 5),
        (10, 5, 5),
        (10, 1, 1),
        (10,),
    ]
    assert [r[1] for r in rows] == [
        "Sequential", "MaxPool2d", "Sequential", "MaxPool2d", "Sequential",
        "MaxPool2d", "Dropout", "Sequential", "AdaptiveAvgPool2d", "Flatten",
    ]
    assert [r[0] for r in rows] == [
        "block1", "pool1", "block2", "pool2", "block3", "pool3", "drop1", "block4", "gap", "flatten",
    ]


def test_nin_cifar10_pools_like_caffe_32_16_8():
    rows = {name: shape for name, _, shape in stage_outputs(create_model("nin_cifar10"), torch.randn(1, 3, 32, 32))}
    assert rows["block1"][1:] == (32, 32)
    assert rows["pool1"][1:] == (16, 16)
    assert rows["pool2"][1:] == (8, 8)
    assert rows["block3"] == (10, 8, 8)


# ---------------------------------------------------------------- nin_block


def test_nin_block_is_the_d2l_block():
    block = nin_block(1, (96, 96, 96), 11, 4)
    assert [type(m) for m in block] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU]
    c0, c1, c2 = block[0], block[2], block[4]
    assert (c0.in_channels, c0.out_channels) == (1, 96)
    assert c0.kernel_size == (11, 11) and c0.stride == (4, 4) and c0.padding == (0, 0)
    for c in (c1, c2):
        assert (c.in_channels, c.out_channels) == (96, 96)
        assert c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)
    assert all(c.bias is not None for c in (c0, c1, c2))
    assert block(torch.randn(1, 1, 224, 224)).shape == (1, 96, 54, 54)


def test_nin_block_with_batch_norm_drops_conv_biases():
    block = nin_block(3, (8, 6, 4), 3, padding=1, batch_norm=True)
    types = [type(m) for m in block]
    assert types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    for i in (0, 3, 6):
        conv, bn = block[i], block[i + 1]
        assert conv.bias is None
        assert bn.num_features == conv.out_channels
    assert [block[i].out_channels for i in (0, 3, 6)] == [8, 6, 4]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_nin_block_relu_last_false_leaves_the_last_conv_linear(batch_norm):
    torch.manual_seed(0)  # the weights and input below: whether an output is negative must not depend on test order
    block = nin_block(3, (8, 6, 4), 3, padding=1, batch_norm=batch_norm, relu_last=False)
    last = block[-1]
    assert isinstance(last, nn.Conv2d) and last.out_channels == 4
    assert last.bias is not None  # no norm after it, so it keeps its bias
    per_conv = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] if batch_norm else [nn.Conv2d, nn.ReLU]
    assert [type(m) for m in block] == per_conv * 2 + [nn.Conv2d]
    # linear: negative outputs survive
    out = block(torch.randn(2, 3, 5, 5))
    assert (out < 0).any()


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_override(name):
    model = create_model(name, num_classes=7).eval()
    assert model.num_classes == 7
    assert convs(blocks(model)[-1])[-1].out_channels == 7
    with torch.no_grad():
        assert model(random_input(model, 1)).shape == (1, 7)


@pytest.mark.parametrize("name", NAMES)
def test_in_channels_override_accepts_three_channels(name):
    model = create_model(name, in_channels=3).eval()
    assert model.input_size[0] == 3
    assert convs(model)[0].in_channels == 3
    _, h, w = model_entry(name).input_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, h, w)).shape == (1, 10)


@pytest.mark.parametrize("mlp_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_mlp_layers_sets_the_number_of_1x1_convs_in_every_block(name, mlp_layers):
    model = create_model(name, mlp_layers=mlp_layers).eval()
    bs = blocks(model)
    assert len(bs) == sum(isinstance(s, Block) for s in models.SPECS[name])
    for b in bs:
        cs = convs(b)
        assert len(cs) == mlp_layers + 1
        assert all(c.kernel_size == (1, 1) for c in cs[1:])
        assert cs[0].kernel_size != (1, 1)
    assert convs(bs[-1])[-1].out_channels == model.num_classes
    with torch.no_grad():
        assert model(random_input(model, 1)).shape == (1, model.num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_width_two_quadruples_the_big_convs(name):
    base, wide = create_model(name), create_model(name, width=2.0)
    classes = base.num_classes
    # which conv outputs are class-wide (kept) and which are hidden widths (doubled), from the spec
    is_class = [w == CLASSES for s in models.SPECS[name] if isinstance(s, Block) for w in s.widths()]
    pairs = list(zip(convs(base), convs(wide), strict=True))
    assert len(pairs) == len(is_class)
    big = 0
    for i, ((cb, cw), cls) in enumerate(zip(pairs, is_class)):
        assert cw.out_channels == (classes if cls else 2 * cb.out_channels)
        assert cw.in_channels == (cb.in_channels if i == 0 or is_class[i - 1] else 2 * cb.in_channels)
        if i > 0 and not cls and not is_class[i - 1]:
            assert cw.weight.numel() == 4 * cb.weight.numel()
            big += 1
    assert big > 0
    assert 3.0 < n_params(wide) / n_params(base) < 4.1
    if name == "nin_d2l":
        assert convs(wide)[0].out_channels == 2 * convs(base)[0].out_channels == 192


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_batch_norm_override_toggles_batch_norm(name, batch_norm):
    model = create_model(name, batch_norm=batch_norm)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    cs = convs(model)
    if batch_norm:
        # every conv but a linear (relu_last=False) block's last conv is normalized and has no bias
        linear = sum(isinstance(s, Block) and not s.relu_last for s in models.SPECS[name])
        assert len(bns) == len(cs) - linear > 0
        assert sum(c.bias is None for c in cs) == len(bns)
    else:
        assert bns == []
        assert all(c.bias is not None for c in cs)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_override_sets_every_dropout(name):
    n_drop = sum(isinstance(s, Dropout) for s in models.SPECS[name])
    n_pool = sum(isinstance(s, Pool) for s in models.SPECS[name])
    model = create_model(name, dropout=0.2)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == (n_drop or n_pool)  # a spec without dropout gets one after each pooling stage
    assert all(d.p == 0.2 for d in drops)
    defaults = [m.p for m in create_model(name).modules() if isinstance(m, nn.Dropout)]
    assert defaults == [s.p for s in models.SPECS[name] if isinstance(s, Dropout)]


def test_some_model_has_dropout_to_override():
    assert any(isinstance(s, Dropout) for name in NAMES for s in models.SPECS[name])


BAD = [
    {"num_classes": 0},
    {"mlp_layers": 4},
    {"width": 0},
    {"width": -1},
    {"dropout": 1.0},
]


@pytest.mark.parametrize("overrides", BAD, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("name", NAMES)
def test_bad_override_values_raise_nin_error(name, overrides):
    with pytest.raises(NinError):
        create_model(name, **overrides)


@pytest.mark.parametrize("name", ALL)
def test_unknown_override_raises_nin_error_naming_it(name):
    with pytest.raises(NinError, match="depthh"):
        create_model(name, depthh=3)


def test_overrides_constant_lists_what_create_model_accepts():
    assert set(OVERRIDES) == {"num_classes", "in_channels", "input_size", "mlp_layers", "width", "head_width",
                              "batch_norm", "dropout", "head"}
    for name in NAMES:
        assert model_entry(name).options == OVERRIDES


@pytest.mark.parametrize("name", NAMES)
def test_head_width_widens_every_classifier_conv_but_the_last(name):
    model = create_model(name, head_width=48)
    last = convs(blocks(model)[-1])
    assert [c.out_channels for c in last] == [48] * (len(last) - 1) + [10]
    assert [c.in_channels for c in last[1:]] == [48] * (len(last) - 1)
    with torch.no_grad():
        assert model.eval()(random_input(model, 1)).shape == (1, 10)


def test_head_width_of_nin_d2l_is_the_gradual_reduction_of_the_fourth_exercise():
    one_step = create_model("nin_d2l")
    gradual = create_model("nin_d2l", head_width=384)
    assert [c.out_channels for c in convs(blocks(gradual)[-1])] == [384, 384, 10]
    # 384->384 3x3, 384->384 1x1, 384->10 1x1 instead of 384->10 3x3, 10->10, 10->10
    extra = (384 * 384 * 9 + 384) + (384 * 384 + 384) + (384 * 10 + 10) - (384 * 10 * 9 + 10) - 2 * (10 * 10 + 10)
    assert n_params(gradual) - n_params(one_step) == extra


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_head_width_raises(bad):
    with pytest.raises(NinError, match="head_width"):
        create_model("nin_d2l", head_width=bad)


def test_head_width_needs_a_1x1_conv():
    with pytest.raises(NinError, match="head_width"):
        create_model("nin_d2l", head_width=64, mlp_layers=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_input_size_override_sets_the_input_and_a_classic_model_sizes_its_first_fc_layer(name):
    model = create_model(name, input_size=(96, 80))
    assert model.input_size[1:] == (96, 80)
    with torch.no_grad():  # a classic model whose flatten size were wrong would fail in its first Linear
        assert model.eval()(torch.randn(2, model.input_size[0], 96, 80)).shape == (2, 10)


@pytest.mark.parametrize("bad", [(0, 28), (28,), "28x28", (28.5, 28), None])
def test_bad_input_size_raises(bad):
    with pytest.raises(NinError, match="input_size"):
        create_model("nin28", input_size=bad)


# ----------------------------------------------------------------- registry


def test_unknown_model_suggests_the_close_match():
    with pytest.raises(NinError, match="nin_d2l") as info:
        create_model("nin_d2")
    assert "did you mean 'nin_d2l'" in str(info.value)
    with pytest.raises(NinError):
        model_entry("nin_d2")


def test_registering_a_name_twice_raises_on_a_fresh_registry():
    reg = Registry()

    def tiny(**kw):
        return nn.Identity()

    reg.register((1, 8, 8), "first")(tiny)
    assert reg.names() == ["tiny"]
    with pytest.raises(ValueError, match="tiny"):
        reg.register((1, 8, 8), "second")(tiny)
    assert reg.get("tiny").description == "first"


def test_registering_an_existing_global_name_raises_and_changes_nothing():
    before = list_models()
    original = model_entry("nin_d2l")

    def nin_d2l(**kw):  # the name clash is the point
        return nn.Identity()

    with pytest.raises(ValueError, match="nin_d2l"):
        MODELS.register((1, 8, 8), "impostor")(nin_d2l)
    assert list_models() == before
    assert model_entry("nin_d2l") is original
    assert model_entry("nin_d2l").factory is models.nin_d2l


def test_list_models_is_sorted_and_holds_the_nin_models_and_the_baselines():
    names = list_models()
    assert names == sorted(names)
    assert set(list_models("nin")) == {"nin_d2l", "nin_cifar10", "nin28", "nin28_s", "nin28_m", "nin28_l"}
    assert set(list_models("classic")) == {"lenet", "alexnet", "vgg11"}
    assert set(names) == set(list_models("nin")) | set(list_models("classic"))


def test_default_model_is_registered_for_28x28():
    assert DEFAULT_MODEL in list_models()
    assert model_entry(DEFAULT_MODEL).input_size == (1, 28, 28)
    assert create_model(DEFAULT_MODEL).input_size == (1, 28, 28)


# ----------------------------------------------------------------- init_weights


def fans(conv: nn.Conv2d) -> tuple[int, int]:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels * k, conv.out_channels * k


def test_xavier_init_is_d2l_uniform_and_keeps_biases():
    torch.manual_seed(0)
    model = create_model("nin_d2l")
    biases = [c.bias.detach().clone() for c in convs(model)]
    assert init_weights(model, "xavier") is model
    for conv, bias in zip(convs(model), biases, strict=True):
        fan_in, fan_out = fans(conv)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = conv.weight.detach()
        assert w.abs().max() <= bound + 1e-7
        if w.numel() >= 5000:  # enough draws to reach the bound and pin the spread
            assert w.abs().max() > 0.95 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.equal(conv.bias.detach(), bias)


def test_kaiming_init_is_he_normal_fan_out_with_zero_biases():
    torch.manual_seed(0)
    model = create_model("nin_d2l")
    init_weights(model, "kaiming")
    checked = 0
    for conv in convs(model):
        assert torch.count_nonzero(conv.bias) == 0
        if conv.weight.numel() >= 100_000:
            _, fan_out = fans(conv)
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
            assert abs(conv.weight.mean().item()) < 0.1 * math.sqrt(2.0 / fan_out)
            checked += 1
    assert checked >= 3


def test_kaiming_init_scales_fully_connected_layers_by_their_inputs():
    torch.manual_seed(0)
    model = init_weights(create_model("nin28", head="fc"), "kaiming")
    fc = model.head.fc  # 490 -> 10: fan-out scaling would give std 0.45 and logits in the tens
    assert fc.weight.std().item() == pytest.approx(math.sqrt(2 / 490), rel=0.1)
    assert torch.count_nonzero(fc.bias) == 0


def test_init_resets_batch_norm_to_identity():
    model = create_model("nin28")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.fill_(3.0)
            bn.bias.fill_(1.0)
    init_weights(model, "kaiming")
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_default_init_changes_nothing():
    model = create_model("nin28")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_weights(model, "default") is model
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_init_scheme_raises_nin_error():
    with pytest.raises(NinError, match="orthogonal"):
        init_weights(create_model("nin28"), "orthogonal")


@pytest.mark.parametrize("scheme", ["xavier", "kaiming"])
def test_init_weights_is_deterministic_under_manual_seed(scheme):
    torch.manual_seed(1)
    a = create_model("nin28")
    torch.manual_seed(2)
    b = create_model("nin28")
    assert not torch.equal(convs(a)[0].weight, convs(b)[0].weight)
    torch.manual_seed(123)
    init_weights(a, scheme)
    torch.manual_seed(123)
    init_weights(b, scheme)
    for ca, cb in zip(convs(a), convs(b), strict=True):
        assert torch.equal(ca.weight, cb.weight)


# ---------------------------------------------------------- features and head


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_head_of_features_and_logits_are_map_means(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = random_input(model, 2, seed=1)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_features(x)
        assert maps.dim() == 4 and maps.shape[:2] == (2, model.num_classes)
        assert torch.equal(model.forward_head(maps), logits)
        assert torch.allclose(logits, maps.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,maps", [("nin_d2l", 5 * 5), ("nin_cifar10", 8 * 8), ("nin28", 7 * 7)])
def test_fc_head_replaces_average_pooling_with_one_linear_layer_over_the_class_maps(name, maps):
    gap, fc = create_model(name), create_model(name, head="fc")
    assert [n for n, _ in fc.head.named_children()] == ["flatten", "fc"]
    assert fc.head.fc.in_features == 10 * maps and fc.head.fc.out_features == 10
    extra = sum(p.numel() for p in fc.parameters()) - sum(p.numel() for p in gap.parameters())
    assert extra == 10 * maps * 10 + 10
    with torch.no_grad():
        assert fc.eval()(random_input(fc, 2)).shape == (2, 10)
    other = create_model(name, head="fc", input_size=(2 * fc.input_size[1], 2 * fc.input_size[2]))
    with torch.no_grad():  # the fc size follows the input size, computed when the model is built
        assert other.eval()(torch.randn(1, *other.input_size)).shape == (1, 10)


@pytest.mark.parametrize("options,needle", [({"head": "mlp"}, "head must be 'gap' or 'fc'"),
                                            ({"input_size": (40, 40)}, "too small")])
def test_bad_head_or_too_small_input_is_a_user_error(options, needle):
    with pytest.raises(NinError, match=needle):
        create_model("nin_d2l", **options)


def test_dropout_on_a_nin_without_dropout_stages_adds_one_after_each_pooling_stage():
    plain, dropped = create_model("nin28"), create_model("nin28", dropout=0.3)
    names = [n for n, _ in dropped.features.named_children()]
    assert names == ["block1", "pool1", "drop1", "block2", "pool2", "drop2", "block3"]
    assert [m.p for m in dropped.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert not any(isinstance(m, nn.Dropout) for m in create_model("nin28", dropout=0.0).modules())
    assert [m.p for m in create_model("nin_d2l", dropout=0.3).modules() if isinstance(m, nn.Dropout)] == [0.3]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nin_d2l", "nin_cifar10"])
def test_the_fused_bf16_cpu_path_computes_what_the_modules_do(monkeypatch, name):
    """Under bf16 autocast on a CPU, conv+ReLU pairs run as one oneDNN primitive: the same outputs and gradients,
    bit for bit, as module by module; the 1-channel strided first conv as a space-to-depth conv, to bf16 rounding."""
    from nin.training.precision import bf16_native

    torch.manual_seed(0)
    model = create_model(name, input_size=(96, 96)).eval()  # eval: no dropout masks to line up
    channels = model.input_size[0]
    x = torch.randn(4, channels, 96, 96)
    if not bf16_native(torch.device("cpu")):  # oneDNN's bf16 kernels need AVX-512: autocast emulates bf16 instead
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not models._fused_cpu_ok(model.features, x)
        pytest.skip("the fused path runs only where this CPU has native bf16")

    def run(fused: bool, space_to_depth: bool):
        monkeypatch.setattr(models, "FUSED_CPU_BLOCKS", fused)
        monkeypatch.setattr(models, "SPACE_TO_DEPTH_FIRST_CONV", space_to_depth)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return out.detach().float(), [p.grad.clone() for p in model.parameters()]

    calls = []
    fused_pair = models._conv_relu
    monkeypatch.setattr(models, "_conv_relu", lambda conv, x: calls.append(conv) or fused_pair(conv, x))
    (ref, ref_grads), (out, grads) = run(False, False), run(True, False)
    assert len(calls) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # every conv took the fused path
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    out, grads = run(True, True)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(grads, ref_grads):
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 5e-2


def test_model_option_ranges_and_flags_come_from_one_declaration():
    """ModelOptions declares each option's range once: the builders' checks and the flags both use it."""
    from nin.bounds import range_of
    from nin.cli.main import build_parser
    from nin.errors import NinError
    from nin.models import specs

    assert specs.WIDTH is range_of(specs.ModelOptions, "width")
    with pytest.raises(NinError, match=r"width must be in \[0.0625, 8\], got 9"):
        create_model("nin28", width=9)
    shapes = build_parser()._subparsers._group_actions[0].choices["shapes"]
    width = next(a for a in shapes._actions if a.dest == "width")
    assert width.help == "channel width multiplier"
    with pytest.raises(NinError, match=r"--width: expected a number in \[0.0625, 8\], got '9'"):
        shapes.parse_args(["nin28", "--width", "9"])
