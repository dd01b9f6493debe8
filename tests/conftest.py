"""Shared fixtures: real Fashion-MNIST when it is installed, small synthetic data otherwise.

Precision: ``--amp auto`` (every config's default) picks bf16 on a CPU or GPU that runs it natively and
fp32 elsewhere, so the same test computes in another precision on another machine. A test that compares
two computations therefore pins its precision (``amp="none"``, ``--amp none``) or takes its tolerance from
:data:`TOLERANCE` for the precision in use. ``pytest --precision none|bf16|fp16`` (or ``NIN_AMP=...``)
makes ``auto`` pick that precision everywhere, subprocesses included, to run the whole suite as another
machine kind would; the header line says what ``auto`` picks in this session.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from nin.data.idx import DataError
from nin.data.sources import find_files
from nin.training.precision import AMP_ENV, amp_choice

PRECISIONS = ("auto", "none", "bf16", "fp16")

#: Relative tolerance for comparing the weights of two runs of the same training computation whose sums are
#: only ordered differently (another process count, other kernels), by the precision the forward pass ran in.
#: A few steps of training amplify the last-bit differences. In fp32 they depend on the machine: 2 processes
#: of 32 images against 1 of 64 (tests/test_distributed.py) differ by 5e-5 on AVX2, but by 2.0e-3 on AVX-512
#: and AMX CPUs, where oneDNN blocks a batch of 32 otherwise than one of 64; another computation (another
#: global batch) differs by 0.45. bf16 and fp16 keep 8 and 11 bits of mantissa against fp32's 24.
TOLERANCE = {"none": 1e-2, "bf16": 5e-2, "fp16": 2e-2}


def pytest_addoption(parser):
    parser.addoption("--precision", choices=PRECISIONS, default=None,
                     help="what --amp auto picks in every test and subprocess (sets NIN_AMP); auto: the "
                          "machine's own choice (the default, unless NIN_AMP is set)")


def pytest_configure(config):
    chosen = config.getoption("precision")
    if chosen == "auto":
        os.environ.pop(AMP_ENV, None)
    elif chosen:
        os.environ[AMP_ENV] = chosen
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest-xdist (pyproject's addopts): the workers share the cores rather than each taking all
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_report_header(config):
    mode, why = amp_choice(torch.device("cpu"))
    return f"nin: --amp auto runs {mode} on this CPU ({why}); choose with --precision or {AMP_ENV}"


@pytest.fixture(scope="session")
def precision() -> str:
    """What ``--amp auto`` runs on the CPU in this session: none, bf16 or fp16."""
    return amp_choice(torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def one_thread():
    """Run small CPU tests on one thread (much faster on a shared, busy machine); restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_mnist() -> None:
    """Skip unless real Fashion-MNIST is on this machine; in CI its absence is a failure."""
    try:
        find_files("fashion-mnist", download=False)
    except DataError as e:
        if os.environ.get("CI"):
            pytest.fail(f"real Fashion-MNIST is required in CI: {e}")
        pytest.skip(f"real Fashion-MNIST not installed: {e}")


def synthetic_images(n: int, classes: int = 4, size: int = 12, channels: int = 1, seed: int = 0):
    """uint8 noise images whose class sets the brightness of a central square."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randint(0, 40, (n, channels, size, size), generator=g)
    c = slice(size // 4, size - size // 4)
    x[:, :, c, c] += (labels * (200 // max(classes - 1, 1))).view(n, 1, 1, 1)
    return x.clamp(0, 255).to(torch.uint8), labels


def make_cifar_archive(path, spec, counts: dict[str, int], seed: int = 0, *, extra_members=(), labels_fn=None):
    """Write a CIFAR "python version" archive in the official layout (pickled dicts with bytes keys and
    numpy arrays) holding ``counts[split]`` images per split. Images are learnable: each class has its own
    colour. ``extra_members`` are (TarInfo, bytes) added as they are; ``labels_fn`` may rewrite the labels."""
    import io
    import pickle
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    k = spec.num_classes
    palette = rng.integers(0, 256, (k, 3))

    def batch(n: int, offset: int) -> bytes:
        labels = [(offset + i) % k for i in range(n)]
        img = rng.integers(0, 64, (n, 3, 32, 32)) + palette[labels][:, :, None, None] // 2 + 32
        d = {b"batch_label": b"generated", b"labels" if spec.label_key == "labels" else b"fine_labels":
             labels_fn(labels) if labels_fn else labels, b"data": img.clip(0, 255).astype(np.uint8).reshape(n, -1),
             b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)]}
        return pickle.dumps(d, protocol=4)

    members = {spec.meta: pickle.dumps({spec.names_key.encode(): [f"class{i}".encode() for i in range(k)]},
                                       protocol=4)}
    offset = 0
    for split, names in spec.batches.items():
        n = counts[split]
        sizes = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
        for name, size in zip(names, sizes):
            members[name] = batch(size, offset)
            offset += size
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra_members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fashion_mnist):
    """A run directory of the default recipe trained briefly on real Fashion-MNIST (nin28, with BatchNorm):
    a checkpoint for the commands that use a trained model. Trained once per test session."""
    from nin.training.config import preset
    from nin.training.run import train

    cfg = preset("default")
    cfg.data.subset, cfg.data.test_subset = 2048, 256
    cfg.train.epochs, cfg.train.channels_last = 1, False
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, out, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


# ------------------------------------------------------- helpers for the bad-input tests (errors, hostile)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``nin ARGV`` in this process: its exit status, standard output and standard error."""
    from nin.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, out, err, *needles, status=2) -> str:
    """Exit ``status``, exactly one stderr line ``nin: error: ...`` holding each needle (any case), no traceback."""
    assert code == status, (code, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nin: error: "), err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def snapshot(*roots) -> dict[str, tuple]:
    """Every file (content hash and mtime), folder, link and special file under ``roots``: compare before and
    after a command to show it changed nothing."""
    import hashlib
    from pathlib import Path

    def content(p: Path) -> tuple:
        return (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else ()

    seen: dict[str, tuple] = {}
    for root in map(Path, roots):
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root] if os.path.lexists(root) else []:
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p), *content(p))
            elif p.is_dir():
                seen[str(p)] = ("folder",)
            elif p.is_file():
                seen[str(p)] = content(p)
            else:
                seen[str(p)] = ("special", p.stat().st_mode)
    return seen


@contextlib.contextmanager
def within(seconds: int = 20):
    """Fail with TimeoutError if the block takes longer than ``seconds``: a blocked open (a FIFO without a writer)
    is interrupted instead of hanging the suite."""
    import signal

    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def image_folder(root, classes: int = 3, per_class: int = 8, size: int = 12):
    """``root/cK/NN.png``: ``per_class`` synthetic images of each of ``classes`` classes (a folder data set)."""
    from PIL import Image

    x, y = synthetic_images(classes * per_class, classes=classes, size=size)
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"c{int(label)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(root / f"c{int(label)}" / f"{i:02d}.png")
    return root


class NaNAt(torch.nn.Module):
    """Wrap a model and make its output NaN on the ``at``-th call (1-based): a divergence at a known step."""

    def __init__(self, model, at: int) -> None:
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        return out * float("nan") if self.calls == self.at else out
