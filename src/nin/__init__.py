"""nin: Network-in-Network image classifiers (Lin, Chen & Yan, 2013) in PyTorch.

The names below are imported when first used (PEP 562), so ``import nin`` imports no torch: ``nin serve``
of an ONNX file runs without it.
"""

from __future__ import annotations

import importlib

__all__ = ["NiN", "NinError", "create_model", "list_models", "nin_block"]
__version__ = "0.1.0"

_WHERE = {"NinError": "nin.errors", "create_model": "nin.models", "list_models": "nin.models",
          "NiN": "nin.models.nin", "nin_block": "nin.models.nin"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'nin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
