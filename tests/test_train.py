"""The trainer: schedules, config validation, learning, divergence, callbacks and exact resume."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import NaNAt, synthetic_images
from torch import nn

from nin.data.loader import Augment, DeviceLoader
from nin.errors import NinError
from nin.inference.evaluate import confusion_matrix
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.callbacks import Checkpointer
from nin.training.callbacks.base import Callback
from nin.training.config import TrainConfig
from nin.training.trainer import Diverged, Trainer, evaluate, lr_at


def loaders(n=512, classes=4, size=12, channels=1, batch=32, augment=Augment()):
    x, y = synthetic_images(n, classes, size, channels)
    xt, yt = synthetic_images(128, classes, size, channels, seed=1)
    train = DeviceLoader(x, y, batch, shuffle=True, seed=0, augment=augment, mean=(0.2,), std=(0.3,))
    test = DeviceLoader(xt, yt, 64, mean=(0.2,), std=(0.3,))
    return train, test


def small_model(classes=4):
    torch.manual_seed(0)
    return create_model("nin28", num_classes=classes, width=0.25)


FAST = dict(epochs=3, batch_size=32, lr=0.05, label_smoothing=0.0, channels_last=False)


# ------------------------------------------------------------------ schedules


def test_constant_schedule_is_constant():
    cfg = TrainConfig(lr=0.3, schedule="constant")
    assert {lr_at(cfg, s, 100) for s in range(100)} == {0.3}


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_warmup_then_decay_to_zero(schedule):
    cfg = TrainConfig(lr=0.2, schedule=schedule, warmup=0.25)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    peak = lrs.index(max(lrs))
    assert peak == 24 and math.isclose(lrs[peak], 0.2)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))  # rises
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # falls
    assert lrs[-1] < 0.01 and lrs[0] < 0.05


def test_onecycle_starts_at_a_tenth():
    cfg = TrainConfig(lr=1.0, schedule="onecycle", warmup=0.5)
    assert lr_at(cfg, 0, 1000) == pytest.approx(0.1 + 0.9 / 500)


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("lr", float("nan")), ("momentum", 1.0),
     ("weight_decay", -1e-4), ("schedule", "linear"), ("milestones", (0.9, 0.2)), ("milestones", (0.5, 1.0)),
     ("gamma", 0.0), ("warmup", 1.0), ("label_smoothing", 1.0), ("amp", "fp8"), ("max_steps", 0), ("check_every", 0),
     ("on_diverge", "retry"), ("rollback_factor", 1.0), ("rollback_factor", 0.0), ("max_rollbacks", 0)],
)
def test_bad_config_values_are_user_errors(field, value):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(NinError):
        cfg.validate()


def test_nesterov_needs_momentum():
    with pytest.raises(NinError, match="nesterov"):
        TrainConfig(momentum=0.0, nesterov=True).validate()


# ------------------------------------------------------------------- training


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append("start")

    def on_step_end(self, trainer, loss):
        self.events.append("step")

    def on_epoch_end(self, trainer, metrics):
        self.events.append(("epoch", metrics["epoch"]))

    def on_fit_end(self, trainer):
        self.events.append("end")


def test_trainer_learns_and_reports_every_metric():
    train, test = loaders()
    rec = Recorder()
    trainer = Trainer(small_model(), TrainConfig(**FAST), train, test, [rec])
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec", "epoch_time",
                "wall_time", "lr", "step"):
        assert all(math.isfinite(h[key]) for h in history), key
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.9
    assert history[-1]["step"] == 3 * len(train)
    steps = rec.events.count("step")
    assert rec.events[0] == "start" and rec.events[-1] == "end" and steps == 3 * len(train)
    assert [e for e in rec.events if isinstance(e, tuple)] == [("epoch", 1), ("epoch", 2), ("epoch", 3)]


def test_trainer_does_not_reinitialize_the_model():
    train, test = loaders()
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, TrainConfig(**FAST), train, test)  # constructing must not touch the weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_matches_a_manual_count():
    train, test = loaders()
    model = small_model()
    Trainer(model, TrainConfig(**{**FAST, "epochs": 1}), train, test).fit()
    ev = evaluate(model, test)
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    assert ev["n"] == 128 and ev["acc"] == right / 128


def test_confusion_matrix_counts():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    m = confusion_matrix(preds, labels, 3)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]


def test_non_finite_loss_stops_and_names_the_step():
    train, test = loaders()
    trainer = Trainer(NaNAt(small_model(), at=11), TrainConfig(**FAST), train, test)
    with pytest.raises(Diverged, match="at step 11 ") as exc:
        trainer.fit()
    assert exc.value.step == 11 and exc.value.epoch == 0  # 16 batches per epoch: step 11 is in epoch 1


def test_non_finite_loss_is_found_when_checked_rarely():
    train, test = loaders()
    cfg = TrainConfig(**FAST, check_every=5)
    with pytest.raises(Diverged, match="at step 3 "):
        Trainer(NaNAt(small_model(), at=3), cfg, train, test).fit()


class AlwaysNaN(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * float("nan")


class Rollbacks(Callback):
    def __init__(self):
        self.events = []

    def on_rollback(self, trainer, event):
        self.events.append(event)


@pytest.mark.slow
def test_rollback_redoes_the_epoch_at_a_lower_lr_exactly_like_a_run_started_there():
    aug = Augment(crop_padding=2, flip=True)  # random augmentation and dropout: the RNG must be restored too
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="constant", channels_last=False)

    train, test = loaders(size=16, augment=aug)
    clean = dropout_model()
    Trainer(clean, TrainConfig(**{**cfg.__dict__, "lr": 0.025}), train, test).fit()

    train, test = loaders(size=16, augment=aug)
    model = dropout_model()
    seen = Rollbacks()
    rolled = TrainConfig(**{**cfg.__dict__, "on_diverge": "rollback", "rollback_factor": 0.5})
    trainer = Trainer(NaNAt(model, at=11), rolled, train, test, [seen])
    history = trainer.fit()

    assert [e["step"] for e in seen.events] == [11] and seen.events[0]["resumed_at_step"] == 0
    assert trainer.lr_scale == 0.5 and trainer.rollbacks == seen.events
    assert [h["lr"] for h in history] == [0.025, 0.025] and [h["step"] for h in history] == [16, 32]
    for (k, a), b in zip(clean.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    state = trainer.state_dict()  # a checkpoint keeps the lowered lr and the log
    again = Trainer(dropout_model(), cfg, *loaders(size=16))
    again.load_state_dict(state)
    assert again.lr_scale == 0.5 and again.rollbacks == seen.events


def test_rollback_gives_up_after_max_rollbacks():
    train, test = loaders()
    cfg = TrainConfig(**FAST, on_diverge="rollback", max_rollbacks=2, rollback_factor=0.1)
    trainer = Trainer(AlwaysNaN(small_model()), cfg, train, test)
    with pytest.raises(Diverged, match=r"at step 1 \(epoch 1\) after 2 rollback\(s\) \(lr scale 0.01\)"):
        trainer.fit()
    assert [e["lr_scale"] for e in trainer.rollbacks] == [pytest.approx(0.1), pytest.approx(0.01)]


def test_max_steps_stops_inside_an_epoch():
    train, test = loaders()
    trainer = Trainer(small_model(), TrainConfig(**FAST, max_steps=5), train, test)
    assert trainer.fit() == []
    assert trainer.step == 5 and trainer.pos.batch == 5 and trainer.epoch == 0


# ------------------------------------------------------------------ exact resume


def dropout_model():
    torch.manual_seed(0)  # nin_cifar10 has dropout stages: resume must restore the RNG too
    return create_model("nin_cifar10", num_classes=4, width=0.1, in_channels=1)


def scaled_model():
    torch.manual_seed(0)  # BatchNorm, no dropout: fp16 convolutions are slow on CPUs, and this one is small
    return create_model("nin28", num_classes=4, width=0.25)


# an epoch boundary, inside an epoch; with channels_last buffers; in each precision (fp16: the gradient scaler too)
@pytest.mark.slow
@pytest.mark.parametrize("stop_at, channels_last, amp, make_model", [
    (16, False, "none", dropout_model), (21, False, "none", dropout_model), (21, True, "none", dropout_model),
    (21, True, "bf16", dropout_model), (21, True, "fp16", scaled_model)], ids=lambda v: getattr(v, "__name__", None))
def test_resume_is_exact(tmp_path, stop_at, channels_last, amp, make_model):
    aug = Augment(crop_padding=2, flip=True)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, channels_last=channels_last, amp=amp)
    dropout_model = make_model  # noqa: N806 - the factory of this case

    def trainer(model, config, train, test, callbacks=()):
        t = Trainer(model, config, train, test, callbacks)
        if amp == "fp16":  # start the scale so high that the first steps overflow and are skipped, lowering it
            t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
        return t

    train, test = loaders(size=16, augment=aug)
    full = dropout_model()
    trainer(full, cfg, train, test).fit()

    run = tmp_path / "run"
    train, test = loaders(size=16, augment=aug)
    first = dropout_model()
    cut = TrainConfig(**{**cfg.__dict__, "max_steps": stop_at})
    saver = Checkpointer(run, {"model": {"name": "nin_cifar10"}})
    cut_trainer = trainer(first, cut, train, test, [saver])
    cut_trainer.fit()
    if amp == "fp16":  # the scale came down from its start as steps were skipped: resume must restore it
        assert cut_trainer.scaler.get_scale() < 2.0**40
    assert saver.last_path is not None and saver.last_path.name == f"step-{stop_at:07d}"

    torch.manual_seed(1234)  # whatever the RNG is now, resume restores it
    train, test = loaders(size=16, augment=aug)
    resumed = dropout_model()
    ckpt.load_weights(saver.last_path, resumed)
    again = trainer(resumed, cfg, train, test)
    again.load_state_dict(ckpt.load_state(saver.last_path))
    history = again.fit()

    assert [h["epoch"] for h in history] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bf16_autocast_trains_on_this_device():
    train, test = loaders()
    trainer = Trainer(small_model(), TrainConfig(**{**FAST, "epochs": 1, "amp": "bf16"}), train, test)
    with trainer.autocast():
        assert trainer.step_model(next(iter(train))[0]).dtype == torch.bfloat16
    (epoch,) = trainer.fit()
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["test_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32


@pytest.mark.slow
def test_fp16_autocast_trains_with_a_gradient_scaler():
    train, test = loaders()
    trainer = Trainer(small_model(), TrainConfig(**{**FAST, "epochs": 1, "amp": "fp16"}), train, test)
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    with trainer.autocast():
        assert trainer.step_model(next(iter(train))[0]).dtype == torch.float16
    (epoch,) = trainer.fit()
    assert math.isfinite(epoch["train_loss"]) and epoch["train_acc"] > 0.5  # 4 classes: it learned
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    scale = trainer.state_dict()["scaler"]["scale"]
    assert scale == trainer.scaler.get_scale() > 0  # saved with the run, so a resume continues the same scale
    bf16 = Trainer(small_model(), TrainConfig(**{**FAST, "amp": "bf16"}), *loaders())
    assert bf16.scaler is None and bf16.state_dict()["scaler"] is None  # bf16 has fp32's range: no scaler


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_fp16_steps_skipped_for_overflow_leave_the_optimizer_finite(fused):
    """torch's fused SGD leaves its momentum buffers uninitialized when the first step is skipped for an overflow;
    the trainer starts them at zero, so the next steps stay finite (this run diverged to NaN before)."""
    train, test = loaders()
    trainer = Trainer(small_model(), TrainConfig(**{**FAST, "epochs": 1, "amp": "fp16", "fused": fused}), train, test)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the first steps overflow
    (epoch,) = trainer.fit()
    assert trainer.scaler.get_scale() < 2.0**40 and math.isfinite(epoch["train_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in trainer.optimizer.state.values())


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    """Make torch report one CUDA GPU with these properties (what amp_choice and resolved() read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch says on a T4 too
    monkeypatch.delenv("NIN_AMP", raising=False)
    return torch.device("cuda", 0)


def test_amp_auto_on_a_t4_is_fp16_with_a_gradient_scaler_and_says_why(monkeypatch):
    from nin.training.precision import amp_choice

    gpu = fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    mode, why = amp_choice(gpu)
    assert mode == "fp16"
    assert "Tesla T4" in why and "7.5" in why and "no native bf16" in why and "gradient scaler" in why
    resolved = TrainConfig().resolved(gpu)
    assert resolved.amp == "fp16" and resolved.compile and resolved.channels_last


@pytest.mark.parametrize("name, capability", [("NVIDIA A100-SXM4-40GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))])
def test_amp_auto_on_ampere_and_later_is_bf16(monkeypatch, name, capability):
    from nin.training.precision import amp_choice

    mode, why = amp_choice(fake_gpu(monkeypatch, name, capability))
    assert mode == "bf16" and "natively" in why and name in why


def test_nin_amp_overrides_auto_and_a_bad_value_is_one_clear_error(monkeypatch):
    from nin.training.precision import amp_choice

    gpu = fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setenv("NIN_AMP", "none")
    assert amp_choice(gpu) == ("none", "NIN_AMP=none is set")
    assert TrainConfig().resolved(torch.device("cpu")).amp == "none"
    assert TrainConfig(amp="bf16").resolved(gpu).amp == "bf16"  # an explicit --amp wins over the variable
    monkeypatch.setenv("NIN_AMP", "fp8")
    with pytest.raises(NinError, match="NIN_AMP='fp8'"):
        amp_choice(gpu)


@pytest.mark.slow
def test_checkpointer_keeps_the_last_n(tmp_path):
    train, test = loaders()
    saver = Checkpointer(tmp_path, {}, keep_last=2)
    Trainer(small_model(), TrainConfig(**FAST), train, test, [saver]).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000032", "step-0000048"]
    assert saver.last_path.name == "step-0000048"


@pytest.mark.slow
def test_compiled_training_matches_eager():
    # fp32 pinned: inductor's fused kernels round differently from eager ones, and the tolerances are fp32's
    results = []
    for compiled in (False, True):
        train, test = loaders()
        cfg = TrainConfig(**{**FAST, "epochs": 1, "compile": compiled, "amp": "none"})
        trainer = Trainer(small_model(), cfg, train, test)
        (epoch,) = trainer.fit()
        results.append((epoch, trainer.model.state_dict()))
    (eager, w_eager), (comp, w_comp) = results
    assert comp["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert comp["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)
    for k in w_eager:
        assert torch.allclose(w_eager[k].float(), w_comp[k].float(), atol=1e-4), k


class SlowEval(nn.Module):
    """Sleep 0.1 s per forward in eval mode, so evaluation time is known to be at least 0.2 s per epoch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if not self.training:
            time.sleep(0.1)
        return self.model(x)


@pytest.mark.slow
def test_wall_time_of_a_resumed_run_counts_earlier_evaluation():
    train, test = loaders()
    model = SlowEval(small_model())
    first = Trainer(model, TrainConfig(**{**FAST, "epochs": 1}), train, test)
    first.fit()
    second = Trainer(model, TrainConfig(**{**FAST, "epochs": 2}), train, test)
    second.load_state_dict(first.state_dict())
    h = second.fit()
    assert h[0]["wall_time"] >= h[0]["epoch_time"] + 0.2
    # the second epoch adds its training and its (slow) evaluation to the first epoch's wall time
    assert h[1]["wall_time"] - h[0]["wall_time"] >= h[1]["epoch_time"] + 0.2


@pytest.mark.slow
def test_the_optimizer_and_the_loss_come_from_outside_with_sgd_and_cross_entropy_by_default():
    """The trainer is not tied to SGD or cross-entropy: it takes both, sets the schedule's lr on every group of
    the optimizer it was given, and learns with them."""
    train, test = loaders()
    made, seen = [], []

    def adamw(model, config):
        made.append(config.lr)
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)

    class CountingLoss(torch.nn.CrossEntropyLoss):
        def forward(self, out, y):
            seen.append(len(y))
            return super().forward(out, y)

    cfg = TrainConfig(**{**FAST, "epochs": 2, "lr": 0.01, "schedule": "constant"}, amp="none")
    t = Trainer(small_model(), cfg, train, test, optimizer=adamw, criterion=CountingLoss())
    history = t.fit()
    assert isinstance(t.optimizer, torch.optim.AdamW) and made == [0.01]
    assert sum(seen) >= 2 * 512 and all(g["lr"] == 0.01 for g in t.optimizer.param_groups)
    assert history[-1]["test_acc"] > 0.5  # the synthetic classes are easy: it learned with them
    default = Trainer(small_model(), cfg, train, test)
    assert isinstance(default.optimizer, torch.optim.SGD) and isinstance(default.criterion, torch.nn.CrossEntropyLoss)
