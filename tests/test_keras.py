"""The Keras port: every NiN translates layer by layer and gives PyTorch's logits with the copied weights."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from nin.errors import NinError
from nin.models import create_model, init_weights, list_models

os.environ.setdefault("KERAS_BACKEND", "torch")  # as nin.keras does; set before Keras is first imported
keras = pytest.importorskip("keras") if not os.environ.get("CI") else __import__("keras")  # CI installs it


def keras_logits(kmodel, x: torch.Tensor) -> torch.Tensor:
    out = kmodel(x.permute(0, 2, 3, 1).numpy(), training=False)  # Keras takes channels-last images
    out = out.detach().cpu() if hasattr(out, "detach") else out
    return torch.as_tensor(np.asarray(out))


def randomized(name: str, **kw):
    """A NiN with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = init_weights(create_model(name, width=0.25, **kw), "kaiming").eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


CASES = [(n, {}) for n in list_models("nin")] + [("nin28", {"head": "fc"}), ("nin28", {"mlp_layers": 0}),
                                                 ("nin_cifar10", {"batch_norm": True})]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_the_keras_model_computes_the_pytorch_models_logits(name, options):
    from nin.inference.keras import convert

    model = randomized(name, **options)
    kmodel = convert(model)
    x = torch.randn(3, *model.input_size)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(keras_logits(kmodel, x), expected, atol=1e-5, rtol=1e-5)
    trainable = sum(int(np.prod(w.shape)) for w in kmodel.trainable_weights)
    assert trainable == sum(p.numel() for p in model.parameters())


def test_build_gives_the_registered_architecture_with_pytorchs_layer_names():
    from nin.inference.keras import build

    kmodel = build("nin_d2l")
    assert tuple(kmodel.input_shape) == (None, 224, 224, 1) and tuple(kmodel.output_shape) == (None, 10)
    assert sum(int(np.prod(w.shape)) for w in kmodel.trainable_weights) == 1_992_166
    names = [layer.name for layer in kmodel.layers]
    assert {"block1_0", "pool1", "drop1", "block4_4", "gap"} <= set(names)


def test_from_torch_copies_a_trained_checkpoint(tiny_run):
    from nin.inference.export import sample_inputs
    from nin.inference.keras import from_torch
    from nin.inference.trained import load_trained

    kmodel, classes = from_torch(tiny_run)
    t = load_trained(tiny_run, "cpu")
    mean, std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    x = (sample_inputs(t, 8) - mean) / std
    with torch.no_grad():
        expected = t.model(x)
    torch.testing.assert_close(keras_logits(kmodel, x), expected, atol=1e-5, rtol=1e-5)
    assert classes[:2] == ["T-shirt/top", "Trouser"]


def test_classic_models_and_missing_keras_are_clear_errors(monkeypatch):
    from nin.inference.keras import build, convert

    with pytest.raises(NinError, match="covers the NiN models"):
        convert(create_model("lenet"))
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(NinError, match="pip install keras"):
        build("nin28")
