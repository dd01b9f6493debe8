"""Never lose a run: SIGKILL at a random step then resume is bit-exact; SIGTERM stops with a checkpoint;
keep-last and best checkpoints; a failing disk leaves every saved checkpoint intact.

The kill tests run ``nin train`` as a real process on real Fashion-MNIST, with one thread so the
computation is the same in every process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nin.cli.main import main
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.callbacks import Checkpointer
from nin.training.config import TrainConfig
from nin.training.trainer import Trainer

# nin28 with BatchNorm and dropout (the global RNG), flips and translations (the loader's draws): 768
# images in batches of 64, 12 steps per epoch, 3 epochs; a checkpoint every 5 steps and at each epoch's end.
ARGS = ["--subset", "768", "--test-subset", "256", "--batch-size", "64", "--epochs", "3", "--dropout", "0.1",
        "--crop-padding", "2", "--seed", "11", "--threads", "1", "--checkpoint-every", "5", "--quiet"]
TOTAL_STEPS = 36
TIMING = ("examples_per_sec", "epoch_time", "wall_time")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nin", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_saved(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in ckpt.list_checkpoints(run)]


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    """Until a checkpoint at ``step`` or later exists (the process is then at or past that step)."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in steps_saved(run)):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def final(run: Path) -> tuple[dict, dict, list[dict]]:
    last = ckpt.list_checkpoints(run)[-1]
    assert last.name == f"step-{TOTAL_STEPS:07d}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (load_file(last / "model.safetensors"), load_file(last / "state.safetensors"),
            [{k: v for k, v in r.items() if k not in TIMING} for r in rows])


def assert_same_run(a: Path, b: Path, note: str = "") -> None:
    (wa, sa, ha), (wb, sb, hb) = final(a), final(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ {note}"
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f"optimizer/RNG differ {note}"
    assert ha == hb, note  # losses and accuracies of every epoch, to the last bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run([sys.executable, "-m", "nin", "train", *ARGS, "--out", str(run)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return run


def resume(run: Path) -> subprocess.Popen:
    return start("--resume", str(run), "--threads", "1", "--quiet")


@pytest.mark.slow
def test_sigterm_then_sigkill_at_a_random_step_then_resume_is_bit_exact(reference, tmp_path):
    """One run, stopped twice: SIGTERM (it saves where it stops), then, resumed, SIGKILL at a random moment
    (it loses the steps since its last checkpoint, maybe in the middle of writing one); resumed again, it
    ends exactly where the uninterrupted run ends."""
    run = tmp_path / "run"
    proc = start(*ARGS, "--out", str(run))
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping after this step" in err and f"nin train --resume {run}" in err
    assert "Traceback" not in err
    stopped = steps_saved(run)[-1]
    assert 5 <= stopped < TOTAL_STEPS and f"stopped by SIGTERM at step {stopped}" in err

    rng = random.Random(os.getpid())  # a different moment on every run of the suite; reported on failure
    target, delay = rng.randrange(stopped + 1, 28), rng.uniform(0, 0.3)
    proc = resume(run)
    wait_for_step(proc, run, max(stopped + 1, target - target % 5))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    note = f"(target step {target}, delay {delay:.2f} s)"
    assert proc.returncode == -signal.SIGKILL, f"not killed {note}"
    killed_at = steps_saved(run)[-1]
    assert stopped < killed_at < TOTAL_STEPS, note
    for path in ckpt.list_checkpoints(run):  # whatever the moment of the kill, every checkpoint is whole
        ckpt.load_state(path)

    proc = resume(run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not list((run / "checkpoints").glob(".step-*"))  # a save the kill interrupted is cleaned up
    assert_same_run(run, reference, f"(stopped at {stopped}, killed after step {killed_at}, {note})")


# ------------------------------------------------------------------ in-process: the checkpoint policy


def tiny_trainer(run: Path, epochs: int, accs: list[float], **checkpointer) -> tuple[Trainer, Checkpointer]:
    from nin.data.loader import DeviceLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    saver = Checkpointer(run, {"model": {"name": "nin28"}}, **checkpointer)
    torch.manual_seed(0)
    trainer = Trainer(create_model("nin28", width=0.25), TrainConfig(epochs=epochs, batch_size=16),
                      DeviceLoader(x, y, 16, shuffle=True), None, [saver])
    # The test accuracy each epoch "reaches", as the checkpointer sees it
    values = iter(accs)
    real_end = trainer._end_epoch

    def end_epoch():
        metrics = real_end()
        metrics["test_acc"] = trainer.history[-1]["test_acc"] = next(values)
        return metrics

    trainer._end_epoch = end_epoch
    return trainer, saver


def test_keep_last_keeps_the_newest_and_the_best(tmp_path):
    trainer, saver = tiny_trainer(tmp_path, 5, [0.5, 0.9, 0.6, 0.7, 0.8], keep_last=2)
    trainer.fit()
    root = tmp_path / "checkpoints"
    assert steps_saved(tmp_path) == [8, 16, 20]  # the best (epoch 2) and the newest two
    assert os.readlink(root / "best") == "step-0000008" and saver.best_path == root / "step-0000008"
    assert ckpt.best_checkpoint(tmp_path) == root / "step-0000008"


def test_best_moves_only_on_improvement_and_survives_a_resume(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 2, [0.5, 0.4], keep_last=0)
    trainer.fit()
    assert os.readlink(tmp_path / "checkpoints" / "best") == "step-0000004"
    resumed, saver = tiny_trainer(tmp_path, 4, [0.45, 0.6], keep_last=0)
    resumed.load_state_dict(ckpt.load_state(ckpt.list_checkpoints(tmp_path)[-1]))
    resumed.fit()
    assert saver.best_value == 0.6 and os.readlink(tmp_path / "checkpoints" / "best") == "step-0000016"


def test_checkpoint_every_n_steps_inside_epochs(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 2, [0.1, 0.2], keep_last=0, every_steps=3)
    trainer.fit()
    assert steps_saved(tmp_path) == [3, 4, 6, 8]  # every 3 steps, and each epoch's end (4, 8)


def test_a_killed_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 1, [0.1])
    trainer.fit()
    stale = tmp_path / "checkpoints" / ".step-0000009.abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert steps_saved(tmp_path) == [4]  # never taken for a checkpoint
    again, _ = tiny_trainer(tmp_path, 2, [0.1, 0.2])
    again.load_state_dict(ckpt.load_state(ckpt.list_checkpoints(tmp_path)[-1]))
    again.fit()
    assert not stale.exists() and steps_saved(tmp_path) == [4, 8]


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_keeps_every_checkpoint(tmp_path, capsys, monkeypatch,
                                                                              fashion_mnist):
    out = tmp_path / "run"
    real = ckpt.save_file
    calls = []

    def fills_up(tensors, filename, *a, **kw):
        calls.append(filename)
        if len(calls) > 2:  # the first checkpoint (two files) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    code = main(["train", "--subset", "128", "--test-subset", "64", "--batch-size", "32", "--epochs", "2",
                 "--checkpoint-every", "2", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "step-0000004: could not write the checkpoint (no space left on device)" in err
    assert steps_saved(out) == [2] and not list((out / "checkpoints").glob(".step-*"))
    ckpt.load_state(out / "checkpoints" / "step-0000002")  # whole and loadable
    # and the run continues from it once there is space again
    monkeypatch.setattr(ckpt, "save_file", real)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert steps_saved(out)[-1] == 8


@pytest.mark.parametrize("flags, words", [
    (["--checkpoint-every", "0"], "--checkpoint-every: expected an integer in [1, 10**12], got '0'"),
    (["--keep-last", "-1"], "--keep-last: expected an integer in [0, 10**6], got '-1'"),
])
def test_bad_checkpoint_flags_are_usage_errors(flags, words, capsys):
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_a_state_saved_by_another_model_is_refused_whole(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 1, [0.1])
    trainer.fit()
    state = ckpt.load_state(ckpt.list_checkpoints(tmp_path)[-1])
    other, _ = tiny_trainer(tmp_path / "o", 1, [0.1])
    other.model = create_model("nin28")  # wider: the momentum buffers do not fit
    other.optimizer = torch.optim.SGD(other.model.parameters(), lr=0.1, momentum=0.9)
    before = other.optimizer.state_dict()
    from nin.errors import NinError

    with pytest.raises(NinError, match="optimizer state does not fit"):
        other.load_state_dict(state)
    assert other.optimizer.state_dict() == before and other.pos.step == 0


def test_a_failed_metrics_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from nin.errors import NinError
    from nin.training.callbacks import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.write([{"epoch": 1, "train_loss": 1.0}])
    before = (tmp_path / "metrics.csv").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NinError, match=r"metrics.csv: cannot write: no space left on device"):
        writer.write([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]  # no temporary left


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "not a run configuration"),
    ("{\"config\": {\"train\": {\"epochs\": \"ten\"}}}", "config.json: train.epochs must be int"),
    ("{\"config\": {\"nonsense\": 1}}", "config.json: unknown RunConfig setting(s): nonsense"),
    ("{not json", "config.json: not valid JSON"),
])
def test_resume_with_a_damaged_config_is_one_line(tmp_path, capsys, text, words):
    trainer, _ = tiny_trainer(tmp_path, 1, [0.1])
    trainer.fit()
    (tmp_path / "config.json").write_text(text)
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_the_checkpointer_keeps_its_best_value_in_the_checkpoint_and_resumes_from_it(tmp_path):
    """Its state travels in each checkpoint (under the trainer's "callbacks"): a resumed run knows the best
    value without reading a step out of a folder name, even when the best checkpoint is not the newest."""
    trainer, _ = tiny_trainer(tmp_path, 3, [0.5, 0.7, 0.6], keep_last=0)
    trainer.fit()
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    state = ckpt.load_state(newest)
    assert state["callbacks"]["Checkpointer"] == {"monitor": "test_acc", "best_value": 0.7, "best_step": 8}
    first = ckpt.load_state(ckpt.list_checkpoints(tmp_path)[0])  # the first epoch's checkpoint is its own best
    assert first["callbacks"]["Checkpointer"]["best_value"] == 0.5
    (tmp_path / "checkpoints" / "best").unlink()  # nothing to read a value back from but the state
    resumed, saver = tiny_trainer(tmp_path, 4, [0.65], keep_last=0)
    resumed.load_state_dict(state)
    resumed.fit()
    assert saver.best_value == 0.7 and saver.best_step == 8  # 0.65 is no improvement on the restored 0.7
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_callbacks_are_called_in_order_through_one_dispatcher_and_state_keys_are_unique():
    from nin.errors import NinError
    from nin.training.callbacks import Callback, CallbackList

    calls = []

    class Log(Callback):
        def __init__(self, name):
            self.name = name

        def on_epoch_end(self, trainer, metrics):
            calls.append((self.name, metrics["epoch"]))

        def state_dict(self):
            return {"name": self.name}

    cbs = CallbackList([Log("a"), Log("b")])
    cbs.call("on_epoch_end", None, {"epoch": 1})
    assert calls == [("a", 1), ("b", 1)]
    with pytest.raises(ValueError, match="no callback hook 'on_epoch_begin'"):
        cbs.call("on_epoch_begin", None)
    with pytest.raises(NinError, match="two callbacks keep their state under 'Log'"):
        cbs.state_dict()
    assert CallbackList([Log("a")]).state_dict() == {"Log": {"name": "a"}}
