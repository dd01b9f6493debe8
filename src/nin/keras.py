"""``nin.keras``: the Keras 3 port, where users import it from (:mod:`nin.inference.keras` is its home)."""

from nin.inference.keras import build, convert, from_torch

__all__ = ["build", "convert", "from_torch"]
