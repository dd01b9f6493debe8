"""nin doctor: what the machine is, what nin will do on it and why, and how fast it can go.

The CPU and GPU tests feed the readers other machines (a /proc/cpuinfo text, mocked torch.cuda
calls), so they pass on any machine and never assert this one's own features.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from nin.analysis import doctor, probes
from nin.cli.main import main

BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
        "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 fma cx16 "
        "sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 "
        "rdseed adx smap clflushopt sha_ni xsaveopt xsavec xgetbv1 xsaves")
ZEN1 = BASE + " cmp_legacy svm extapic cr8_legacy sse4a misalignsse 3dnowprefetch topoext perfctr_core clzero"
ZEN5 = (BASE + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 gfni "
        "vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq avx_vnni avx512_vp2intersect")
SAPPHIRE_RAPIDS = (BASE + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi "
                   "avx512_vbmi2 gfni vaes avx512_vnni avx_vnni amx_bf16 avx512_fp16 amx_tile amx_int8")
SKYLAKE_SP = BASE + " avx512f avx512dq avx512cd avx512bw avx512vl"
SECTIONS = ("machine", "kind", "software", "gpus", "defaults", "measurements", "datasets")
TITLES = ("Machine", "Machine kind", "Software", "GPUs", "What nin will do here", "Measurements", "Data sets")
DATASET_ROWS = [{"name": "fashion-mnist", "shape": "1x28x28", "classes": 10, "found": "/somewhere",
                 "checksum": "ok (stub)", "source": "stub"}]


def cpuinfo(flags: str, model: str = "AMD EPYC Processor", vendor: str = "AuthenticAMD") -> str:
    block = f"processor\t: {{}}\nvendor_id\t: {vendor}\nmodel\t\t: 143\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    return "\n".join(block.format(i) for i in range(2))


@pytest.fixture(autouse=True)
def no_forced_amp(monkeypatch):
    """The suite may run at a forced precision (NIN_AMP); these tests are about what auto picks."""
    monkeypatch.delenv("NIN_AMP", raising=False)


@pytest.fixture
def stub_datasets(monkeypatch):
    """Skip the data sets' checksums (a second each) where the test is about something else."""
    import nin.data

    monkeypatch.setattr(nin.data, "status", lambda data_dir=None: [dict(r) for r in DATASET_ROWS])


def mock_gpu(monkeypatch, name: str, capability: tuple[int, int], memory_gib: int = 16, sms: int = 40):
    """One CUDA GPU as torch.cuda reports it (nin.training.precision.amp_choice and nin.analysis.doctor read these
    calls)."""
    props = SimpleNamespace(name=name, total_memory=memory_gib * 2**30, multi_processor_count=sms,
                            major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)


def run_json(capsys, *args: str) -> dict:
    assert main(["doctor", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------- CPU kinds


@pytest.mark.parametrize("flags, slug, has, lacks", [
    (ZEN1, "cpu-avx2", {"avx2", "fma"}, {"avx512f", "avx512_bf16", "amx_tile"}),
    (SKYLAKE_SP, "cpu-avx512", {"avx2", "avx512f"}, {"avx512_bf16", "amx_bf16"}),
    (ZEN5, "cpu-avx512-bf16", {"avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni"}, {"amx_tile", "amx_bf16"}),
    (SAPPHIRE_RAPIDS, "cpu-amx", {"avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}, set()),
])
def test_cpu_kind_comes_from_the_flags(flags, slug, has, lacks):
    info = doctor.cpu_info(cpuinfo(flags), arch="x86_64")
    assert has <= set(info["features"]) and not lacks & set(info["features"])
    assert info["model"] == "AMD EPYC Processor" and info["vendor"] == "AuthenticAMD" and info["arch"] == "x86_64"
    kind, label = doctor.machine_kind(info)
    assert kind == slug and label.startswith("x86-64 CPU with")
    assert ("no native bf16" in label) == (slug in ("cpu-avx2", "cpu-avx512"))


def test_kind_does_not_come_from_the_model_name():
    """A VM that calls an AMX CPU "Common KVM processor" is still cpu-amx; a name saying AMX does not make one."""
    hidden = doctor.cpu_info(cpuinfo(SAPPHIRE_RAPIDS, model="Common KVM processor"), arch="x86_64")
    boasting = doctor.cpu_info(cpuinfo(ZEN1, model="Xeon with AMX and AVX-512"), arch="x86_64")
    assert doctor.machine_kind(hidden)[0] == "cpu-amx"
    assert doctor.machine_kind(boasting)[0] == "cpu-avx2"


def test_arm_and_other_cpus_and_a_missing_model_name(monkeypatch):
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sve sve2 bf16 i8mm\n" \
          "CPU implementer\t: 0x41\nCPU part\t: 0xd4f\n"
    info = doctor.cpu_info(arm, arch="aarch64")
    assert info["features"] == ["asimd", "sve", "sve2", "bf16", "i8mm"] and "0x41" in info["model"]
    assert doctor.machine_kind(info) == ("cpu-arm64", "64-bit Arm CPU with bf16")
    monkeypatch.setattr(doctor.platform, "processor", lambda: "Some CPU")
    plain = doctor.cpu_info("flags : sse sse2\n", arch="x86_64")
    assert plain["model"] == "Some CPU" and plain["features"] == []
    assert doctor.machine_kind(plain)[0] == "cpu-other"
    assert doctor.machine_kind(doctor.cpu_info("", arch="riscv64"))[0] == "cpu-other"


def test_memory_and_cgroup_limits(tmp_path):
    meminfo = "MemTotal:       32768000 kB\nMemFree:         1000 kB\nMemAvailable:   16384000 kB\n"
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "memory.max").write_text("4294967296\n")
    mem = doctor.memory_info(meminfo, cgroup_text="0::/job\n", cgroup_root=tmp_path)
    assert mem == {"total_gib": 31.2, "available_gib": 15.6, "cgroup_limit_gib": 4.0}
    (tmp_path / "job" / "memory.max").write_text("max\n")
    assert doctor.cgroup_memory_limit("0::/job\n", tmp_path) is None
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")  # cgroup v1, seen as the root
    assert doctor.cgroup_memory_limit("4:memory:/elsewhere\n", tmp_path) == 2**30
    assert doctor.memory_info("", cgroup_text="", cgroup_root=tmp_path)["total_gib"] is None


# ---------------------------------------------------------------------- GPUs


def test_a_t4_gets_fp16_with_a_gradient_scaler(monkeypatch, capsys, stub_datasets):
    mock_gpu(monkeypatch, "Tesla T4", (7, 5), memory_gib=15)
    report = run_json(capsys, "--no-measure")
    amp = report["defaults"]["amp"]
    assert amp["value"] == "fp16" and amp["grad_scaler"] is True
    assert "no native bf16" in amp["reason"] and "7.5" in amp["reason"] and "gradient scaler" in amp["reason"]
    gpu = report["gpus"][0]
    assert gpu["name"] == "Tesla T4" and gpu["compute_capability"] == "7.5" and gpu["memory_gib"] == 15.0
    assert not gpu["bf16_native"] and not gpu["tf32"] and gpu["fp16_tensor_cores"]
    assert report["kind"]["slug"] == "cuda-tesla-t4" and "no native bf16" in report["kind"]["label"]
    assert report["defaults"]["device"]["value"].startswith("cuda")
    assert report["defaults"]["compile"]["value"] is True and "no TF32" in report["defaults"]["tf32"]["reason"]
    assert main(["doctor", "--no-measure"]) == 0
    text = capsys.readouterr().out
    assert "fp16 + grad scaler" in text and "Tesla T4" in text


def test_an_h100_gets_bf16(monkeypatch, capsys, stub_datasets):
    mock_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), memory_gib=80, sms=132)
    report = run_json(capsys, "--no-measure", "--device", "cuda:0")
    amp = report["defaults"]["amp"]
    assert amp["value"] == "bf16" and amp["grad_scaler"] is False and "natively" in amp["reason"]
    gpu = report["gpus"][0]
    assert gpu["bf16_native"] and gpu["tf32"] and gpu["multiprocessors"] == 132 and gpu["memory_gib"] == 80.0
    assert report["kind"]["slug"] == "cuda-nvidia-h100-80gb-hbm3"
    assert report["defaults"]["device"] == {"value": "cuda:0", "reason": "--device cuda:0"}


def test_a_gpu_that_is_not_there_is_one_error_line(monkeypatch, capsys, stub_datasets):
    mock_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert main(["doctor", "--device", "cuda:3", "--no-measure"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("nin: error: ") and "no such GPU" in err and err.count("\n") == 1


def test_gpu_kind_names():
    gpu = {"name": "NVIDIA H200", "compute_capability": "9.0", "bf16_native": True, "fp16_tensor_cores": True}
    assert doctor.machine_kind({"arch": "x86_64", "features": ["avx2"]}, [gpu] * 8) == (
        "cuda-nvidia-h200", "8 x NVIDIA H200, compute capability 9.0, native bf16 and TF32")


# ---------------------------------------------------------------- the command


def test_json_has_every_section_and_is_self_consistent(capsys, stub_datasets):
    report = run_json(capsys, "--no-measure", "--device", "cpu")
    assert list(report) == list(SECTIONS)
    assert report["measurements"] is None and report["datasets"] == DATASET_ROWS
    assert report["kind"]["slug"] == doctor.machine_kind(report["machine"], report["gpus"])[0]
    assert report["defaults"]["device"] == {"value": "cpu", "reason": "--device cpu"}
    for key in ("amp", "channels_last", "compile", "fold_bn", "fused", "threads", "tf32"):
        assert report["defaults"][key]["reason"], key
    compile_ = report["defaults"]["compile"]
    assert compile_["value"] is False and "about a minute" in compile_["reason"]
    assert report["defaults"]["channels_last"]["value"] is True
    software = report["software"]
    assert software["torch"] == torch.__version__ and set(software["extras"]) == set(doctor.EXTRAS)


def test_text_has_the_section_headings_in_order(capsys, stub_datasets):
    assert main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    starts = [out.find("\n" + t) if i else out.find(t) for i, t in enumerate(TITLES)]
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])), starts
    assert "skipped (--no-measure)" in out and "/somewhere" in out


@pytest.mark.parametrize("argv, words", [
    (["--device", "bogus"], "bogus"),
    (["--device", "meta"], "auto, cpu or cuda"),
    (["--frobnicate"], "--frobnicate"),
])
def test_bad_flags_are_one_error_line(capsys, argv, words):
    assert main(["doctor", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("nin: error: ") and words in err and err.count("\n") == 1


def test_nin_amp_shows_in_the_defaults(monkeypatch, capsys, stub_datasets):
    monkeypatch.setenv("NIN_AMP", "none")
    amp = run_json(capsys, "--no-measure")["defaults"]["amp"]
    assert amp["value"] == "none" and "NIN_AMP=none" in amp["reason"]
    monkeypatch.setenv("NIN_AMP", "bf16")
    assert run_json(capsys, "--no-measure", "--device", "cpu")["defaults"]["amp"]["value"] == "bf16"


def test_threads_are_what_configure_runtime_would_set(monkeypatch, capsys, stub_datasets):
    import nin.training.runtime

    monkeypatch.setattr(nin.training.runtime, "usable_cpus", lambda: 1)
    report = run_json(capsys, "--no-measure", "--device", "cpu")
    assert report["machine"]["usable_cpus"] == 1 and report["machine"]["threads"] == 1
    assert report["defaults"]["threads"]["value"] == 1 and nin.training.runtime.compute_threads() == 1
    assert nin.training.runtime.compute_threads(3) == 3


@pytest.mark.slow
def test_datasets_section_is_what_nin_datasets_reports():
    from nin.data import status

    assert doctor.collect("cpu", measure=False)["datasets"] == status(None)


@pytest.mark.slow
def test_measurements_are_positive_and_quick(monkeypatch, capsys, stub_datasets):
    """On nin's compute threads (one here, where this process may run on one CPU), and torch's are put back."""
    import nin.training.runtime

    monkeypatch.setattr(doctor, "MEASURE_SECONDS", 1.0)
    monkeypatch.setattr(nin.training.runtime, "usable_cpus", lambda: 1)
    before = torch.get_num_threads()
    t0 = time.perf_counter()
    m = run_json(capsys, "--device", "cpu")["measurements"]
    assert time.perf_counter() - t0 < 8 and torch.get_num_threads() == before
    assert set(m["matmul_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in m["matmul_gflops"].values())
    assert m["device"] == "cpu" and m["threads"] == 1 and 0 < m["seconds"] and m["budget_seconds"] == 1.0
    assert main(["doctor", "--device", "cpu"]) == 0
    assert "GFLOP/s" in capsys.readouterr().out


@pytest.mark.slow
def test_a_slow_dtype_stays_inside_the_probe_budget(monkeypatch):
    """Where every product is slow (bf16 emulated at a few GFLOP/s), the budget, not the size, ends the probe."""
    monkeypatch.setattr(probes, "sync", lambda device: time.sleep(0.05))
    t0 = time.perf_counter()
    flops = probes.matmul_peak(torch.device("cpu"), torch.float32, min_seconds=10, budget=0.5)
    assert time.perf_counter() - t0 < 1.5 and flops > 0


def test_fingerprint_is_cheap_stable_and_serialisable(monkeypatch):
    fp = doctor.fingerprint()
    assert json.loads(json.dumps(fp)) == fp == doctor.fingerprint()
    assert {"kind", "label", "cpu", "features", "logical_cpus", "usable_cpus", "memory_gib", "torch", "onednn",
            "cuda", "gpus", "python"} <= set(fp)
    assert not {"hostname", "host", "node"} & set(fp)
    assert (fp["kind"], fp["label"]) == doctor.machine_kind(doctor.cpu_info(), doctor.gpu_info())
    mock_gpu(monkeypatch, "Tesla T4", (7, 5))
    t4 = doctor.fingerprint()
    assert t4["kind"] == "cuda-tesla-t4" and t4["gpus"] == ["Tesla T4"]


def test_onednn_version_is_read_from_the_build_config():
    assert doctor.onednn_version("  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71)\n") == "3.12.0"
    assert doctor.onednn_version("  - oneDNN v3.7.1 (Git Hash 1234)\n") == "3.7.1"
    assert doctor.onednn_version("nothing here") is None
