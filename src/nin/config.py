"""Run configuration files for ``nin train --config FILE``.

A file is TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``, including a
run directory's own ``config.json``, so any run can be repeated exactly). It holds
any part of a :class:`~nin.run.RunConfig`, laid out as its sections, and may name a
preset to start from::

    preset = "d2l"            # optional; --preset on the command line wins
    seed = 1

    [model]
    name = "nin_d2l"
    options = { mlp_layers = 1 }

    [train]
    lr = 0.04
    epochs = 20
    batch_size = 64

Layers, later ones winning: the preset, the file, then command-line flags. Unknown
settings and values of the wrong type are one-line errors naming the setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nin.errors import NinError
from nin.files import read_regular_text
from nin.run import PRESETS, RunConfig, preset

SUFFIXES = (".toml", ".yaml", ".yml", ".json")
MAX_CONFIG_BYTES = 16 * 2**20  # a config file holds settings: a few kB


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a config file holds; a run's config.json gives its ``config`` part."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise NinError(f"{path}: unknown config format {path.suffix or '(no suffix)'!r}; use .toml, .yaml or .json")
    text = read_regular_text(path, MAX_CONFIG_BYTES)  # a FIFO or a device is named, never read from
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            doc = tomllib.loads(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text) or {}
    except Exception as e:  # each parser has its own error class; all are a user's malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NinError(f"{path}: not valid {suffix.lstrip('.').upper()}: {first}") from None
    if not isinstance(doc, dict):
        raise NinError(f"{path}: expected a table of settings at the top, got {type(doc).__name__}")
    if suffix == ".json" and "config" in doc and "env" in doc:  # a run directory's config.json
        doc = doc["config"]
    return doc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike[str], preset_name: str | None = None) -> RunConfig:
    """The preset (``preset_name``, else the file's ``preset``, else ``default``) overlaid with the file."""
    doc = read_config_file(path)
    named = doc.pop("preset", None)
    if named is not None and named not in PRESETS:
        raise NinError(f"{path}: unknown preset {named!r} (available: {', '.join(PRESETS)})")
    base = preset(preset_name or named or "default").to_dict()
    model = doc.get("model")
    if isinstance(model, dict) and model.get("name", base["model"]["name"]) != base["model"]["name"]:
        base["model"]["options"] = {}  # another model: the preset's options were for its own
    try:
        return RunConfig.from_dict(_merge(base, doc))
    except NinError as e:
        raise NinError(f"{path}: {e}") from None
