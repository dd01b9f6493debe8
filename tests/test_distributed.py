"""Data-parallel training under torchrun: 2 CPU processes over gloo against 1 process, resume, errors.

The runs are real ``torchrun --nproc-per-node 2 -m nin train`` commands on real Fashion-MNIST.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE
from safetensors.torch import load_file

from nin.cli.main import main
from nin.errors import NinError
from nin.training import checkpoint as ckpt
from nin.training import distributed

# 256 images, a global batch of 64: 4 steps per epoch, 2 epochs. No BatchNorm and no dropout: with them,
# 2 processes of 32 images are not the same computation as 1 of 64 (per-process batch statistics and masks).
# fp32 pinned: the comparisons below are at fp32 rounding, which --amp auto would not give on a bf16 machine.
COMMON = ["--subset", "256", "--test-subset", "200", "--epochs", "2", "--no-batch-norm", "--lr", "0.02",
          "--schedule", "constant", "--seed", "3", "--device", "cpu", "--amp", "none", "--quiet"]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest, over tensors, of ||a - b|| / ||b||."""
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b)


def torchrun(*args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nin", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def nin(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nin", "train", *args], capture_output=True, text=True,
                          timeout=timeout)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "model.safetensors")


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist):
    root = tmp_path_factory.mktemp("ddp")
    # checkpoints at steps 3, 4, 6 and 8: inside and at the end of each epoch, all kept
    two = torchrun(*COMMON, "--batch-size", "32", "--checkpoint-every", "3", "--keep-last", "0",
                   "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr
    one = nin(*COMMON, "--batch-size", "64", "--threads", "1", "--out", str(root / "one"))
    assert one.returncode == 0, one.stderr
    return root, two


@pytest.mark.slow  # torchrun: real processes
def test_two_processes_of_half_the_batch_reach_the_weights_of_one_process(runs):
    root, _ = runs
    two, one = final_weights(root / "two"), final_weights(root / "one")
    # fp32 sums in another order (two halves of the batch, then an all-reduce) differ in the last bits, and
    # training amplifies that a little each step; a different computation differs by far more (next test).
    assert relative_difference(two, one) < TOLERANCE["none"]
    earlier = load_file(root / "one" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert relative_difference(one, earlier) > 1e-2  # and the weights did move: the comparison means something


@pytest.mark.slow  # torchrun: real processes
def test_the_tolerance_tells_runs_apart(runs, tmp_path):
    # 1 process of batch 32 (another global batch) is far outside the tolerance the test above uses
    root, _ = runs
    other = nin(*COMMON, "--batch-size", "32", "--max-steps", "8", "--threads", "1", "--out", str(tmp_path / "r"))
    assert other.returncode == 0, other.stderr
    a, b = final_weights(tmp_path / "r"), final_weights(root / "one")
    assert relative_difference(a, b) > 10 * TOLERANCE["none"]


@pytest.mark.slow  # torchrun: real processes
def test_metrics_are_reduced_over_processes(runs):
    root, _ = runs
    two, one = history(root / "two"), history(root / "one")
    assert [h["step"] for h in two] == [4, 8] == [h["step"] for h in one]
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1 / 256 + 1e-9)  # an argmax tie may flip
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 200 + 1e-9)  # the whole test subset, 2 shares


@pytest.mark.slow  # torchrun: real processes
def test_only_the_main_process_writes(runs):
    root, two = runs
    assert sorted(p.name for p in (root / "two").iterdir()) == [
        "checkpoints", "config.json", "curves.png", "metrics.csv", "metrics.jsonl"]
    assert json.loads((root / "two" / "config.json").read_text())["env"]["processes"] == 2
    assert two.stdout.count("run directory:") == 1  # one summary, from rank 0


@pytest.mark.slow  # torchrun: real processes
def test_a_distributed_run_resumes_exactly(runs, tmp_path):
    """A copy of the run as it was at step 6 (inside epoch 2), resumed by 2 processes, ends as the run did, bit
    for bit (each process's partial sums of the epoch were saved)."""
    import shutil

    root, _ = runs
    assert [p.name for p in ckpt.list_checkpoints(root / "two")] == [f"step-{s:07d}" for s in (3, 4, 6, 8)]
    out = tmp_path / "r"
    shutil.copytree(root / "two", out, symlinks=True)
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    again = torchrun("--resume", str(out), "--quiet")
    assert again.returncode == 0, again.stderr
    resumed, straight = final_weights(out), final_weights(root / "two")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    keys = ("epoch", "step", "train_loss", "train_acc", "test_acc", "test_loss")
    assert [{k: h[k] for k in keys} for h in history(out)] == [{k: h[k] for k in keys} for h in history(root / "two")]


@pytest.mark.slow  # torchrun: real processes
def test_resuming_with_another_number_of_processes_is_one_clear_error(runs, capsys):
    root, _ = runs
    before = {p: p.read_bytes() for p in (root / "two").iterdir() if p.is_file()}
    code = main(["train", "--resume", str(root / "two"), "--epochs", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "saved by 2 process(es)" in err and "resume it with as many" in err
    assert {p: p.read_bytes() for p in (root / "two").iterdir() if p.is_file()} == before  # config.json too


@pytest.mark.slow  # torchrun: real processes
def test_an_error_on_the_main_process_stops_every_process_with_one_line(runs):
    root, _ = runs
    before = (root / "two" / "metrics.jsonl").read_bytes()
    r = torchrun(*COMMON, "--batch-size", "32", "--out", str(root / "two"), timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("nin: error:")]
    assert len(errors) == 1 and "already exists" in errors[0]  # printed by rank 0 only; rank 1 did not hang
    # torchrun's own agent prints a ChildFailedError traceback for any failed child; none comes from nin
    assert "src/nin/" not in r.stderr  # and no traceback line from nin's own code
    assert (root / "two" / "metrics.jsonl").read_bytes() == before


LEAVE = '''
import os, threading, time, weakref
import torch, torch.distributed as dist
from nin.training import distributed

released = threading.Event()

def on_release(_):  # on a gloo worker thread, inside the deallocation of the tensor (sleep releases the GIL)
    released.set()
    time.sleep(0.5)

def work(rank):
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))  # as nin's Trainer does
    model(torch.randn(2, 4)).sum().backward()
    out = [torch.zeros(1) for _ in range(2)]
    if rank == 1:
        time.sleep(0.3)
        dist.all_gather(out, torch.ones(1))
        return None
    dist.all_gather(out, torch.ones(1), async_op=True)  # done when rank 1 joins; its worker thread frees out
    return weakref.ref(out[0], on_release)

env = distributed.setup("cpu")
ref = work(env.rank)
if env.rank == 0:
    assert released.wait(60)
distributed.teardown()
tasks = "/proc/self/task"
names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
print(f"rank {env.rank} threads left:", ",".join(sorted(n for n in names if "gloo" in n)) or "none", flush=True)
'''


@pytest.mark.slow  # torchrun: real processes
def test_leaving_the_process_group_stops_its_threads_before_the_interpreter_exits(tmp_path):
    """A gloo worker thread that frees a finished collective's Python tensors after Py_FinalizeEx has begun
    aborts the process ("terminate called without an active exception", exit -6): once in a while at the end
    of a torchrun run, every time here, where that deallocation is made to last 0.5 s. teardown() must destroy
    the group, joining those threads, even after DistributedDataParallel has imported torch.distributed.nn."""
    (tmp_path / "leave.py").write_text(LEAVE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(tmp_path / "leave.py")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
    if Path("/proc/self/task").is_dir():
        left = sorted(line for line in r.stdout.splitlines() if "threads left" in line)
        assert left == ["rank 0 threads left: none", "rank 1 threads left: none"]


# ------------------------------------------------------------------- in-process: the environment


@pytest.mark.parametrize("environ, expected", [
    ({}, distributed.DistEnv()),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, distributed.DistEnv(1, 1, 4)),
    ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, distributed.DistEnv(5, 1, 8)),
])
def test_ranks_come_from_torchruns_environment(environ, expected):
    assert distributed.from_environment(environ) == expected


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "inconsistent torchrun environment"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"}, "inconsistent torchrun environment"),
])
def test_a_broken_environment_is_a_clear_error(environ, words):
    with pytest.raises(NinError, match=words):
        distributed.from_environment(environ)


def test_only_train_runs_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["profile", "nin28"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only nin train runs under torchrun" in err


def test_without_a_process_group_the_helpers_run_locally():
    assert distributed.on_main(lambda: 7) == 7
    assert distributed.agree(lambda: 8) == 8 and distributed.agree(lambda: 8, run_here=False) is None
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    assert distributed.main_first(lambda: 9) == 9
    with pytest.raises(NinError, match="boom"):
        distributed.on_main(lambda: (_ for _ in ()).throw(NinError("boom")))
