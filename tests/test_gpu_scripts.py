"""benchmarks/gpu.sh and gpu_accuracy.sh refuse what they cannot run with one line and exit 2. Their steps run
for real on a GPU (or at toy sizes on the CPU with --dry-run, which takes minutes: not part of this suite)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def script(name: str, *args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(out)})


@pytest.mark.parametrize("args", [(), ("everything",), ("chapter", "--fast"), ("--dry-run",)])
def test_gpu_accuracy_without_a_known_suite_prints_its_usage(tmp_path, args):
    r = script("gpu_accuracy.sh", *args, out=tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "usage: OUT=DIR bash benchmarks/gpu_accuracy.sh chapter|best [--dry-run]"]
    assert not (tmp_path / "out").exists()  # nothing was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name,args", [("gpu.sh", ()), ("gpu_accuracy.sh", ("best",))])
def test_without_a_gpu_they_say_so_and_make_nothing(tmp_path, name, args):
    r = script(name, *args, out=tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{name}: no CUDA GPU here"), r.stderr
    assert "--dry-run" in lines[0] and not (tmp_path / "out").exists()
