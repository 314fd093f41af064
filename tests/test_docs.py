"""The README stays true to the code: its CLI tables list exactly the flags `generate`, `bench` and `serve` have, and
CI runs the README's test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sgdiff.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def command_flags(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    flags = set()
    for param in command.params:
        flags.update(o for o in param.opts + param.secondary_opts if o.startswith("--") and o != "--help")
    return flags


def readme_table_flags(name: str) -> set[str]:
    section = README.split(f"## CLI reference: `sgdiff {name}`")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1])}


@pytest.mark.parametrize("name", ["generate", "bench", "serve"])
def test_readme_cli_table_matches_the_command(name):
    assert readme_table_flags(name) == command_flags(name)


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    if '-m "not slow"' in test_command:  # the slow tier the command leaves out runs in CI after it
        assert "\npython -m pytest -m slow" in ci[ci.index(test_command) :]


def test_readme_starts_with_the_two_commands(tmp_path):
    """The first command sets up and generates with the embedded default: its `sgdiff generate` part runs."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert README.index("```bash") < README.index("## ")
    generate = blocks[0].split("&&")[-1].strip()
    assert generate.startswith("sgdiff generate") and "--model-path" not in generate
    result = CliRunner().invoke(app, [*shlex.split(generate)[1:], "--output-path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("name", ["generate", "bench", "serve"])
def test_help_at_80_columns_shows_every_flag_whole(name):
    """Nothing cut short (`--enable-fused-projec…`) and no `<bool>` after a plain flag."""
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = result.output
    assert "…" not in text and "<bool>" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    shown = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))
    assert command_flags(name) <= shown, sorted(command_flags(name) - shown)
