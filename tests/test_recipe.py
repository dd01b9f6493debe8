"""The techniques of the stronger recipes: random erasing (in batches, on the device), flip test-time augmentation
in each epoch's evaluation, and an EMA of the weights (evaluated, checkpointed, resumed exactly, and used for
inference)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nin.data.loader import ERASE_AREA, ERASE_RATIO, Augment, DeviceLoader, erase, erase_boxes
from nin.errors import NinError
from nin.inference.tta import FlipTTA
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.callbacks import EMA
from nin.training.callbacks.ema import averaged_weights
from nin.training.config import TrainConfig
from nin.training.trainer import Trainer, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ random erasing


def test_erase_boxes_lie_in_the_image_with_the_papers_area_and_ratio():
    n, shape = 4000, (1, 28, 28)
    boxes = erase_boxes(n, shape, 1.0, torch.Generator().manual_seed(0))
    top, left, h, w, fill = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    share = (h * w).double() / (28 * 28)
    # rounding to whole pixels and clipping at the border widen the range a little
    assert share.min() >= ERASE_AREA[0] * 0.5 and share.max() <= ERASE_AREA[1] * 1.3
    assert abs(share.mean().item() - sum(ERASE_AREA) / 2) < 0.03  # uniform in the range, on average
    ratio = h.double() / w
    assert ratio.min() >= ERASE_RATIO[0] * 0.6 and ratio.max() <= ERASE_RATIO[1] / 0.6
    assert abs(ratio.log().mean().item()) < 0.05  # log-uniform and symmetric: tall as often as wide
    assert fill.min() >= 0 and fill.max() <= 255 and len(fill.unique()) > 200


def test_erase_probability_is_the_share_of_images_erased():
    boxes = erase_boxes(10_000, (3, 32, 32), 0.25, torch.Generator().manual_seed(1))
    assert abs((boxes[:, 2] > 0).double().mean().item() - 0.25) < 0.02
    assert boxes.shape == (10_000, 4 + 3)  # one fill value per channel


def test_erase_fills_exactly_the_box_with_its_values_and_leaves_the_rest():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.int64).remainder(200).to(torch.uint8).view(2, 3, 6, 5)
    boxes = torch.tensor([[1, 2, 3, 2, 250, 251, 252], [0, 0, 0, 4, 9, 9, 9]])  # the second erases nothing
    out = erase(x, boxes)
    expected = x.clone()
    expected[0, :, 1:4, 2:4] = torch.tensor([250, 251, 252], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(out, expected) and out.dtype == torch.uint8


def _batches(augment: Augment, seed: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    loader = DeviceLoader(x, y, 16, shuffle=True, seed=seed, augment=augment)
    loader.set_epoch(1)
    return [b for b, _ in loader]


def test_the_loader_erases_reproducibly_and_leaves_the_other_draws_alone():
    plain = _batches(Augment(crop_padding=2, flip=True))
    erased = _batches(Augment(crop_padding=2, flip=True, erase=0.5))
    again = _batches(Augment(crop_padding=2, flip=True, erase=0.5))
    assert all(torch.equal(a, b) for a, b in zip(erased, again))  # a function of (seed, epoch)
    changed = [(~torch.isclose(a, b)).flatten(1).any(1) for a, b in zip(plain, erased)]
    share = torch.cat(changed).double().mean().item()
    assert 0.25 < share < 0.75  # about half the images were erased ...
    for a, b, c in zip(plain, erased, changed):  # ... and the others are exactly the unerased ones
        assert torch.equal(a[~c], b[~c])


def test_erase_is_a_ranged_setting():
    from nin.training.config import RunConfig

    with pytest.raises(NinError, match="erase must be in"):
        RunConfig.from_dict({"data": {"erase": 1.5}}).validate()



# ------------------------------------------------------------------- TTA in training


def test_tta_reports_the_flip_averaged_accuracy_and_leaves_training_alone():
    plain = _trainer()
    plain.fit()
    x, y = _data()
    xt, yt = _data(64, seed=1)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=32, amp="none", tta=True)
    flipped = Trainer(create_model("nin28", width=0.25), cfg, DeviceLoader(x, y, 32, shuffle=True),
                      DeviceLoader(xt, yt, 64))
    history = flipped.fit()
    # the same weights and training losses: TTA only changes how the test images are scored
    assert all(torch.equal(a, b) for a, b in zip(_params(plain.model), _params(flipped.model)))
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in plain.history]
    test = DeviceLoader(xt, yt, 64)
    by_tta = evaluate(FlipTTA(flipped.eval_model()), test, flipped.criterion)
    alone = evaluate(flipped.eval_model(), test, flipped.criterion)
    assert history[-1]["test_acc"] == pytest.approx(by_tta["acc"])
    assert history[-1]["test_loss"] == pytest.approx(by_tta["loss"])
    assert plain.history[-1]["test_loss"] == pytest.approx(alone["loss"])
    assert by_tta["loss"] != pytest.approx(alone["loss"])  # the mirror images count


def test_tta_is_a_flag_and_a_typed_setting():
    from nin.cli.main import build_parser
    from nin.cli.options import settings_given
    from nin.training.config import RunConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert settings_given(train.parse_args(["--tta"])) == {"train.tta": True}
    assert settings_given(train.parse_args(["--no-tta"])) == {"train.tta": False}
    assert not TrainConfig().tta  # off unless asked for, or by the fast preset (chosen on held-out images)
    from nin.training.config import preset

    fast = preset("fast").train
    assert fast.tta and fast.label_smoothing == 0 and fast.epochs == 18 and preset("fast").model.name == "nin28"
    assert RunConfig.from_dict({"train": {"tta": True}}).train.tta
    with pytest.raises(NinError, match="train.tta must be bool"):
        RunConfig.from_dict({"train": {"tta": "yes"}})


# ------------------------------------------------------------------------- EMA


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,),
                                                                                                   generator=g)


def _trainer(callbacks=(), epochs: int = 2, max_steps: int | None = None, test: bool = True) -> Trainer:
    x, y = _data()
    xt, yt = _data(64, seed=1)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, amp="none", max_steps=max_steps)
    return Trainer(create_model("nin28", width=0.25), cfg, DeviceLoader(x, y, 32, shuffle=True),
                   DeviceLoader(xt, yt, 64) if test else None, list(callbacks))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def test_ema_follows_the_warmed_up_formula():
    model = nn.Linear(3, 2)
    ema = EMA(0.9)
    trainer = type("T", (), {"model": model})()
    ema.on_fit_start(trainer)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.on_step_end(trainer, torch.tensor(0.0))
        d = min(0.9, (1 + step) / (10 + step))
        current = list(model.parameters())
        expected = [c.detach().clone() if step == 0 else d * e + (1 - d) * c.detach()
                    for e, c in zip(expected, current)]
    for e, a in zip(expected, ema.averaged.module.parameters()):
        assert torch.allclose(e, a, atol=1e-6)
    assert ema.updates == 30


def test_the_reported_accuracy_is_the_averages_and_training_is_unchanged():
    plain = _trainer()
    plain.fit()
    ema = EMA(0.95)
    averaged = _trainer([ema])
    history = averaged.fit()
    # the model trained exactly as without the average: it only watches, and swaps back after evaluating
    assert all(torch.equal(a, b) for a, b in zip(_params(plain.model), _params(averaged.model)))
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in plain.history]
    # the test accuracy reported is the average's
    xt, yt = _data(64, seed=1)
    ev = evaluate(ema.averaged.module, DeviceLoader(xt, yt, 64))
    assert history[-1]["test_acc"] == pytest.approx(ev["acc"])
    assert not all(torch.equal(a, b) for a, b in zip(_params(ema.averaged.module), _params(averaged.model)))


def test_an_interrupted_ema_run_resumes_exactly(tmp_path):
    whole = EMA(0.9)
    _trainer([whole]).fit()
    first = EMA(0.9)
    t = _trainer([first], max_steps=4)  # 3 steps per epoch: stops inside the second epoch
    t.fit()
    state = t.state_dict()
    ckpt.save_checkpoint(tmp_path / "step", t.model, state, {"model": {"name": "nin28"}})
    saved = ckpt.load_state(tmp_path / "step")  # through the checkpoint's files
    second = EMA(0.9)
    resumed = _trainer([second])
    ckpt.load_weights(tmp_path / "step", resumed.model)
    resumed.load_state_dict(saved)
    resumed.fit()
    assert second.updates == whole.updates == 6
    assert all(torch.equal(a, b) for a, b in zip(_params(second.averaged.module), _params(whole.averaged.module)))
    assert torch.equal(averaged_weights(saved)["features.block1.0.weight"],
                       first.averaged.module.state_dict()["features.block1.0.weight"])


def test_a_state_whose_average_does_not_fit_is_one_error():
    ema = EMA(0.9)
    t = _trainer([ema])
    t.load_state_dict({**t.state_dict(), "callbacks": {"EMA": {"weights": {"nope": torch.zeros(1)}, "updates": 1}}})
    with pytest.raises(NinError, match="the saved weight average does not fit this model"):
        t.fit()


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, math.nan])
def test_ema_decay_out_of_range_is_refused(decay):
    with pytest.raises(NinError):
        EMA(decay)
    from nin.training.config import RunConfig

    if not math.isnan(decay) and decay != 0.0:
        with pytest.raises(NinError, match="ema must be in"):
            RunConfig.from_dict({"train": {"ema": decay}}).validate()


@pytest.mark.slow
def test_a_run_with_ema_deploys_its_average(tmp_path, fashion_mnist):
    from nin.inference.trained import load_trained
    from nin.training.config import preset
    from nin.training.run import build, train

    cfg = preset("default")
    cfg.data.subset, cfg.data.test_subset = 1024, 256
    cfg.train.epochs, cfg.train.ema, cfg.train.channels_last, cfg.train.amp = 1, 0.9, False, "none"
    result = train(cfg, tmp_path / "run", progress=False)
    trained = load_trained(tmp_path / "run", device="cpu")
    state = ckpt.load_state(result.checkpoint)
    averaged = averaged_weights(state)
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in averaged.items())
    live = ckpt.load_weights  # the checkpoint's model.safetensors still holds the live weights, for resuming
    model = create_model("nin28")
    live(result.checkpoint, model)
    assert not torch.equal(model.state_dict()["features.block1.0.weight"], averaged["features.block1.0.weight"])
    # the accuracy the run reported is what the deployed model gets on the same images (the run evaluated with
    # BatchNorm folded, which may move a logit by a rounding step)
    ev = evaluate(trained.model, build(cfg, init=False).test_loader)
    assert ev["n"] == 256 and ev["acc"] == pytest.approx(result.history[-1]["test_acc"], abs=2 / 256)


def test_tensorboards_class_maps_are_drawn_with_the_average_the_run_evaluates(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import matplotlib.pyplot as plt

    from nin.training.callbacks import TensorBoard

    seen = []

    def drawn(self, trainer):  # the weights in place when the figure is drawn
        seen.append(trainer.model.features.block1[0].weight.detach().clone())
        return plt.figure(figsize=(1, 1))

    monkeypatch.setattr(TensorBoard, "_cam_figure", drawn)
    ema = EMA(0.9)
    trainer = _trainer([ema, TensorBoard(tmp_path / "tb", 100)], epochs=1)
    trainer.fit()
    assert len(seen) == 1
    assert torch.equal(seen[0], ema.averaged.module.features.block1[0].weight)
    assert not torch.equal(seen[0], trainer.model.features.block1[0].weight)  # the live weights are back
