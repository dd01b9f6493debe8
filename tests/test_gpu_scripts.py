"""benchmarks/gpu.sh, gpu_accuracy.sh and accuracy.sh refuse what they cannot run with one line and exit 2. The
GPU scripts' steps run for real on a GPU (or at toy sizes on the CPU with --dry-run, which takes minutes:
not part of this suite)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name: str, *args: str, out: Path, python: str = "python3") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(out), "PYTHON": python})


@pytest.mark.parametrize("args", [(), ("everything",), ("chapter", "--fast"), ("--dry-run",)])
def test_gpu_accuracy_without_a_known_suite_prints_its_usage(tmp_path, args):
    r = script("gpu_accuracy.sh", *args, out=tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "usage: OUT=DIR bash benchmarks/gpu_accuracy.sh chapter|best [--dry-run]"]
    assert not (tmp_path / "out").exists()  # nothing was made


@pytest.mark.parametrize("args", [(), ("everything",)])
def test_accuracy_sh_without_a_known_case_prints_its_usage_before_running_anything(tmp_path, args):
    r = script("accuracy.sh", *args, out=tmp_path / "out")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().splitlines() == [
        "usage: bash benchmarks/accuracy.sh fast|best|validate|d2l|d2l-reader|ablate|baselines|alexnet|vgg11"]


@pytest.mark.parametrize("name,args", [("gpu.sh", ()), ("gpu_accuracy.sh", ("best",))])
def test_without_a_gpu_they_say_so_and_make_nothing(tmp_path, name, args):
    python = tmp_path / "python"  # a Python whose torch sees no CUDA device, on any machine
    python.write_text('#!/bin/sh\ncase "$*" in *cuda.is_available*) exit 1 ;; *) echo "torch 9.9+fake" ;; esac\n')
    python.chmod(0o755)
    r = script(name, *args, out=tmp_path / "out", python=str(python))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [f"{name}: no CUDA GPU here (torch 9.9+fake); nothing to measure. "
                                           "--dry-run runs the same steps on the CPU at toy sizes."], r.stderr
    assert not (tmp_path / "out").exists()
