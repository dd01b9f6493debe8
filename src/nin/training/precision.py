"""Mixed precision: which one a device runs natively, and what ``--amp auto`` picks there, with its reason."""

from __future__ import annotations

import os

import torch

from nin.errors import NinError

AMP_MODES = ("auto", "none", "bf16", "fp16")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


AMP_ENV = "NIN_AMP"  # what --amp auto picks, when set: none, bf16 or fp16 (the test suite's --precision sets it)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (fast), rather than emulating them."""
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (a T4, compute
        # capability 7.5); tensor cores run bf16 from Ampere (8.0) on.
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def amp_choice(device: torch.device, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """What ``--amp auto`` runs on ``device``, and why: ``("bf16" | "fp16" | "none", reason)``.

    bf16 where the device has it natively; on a CUDA GPU without it (a T4, a V100), fp16 with a
    gradient scaler, since tensor cores run fp16 from Volta on; fp32 otherwise. The ``NIN_AMP``
    environment variable, when set, overrides the choice (the test suite uses it to run everything
    at one precision).
    """
    env = os.environ if environ is None else environ
    forced = env.get(AMP_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in ("none", "bf16", "fp16"):
            raise NinError(f"{AMP_ENV}={env[AMP_ENV]!r}: choose auto, none, bf16 or fp16")
        return forced, f"{AMP_ENV}={forced} is set"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "none", "CUDA is not available"
        name = torch.cuda.get_device_name(device)
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        if bf16_native(device):
            return "bf16", f"{name} (compute capability {cc}) runs bf16 natively"
        return "fp16", (f"{name} (compute capability {cc}) has no native bf16 (it needs 8.0+); "
                        "fp16 tensor cores with a gradient scaler instead")
    if device.type == "cpu":
        if bf16_native(device):
            return "bf16", "oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)"
        return "none", "this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 would be emulated and slow"
    return "none", f"no mixed precision is chosen automatically on {device.type}"
