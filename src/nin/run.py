"""``nin.run.train``, where scripts written before the package layout import it from
(:mod:`nin.training.run` is its home)."""

from nin.training.run import train

__all__ = ["train"]
