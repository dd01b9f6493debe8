"""Flag types and shared flags: each numeric flag takes the range declared with its setting (:mod:`nin.bounds`)."""

from __future__ import annotations

import argparse
import shlex
import types
from dataclasses import fields
from typing import Literal, Union, get_args, get_origin, get_type_hints

from nin.bounds import MAX_IMAGE_SIDE, Range, flag_type, option_strings, range_of
from nin.errors import NinError

EXIT_USAGE = 2  # a user error: a bad flag, a missing or corrupt file
EXIT_FAILURE = 1  # the operating system refused (a full disk), or memory ran out


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error."""

    def error(self, message: str):  # argparse API
        sub = self.prog.split()[1:]
        raise NinError(f"{sub[0]}: {message}" if sub else message)


MAX_PIXELS_HELP = ("refuse images of more than N pixels before decoding them (default 67,108,864: a 64-megapixel "
                   "photo); raise it for larger images")


CAM_GRID = Range(1, 256)  # test images in one CAM figure: 32 rows of 8


_DECLARED_IN = {"train": ("nin.training.config", "TrainConfig"), "data": ("nin.data", "DataConfig"),
                "run": ("nin.training.config", "RunConfig"), "checkpoint": ("nin.training.config", "CheckpointConfig"),
                "model": ("nin.models.specs", None)}


def _ranged(where: str, kind: type = float):
    """An argparse type for the range declared with a setting: ``"train.lr"`` (a field of the train config,
    likewise data, run and checkpoint), or ``"model.WIDTH"`` (a :class:`~nin.bounds.Range` of nin.models).
    The module is imported when the flag is used, so building the parser imports no torch."""
    section, _, name = where.partition(".")

    def parse(text: str):
        import importlib

        module, config = _DECLARED_IN[section]
        obj = importlib.import_module(module)
        r = range_of(getattr(obj, config), name) if config else getattr(obj, name)
        return flag_type(r, kind)(text)

    parse.__name__ = kind.__name__
    return parse


def _path(text: str) -> str:
    """A file or folder name as given: not empty, no NUL byte (no file system takes one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file or folder name, got an empty one")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a file name cannot hold a NUL byte, got {text!r}")
    return text


def _fractions(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.5,0.75, got {s!r}") from None


def parse_input_size(s: str) -> tuple[int, int, int]:
    """``"1x224x224"`` -> (1, 224, 224); ``"32x32"`` keeps the model's channel count (0 here)."""
    parts = s.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (2, 3) or any(d < 1 for d in dims) or any(d > MAX_IMAGE_SIDE for d in dims[-2:]) \
            or (len(dims) == 3 and dims[0] > 256):
        raise NinError(f"--input must look like CxHxW or HxW, with at most 256 channels and sides from 1 to "
                       f"{MAX_IMAGE_SIDE}, got {s[:40]!r}")
    return (0, *dims) if len(dims) == 2 else tuple(dims)  # type: ignore[return-value]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The model-option flags, one per field of :class:`~nin.models.specs.ModelOptions` (dests: their names)."""
    from nin.models.specs import ModelOptions

    add_settings(p.add_argument_group("model options"), ModelOptions, "model.options", flagged(ModelOptions),
                 plain=True)


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=_path, help="checkpoint directory or run directory (its latest checkpoint)")


SETTING = "setting:"  # the dest prefix of a flag made from a config field: setting:train.lr


def add_settings(group, cls: type, section: str, names: tuple[str, ...], *, plain: bool = False) -> None:
    """One flag per field ``names`` of config dataclass ``cls`` (the ``section`` of a RunConfig: train, data,
    checkpoint, model, or "" for its own fields; or another that :func:`flag_of` knows), derived from the field:
    its type gives the parser (a range from :mod:`nin.bounds` for numbers, choices for a Literal, on/off for a
    bool), its metadata the help text and option strings. A flag not given is None, so :func:`settings_given`
    returns what the user set, as :func:`nin.training.config.override` takes it. ``plain``: the dest is the
    field's name instead."""
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    for name in names:
        meta, hint = by_name[name].metadata, hints[name]
        union = get_origin(hint) in (Union, types.UnionType)
        args = [a for a in get_args(hint) if a is not type(None)] if union else [hint]
        path = f"{section}.{name}" if section else name
        kw: dict = {"dest": name if plain else SETTING + path, "default": None, "help": meta.get("help")}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        elif not plain and (args[0] in (int, float, str) or get_origin(args[0]) is tuple):
            kw["metavar"] = name.upper()  # not the dest's SETTING:... spelling
        if meta.get("action"):
            kw["action"] = meta["action"]
        elif args[0] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(args[0]) is Literal:
            kw["choices"] = get_args(args[0])
        elif args[0] in (int, float):
            kw["type"] = flag_type(meta["range"], args[0])
        elif get_origin(args[0]) is tuple:
            kw["type"] = _fractions
        elif meta.get("path"):
            kw["type"] = _path
        group.add_argument(*option_strings(cls, name), **kw)


def flagged(cls: type, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The fields of ``cls`` that have a flag (those with help text), in declaration order, less ``exclude``."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("help") and f.name not in exclude)


def settings_given(args: argparse.Namespace) -> dict:
    """The settings the flags of :func:`add_settings` set, by dotted path: ``{"train.lr": 0.1, ...}``."""
    return {k[len(SETTING):]: v for k, v in vars(args).items() if k.startswith(SETTING) and v is not None}


def flag_of(path: str) -> str:
    """The flag a setting path is given by, as :func:`add_settings` made it from the field: ``train.batch_size``
    -> ``--batch-size``, ``checkpoint.every_steps`` -> ``--checkpoint-every`` (its metadata's option strings).
    The sections are a RunConfig's, and ``nin bench``'s (:data:`nin.analysis.bench_command.SECTIONS`)."""
    from nin.analysis.bench_command import SECTIONS
    from nin.data import DataConfig
    from nin.models.specs import ModelOptions
    from nin.training.config import CheckpointConfig, ModelConfig, RunConfig, TrainConfig

    section, _, name = path.rpartition(".")
    cls = {"": RunConfig, "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
           "model": ModelConfig, "model.options": ModelOptions, **SECTIONS}[section]
    return option_strings(cls, name)[0]


def command_line(args: argparse.Namespace) -> str:
    """``nin COMMAND --flag value ...``: the command that repeats ``args``, with each flag given, in the parser's
    order (``nin bench --record`` keeps it). For a command whose arguments are all flags, each None when not given
    (or False, a plain switch such as ``--json``): a flag made by :func:`add_settings` is named as :func:`flag_of`
    names it, any other by its dest (``threads``: ``--threads``)."""
    words = ["nin", args.command]
    for dest, value in vars(args).items():
        setting = dest.startswith(SETTING)
        if dest == "command" or dest.startswith("_") or value is None or (value is False and not setting):
            continue
        flag = flag_of(dest[len(SETTING):]) if setting else f"--{dest.replace('_', '-')}"
        if isinstance(value, bool):  # --x / --no-x, or a flag that is itself the switch (--no-download)
            words.append(flag if value or flag.startswith("--no-") else f"--no-{flag[2:]}")
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(words)


def given_fields(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` that flags made with ``add_settings(..., plain=True)`` set, by name."""
    return {k: getattr(args, k) for k in flagged(cls) if getattr(args, k, None) is not None}


def _model_options(args: argparse.Namespace) -> dict:
    """The model options the flags of :func:`_add_model_options` set."""
    from nin.models.specs import ModelOptions

    return given_fields(args, ModelOptions)


def _option_value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    if s.isidentifier():  # a word, e.g. head=fc; the model checks it
        return s
    raise NinError(f"option value {s!r} is not a number, true, false or a word")


def parse_model_ref(ref: str) -> tuple[str, dict]:
    """``"nin_d2l:mlp_layers=1,width=0.5"`` -> ``("nin_d2l", {"mlp_layers": 1, "width": 0.5})``."""
    name, _, rest = ref.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise NinError(f"model options must look like NAME:key=value,key=value, got {ref!r}")
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return name.strip(), options


def _checked_input(name: str, model, size: tuple[int, int, int]) -> tuple[int, int, int]:
    ic, h, w = size
    c = ic or model.input_size[0]
    if c != model.input_size[0]:
        raise NinError(f"{name} takes {model.input_size[0]} input channel(s), not {c} "
                       f"(use --in-channels {c} to change the model)")
    return c, h, w
