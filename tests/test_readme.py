"""The README stays true: CI runs its test command, and its printed table is the real output."""

from __future__ import annotations

import re
from pathlib import Path

from nin.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in code_blocks("bash")]
    test_command = next(c for c in commands if "--test" in c)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci


def test_readme_quick_start_has_exactly_two_commands():
    commands = [b.strip() for b in code_blocks("bash")]
    assert commands == ["bash scripts/install.sh && nin train", "bash scripts/install.sh --test && python3 -m pytest"]


def test_readme_shapes_table_is_the_real_output(capsys):
    block = next(b for b in code_blocks("text") if b.startswith("nin_d2l: input"))
    assert main(["shapes", "nin_d2l"]) == 0
    assert capsys.readouterr().out == block
