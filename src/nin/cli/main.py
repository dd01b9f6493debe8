"""The ``nin`` command: models, datasets, shapes, profile, train, study, tune, evaluate, predict, cam, export,
bench, doctor, serve.

User errors (bad flags, missing or corrupt files) print one line,
``nin: error: ...``, and exit with status 2; nothing prints a traceback for them.
A failure of the operating system that no command anticipated (a full disk, a
read-only file system) or running out of memory is one such line too, with
status 1. A command that fails leaves no half-written output behind, and no new
folder that holds nothing worth keeping.

Each group of commands (:mod:`nin.cli.commands`) is imported when it is needed, so a command imports only what
it uses: ``nin serve FILE.onnx`` builds its parser alone and imports no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import re
import sys
from collections.abc import Sequence

from nin.cli.options import EXIT_FAILURE, EXIT_USAGE, _Parser
from nin.errors import NinError

GROUPS = ("models", "training", "inference", "analysis", "serve")  # in the order `nin --help` lists them
ALONE = {"serve": "serve"}  # commands whose parser is built alone when named first (no torch), and their group


def build_parser(groups: tuple[str, ...] = GROUPS) -> argparse.ArgumentParser:
    parser = _Parser(prog="nin", description="Network-in-Network image classifiers.")
    parser.add_argument("--version", action="version", version=f"nin {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for group in groups:
        importlib.import_module(f"nin.cli.commands.{group}").add_parsers(sub)
    return parser


def _groups(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The command groups whose parsers ``argv`` needs: one, for a command of :data:`ALONE`; else all."""
    words = list(sys.argv[1:] if argv is None else argv)
    return (ALONE[words[0]],) if words and words[0] in ALONE else GROUPS


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nin")
    except PackageNotFoundError:
        return "unknown"


def _handler(group: str, name: str):
    """Handler ``name`` of command group ``group``, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"nin.cli.commands.{group}"), name)(args)

    run.__name__ = name
    return run


COMMANDS = {command: _handler(group, f"cmd_{command}") for group, commands in (
    ("models", ("models", "datasets", "shapes", "profile")), ("training", ("train", "study", "tune")),
    ("inference", ("evaluate", "predict", "cam", "export")), ("analysis", ("bench", "doctor")),
    ("serve", ("serve",))) for command in commands}


def _reports(e: NinError) -> bool:
    """Whether this process prints ``e``: under torchrun every process raises the same error and only the
    main one prints it, unless the error is this process's own (``ProcessError``)."""
    try:
        from nin.training.distributed import ProcessError, from_environment
    except ImportError:  # no torch (nin serve FILE.onnx without it): no torchrun either
        return True

    try:
        return isinstance(e, ProcessError) or from_environment().is_main
    except NinError:
        return True


def _os_error_line(e: OSError) -> str:
    """``PATH: reason`` for an operating-system error (the reason alone when it names no file)."""
    why = e.strerror or str(e) or type(e).__name__
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return ": ".join([*names, why]) if names else why


def _out_of_memory(e: BaseException) -> str | None:
    """What could not be allocated, when ``e`` is an allocation failure (Python's, or a torch allocator's)."""
    if isinstance(e, MemoryError):
        return "out of memory"
    text = str(e)
    m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if m:
        return f"out of memory: tried to allocate {int(m.group(1)) / 2**30:,.1f} GiB"
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return "out of memory: " + text.strip().split(". ")[0]
    return None


STDOUT = "standard output"


class _NamedStdout:
    """The process's standard output, whose write errors name it (a full disk behind it, a closed pipe), so that
    they can be told from the others."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _named(self, e: OSError) -> OSError:
        return type(e)(e.errno, e.strerror, STDOUT) if e.errno else e

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise self._named(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise self._named(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _named_stdout():
    real = sys.stdout is sys.__stdout__ and sys.stdout is not None
    if real:
        sys.stdout = _NamedStdout(sys.stdout)
    try:
        yield
    except OSError as e:
        if real and e.filename == STDOUT:  # what is still buffered would fail again at exit: let it go nowhere
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        raise
    finally:
        if real:
            sys.stdout = sys.__stdout__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _named_stdout():
            args = build_parser(_groups(argv)).parse_args(argv)
            if args.command not in ALONE:  # (those import no torch, and torchrun runs nothing without it)
                from nin.training.distributed import from_environment

                if from_environment().distributed and args.command != "train":
                    raise NinError(f"nin {args.command} runs in one process; only nin train runs under torchrun")
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a full disk behind stdout shows here, not at interpreter exit
        return code
    except NinError as e:
        if _reports(e):
            print(f"nin: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nin: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the operating system refused something no command anticipated: one line, no traceback
        if e.filename == STDOUT and e.errno == errno.EPIPE:  # the reader went away (nin models | head)
            return EXIT_FAILURE
        print(f"nin: error: {_os_error_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except (MemoryError, RuntimeError) as e:
        why = _out_of_memory(e)
        if why is None:
            raise  # a bug: keep the traceback
        print(f"nin: error: {why}; try a smaller batch, model or input size", file=sys.stderr)
        return EXIT_FAILURE
