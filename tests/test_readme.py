"""The README's promises: its Python examples run as written, the `mame` commands and options it shows exist, and
the extras its install commands name are declared in pyproject.toml."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mame.cli import app

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPTION = re.compile(r"--[a-z][a-z-]*")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)


def tables() -> list[list[list[str]]]:
    """Every Markdown table as rows of cells, header first, the |---| line left out."""
    found: list[list[list[str]]] = []
    previous_was_row = False
    for line in README.splitlines():
        is_row = line.startswith("|")
        if is_row and not re.fullmatch(r"[|\s:-]+", line):
            if not previous_was_row:
                found.append([])
            found[-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous_was_row = is_row
    return found


def subcommand(command_line: str) -> str:
    """``"mame bench MODEL --tau 0.8"`` -> ``"bench"``."""
    return command_line.split()[1]


def commands_table() -> dict[str, str]:
    """The table whose header starts with "command" (the Commands section): each sub-command and its whole row."""
    (table,) = [table for table in tables() if table[0][0] == "command"]
    return {subcommand(CODE_SPAN.search(row[0]).group(1)): " ".join(row) for row in table[1:]}


def readme_cli_uses() -> dict[str, set[str]]:
    """The options the README shows for each `mame` sub-command: in `mame ...` code spans and shell commands, in
    the whole row of that command in the Commands table, and in the first column of a table whose header names
    the command (`mame bench …`), except in rows measured by a script of their own."""
    uses: dict[str, set[str]] = defaultdict(set)
    shell_commands = [part.strip() for block in fenced_blocks("bash") for part in re.split(r"&&|\n", block)]
    for command_line in CODE_SPAN.findall(README) + shell_commands:
        if command_line.startswith("mame "):
            uses[subcommand(command_line)] |= set(OPTION.findall(command_line))
    for command, row in commands_table().items():
        uses[command] |= set(OPTION.findall(row))
    for header, *rows in tables():
        named = CODE_SPAN.search(header[0])
        if named and named.group(1).startswith("mame "):
            for row in rows:
                settings = CODE_SPAN.findall(row[0])
                if not any(".py" in setting for setting in settings):
                    uses[subcommand(named.group(1))] |= set(OPTION.findall(" ".join(settings)))
    return dict(uses)


def cli_help(command: str) -> str:
    # A wide terminal: rich shortens long option names to fit a narrow one (COLUMNS may be small in CI).
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("number", range(len(fenced_blocks("python"))))
@pytest.mark.usefixtures("one_thread")
def test_python_example_runs_as_written(number):
    source = fenced_blocks("python")[number]
    exec(compile(source, f"README.md, python block {number + 1}", "exec"), {"__name__": "readme_example"})


def test_readme_has_python_examples():
    assert fenced_blocks("python"), "the README shows no ```python block to run"


@pytest.mark.parametrize("command, options", sorted(readme_cli_uses().items()))
def test_commands_and_options_shown_exist(command, options):
    assert options <= set(OPTION.findall(cli_help(command)))


def test_commands_table_lists_every_command():
    assert set(commands_table()) == set(typer.main.get_command(app).commands)


def test_install_commands_name_declared_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the package itself also runs on 3.10)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    named = {name.strip() for group in re.findall(r"\.\[([\w, -]+)\]", README) for name in group.split(",")}
    assert named, "the README names no extra: the install commands changed, update this test"
    assert named <= set(extras)
