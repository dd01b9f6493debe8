"""Checkpoints: exact round trips, atomic writes, and clear errors for every bad file."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.checkpoint import CheckpointError


def trained_like(name="nin28", **kw):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    with torch.no_grad():  # make the BN statistics non-trivial, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def optimizer_state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, *model.input_size)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("name", ["nin28", "nin_cifar10"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = trained_like(name).eval()
    path = ckpt.save_checkpoint(tmp_path / "c", model, {"x": 1}, {"model": {"name": name}})
    torch.manual_seed(1)
    other = create_model(name).eval()
    ckpt.load_weights(path, other)
    x = torch.rand(3, *model.input_size)
    assert torch.equal(model(x), other(x))


def test_state_round_trip_keeps_tensors_ints_and_structure(tmp_path):
    model = trained_like()
    opt = optimizer_state(model)
    state = {"optimizer": opt, "rng": {"cpu": torch.get_rng_state()}, "history": [{"epoch": 1, "acc": 0.5}]}
    path = ckpt.save_checkpoint(tmp_path / "c", model, state, {})
    back = ckpt.load_state(path)
    assert set(back["optimizer"]["state"]) == set(opt["state"])  # int keys survive JSON
    for k, v in opt["state"].items():
        assert torch.equal(back["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert back["optimizer"]["param_groups"] == opt["param_groups"]
    assert torch.equal(back["rng"]["cpu"], state["rng"]["cpu"])
    assert back["history"] == state["history"]


def test_never_overwrites(tmp_path):
    model = trained_like()
    path = ckpt.save_checkpoint(tmp_path / "c", model, {}, {"tag": "first"})
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt.save_checkpoint(path, create_model("nin28"), {}, {"tag": "second"})
    assert ckpt.read_meta(path)["tag"] == "first"


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def flaky(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, filename)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(ckpt.CheckpointError, match="c: could not write the checkpoint .no space left on device"):
        ckpt.save_checkpoint(tmp_path / "c", trained_like(), {"t": torch.ones(2)}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    return ckpt.save_checkpoint(tmp_path / "c", trained_like(), {"t": torch.ones(2)}, {"model": {"name": "nin28"}})


def test_truncated_weights_are_an_error(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load_weights(saved, create_model("nin28"))


def test_garbage_weights_fail_the_checksum(saved):
    f = saved / "model.safetensors"
    f.write_bytes(b"\x00" * f.stat().st_size)  # the recorded size, other bytes
    with pytest.raises(CheckpointError, match="model.safetensors: contents do not match the checksum"):
        ckpt.load_weights(saved, create_model("nin28"))


def test_a_weights_file_of_another_size_is_refused_before_it_is_read(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors: 64 bytes, meta.json recorded [\d,]+ "):
        ckpt.load_weights(saved, create_model("nin28"))


def test_garbage_weights_with_a_matching_checksum_are_unreadable(saved):
    garbage = b"\x00" * 64
    (saved / "model.safetensors").write_bytes(garbage)
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        ckpt.load_weights(saved, create_model("nin28"))


def test_a_flipped_bit_in_the_state_is_caught_before_loading(saved):
    f = saved / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # a tensor value, not the header: still a valid safetensors file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.safetensors: contents do not match the checksum"):
        ckpt.load_state(saved)


def test_meta_without_checksums_is_refused(saved):
    meta = json.loads((saved / "meta.json").read_text())
    del meta["files"]
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing the checksums"):
        ckpt.read_meta(saved)


def test_weights_of_another_model_are_refused_without_partial_load(saved):
    target = trained_like("nin_cifar10")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.load_weights(saved, target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_wrong_shapes_are_refused(saved):
    with pytest.raises(CheckpointError, match="expects"):
        ckpt.load_weights(saved, create_model("nin28", num_classes=7))


@pytest.mark.parametrize(
    "content,match",
    [("{not json", "not valid JSON"), ('{"format": "other"}', "not a nin checkpoint"),
     ('{"format": "nin-checkpoint", "version": 99}', "version 99"), ("[1, 2]", "not a nin checkpoint"),
     (b"\xff\xfe\x00", "not UTF-8 text")],
)
def test_bad_meta_is_an_error(saved, content, match):
    f = saved / "meta.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=match):
        ckpt.read_meta(saved)


def test_state_referring_to_a_missing_tensor_is_an_error(saved):
    meta = json.loads((saved / "meta.json").read_text())
    meta["state"] = {"t": {"__tensor__": "s.nope"}}
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks tensor"):
        ckpt.load_state(saved)


def test_a_damaged_newest_checkpoint_is_named_never_skipped(tmp_path):
    """A run whose newest checkpoint is incomplete is refused, naming it and the newest intact one (which may
    then be named), instead of falling back to an older one without a word."""
    run = tmp_path / "run"
    good = ckpt.save_checkpoint(run / "checkpoints" / "step-0000010", trained_like(), {}, {})
    later = ckpt.save_checkpoint(run / "checkpoints" / "step-0000020", trained_like(), {}, {})
    (later / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing state.safetensors"):
        ckpt.read_meta(later)
    assert ckpt.list_checkpoints(run) == [good]
    with pytest.raises(CheckpointError) as e:
        ckpt.resolve(run)
    assert "newest checkpoint is damaged" in str(e.value) and str(later) in str(e.value)
    assert f"the newest intact one is {good}" in str(e.value)
    assert ckpt.resolve(good) == good


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.resolve(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve(tmp_path)


def test_loading_a_trained_run_unpickles_nothing(tiny_run, monkeypatch):
    """Weights and state come from safetensors and JSON only: with every unpickler disabled, a run still loads."""
    import pickle

    from nin.inference.trained import load_trained

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    trained = load_trained(tiny_run, device="cpu")
    state = ckpt.load_state(trained.path)
    assert trained.name == "nin28" and state["position"]["step"] > 0
    assert {p.name for p in trained.path.iterdir()} == set(ckpt.FILES)
