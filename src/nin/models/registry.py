"""The model registry: names to factories, with the options each accepts.

A model registers itself with a one-line decorator on its factory::

    @register_model((1, 224, 224), "d2l's NiN ...", family="nin", options=NIN_OPTIONS)
    def nin_d2l(**kw): ...

:func:`create_model` builds any registered model by name with keyword overrides,
and refuses options the model does not take. Registering a name twice raises.
``nin/__init__.py`` imports every module that registers models, so the registry
is complete whichever ``nin`` module is imported first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from nin.errors import NinError, did_you_mean


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its factory, default input (C, H, W), description, family and accepted options."""

    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    description: str
    family: str = "nin"
    options: tuple[str, ...] = ()


class Registry:
    """Name -> :class:`ModelEntry`. Registering a name twice raises."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def register(self, input_size: tuple[int, int, int], description: str, *, family: str = "nin",
                 options: tuple[str, ...] = ()):
        def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            name = factory.__name__
            if name in self._entries:
                raise ValueError(f"model {name!r} is already registered")
            self._entries[name] = ModelEntry(name, factory, input_size, description, family, tuple(options))
            return factory

        return deco

    def names(self, family: str | None = None) -> list[str]:
        return sorted(n for n, e in self._entries.items() if family is None or e.family == family)

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            raise NinError(f"unknown model {name!r}{hint} (available: {', '.join(self.names())})") from None


MODELS = Registry()
register_model = MODELS.register


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models, sorted; ``family`` ("nin" or "classic") keeps only that family."""
    return MODELS.names(family)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises :class:`NinError`."""
    return MODELS.get(name)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model, e.g. ``create_model("nin_d2l", mlp_layers=1)``.

    Each model accepts the options listed in its entry (``nin models`` shows them);
    any other keyword raises :class:`NinError` naming it.
    """
    entry = model_entry(name)
    unknown = sorted(set(overrides) - set(entry.options))
    if unknown:
        raise NinError(f"{name} does not take the option(s) {', '.join(unknown)}; "
                       f"accepted: {', '.join(entry.options)}")
    return entry.factory(**overrides)


def describe_models(default: str | None = None) -> list[dict]:
    """A row per registered model: name, family, input size, parameters (built to count them), whether it is
    ``default``, its description and the options it takes (``nin models``)."""
    rows = []
    for name in list_models():
        e = model_entry(name)
        params = sum(p.numel() for p in create_model(name).parameters())
        rows.append({"name": name, "family": e.family, "input": "x".join(map(str, e.input_size)), "params": params,
                     "default": name == default, "description": e.description, "options": list(e.options)})
    return rows
