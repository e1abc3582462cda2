"""The README and the example scripts only use commands and options that exist."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gitcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
GROUPS = {"tsv", "bench"}  # commands with subcommands


def _invocations():
    sources = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.sh"))]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":  # only what is inside fenced code blocks
            text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))
        text = text.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"(?:^|[\s`(;&|])(?:gitcap|-m gitcli)\s+([a-z][\w-]*)(.*)", line)
            if not m:
                continue
            rest = m.group(2).split("#")[0].split("&&")[0].split("|")[0].split("`")[0]
            try:
                tokens = shlex.split(rest)
            except ValueError:
                tokens = rest.split()
            command = [m.group(1)]
            if command[0] in GROUPS and tokens and not tokens[0].startswith("-"):
                command.append(tokens[0])
            options = sorted({t.split("=")[0] for t in tokens if t.startswith("--")})
            yield f"{path.name}: {line.strip()[:60]}", command, options


CASES = list(_invocations())


def test_docs_mention_commands():
    assert len(CASES) > 10


@pytest.mark.parametrize("where,command,options", CASES, ids=[c[0] for c in CASES])
def test_documented_invocation_exists(where, command, options):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"{where}: `gitcap {' '.join(command)}` does not exist"
    for option in options:
        if option in ("--help",):
            continue
        assert option in result.output, f"{where}: `gitcap {' '.join(command)}` has no {option}"


def _reference_rows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Command reference"):]
    section = section[: section.index("\n## ", 5)]
    for line in section.splitlines():
        m = re.match(r"\| `gitcap ([a-z-]+)([^`]*)` \|[^|]*\| (.*) \|$", line)
        if m:
            name, rest, options = m.group(1), m.group(2), m.group(3)
            subs = re.findall(r"[a-z]+", rest.split()[0]) if name in GROUPS and rest.strip() else []
            yield name, subs, re.findall(r"`(--[a-z0-9-]+)`", options)


REFERENCE = list(_reference_rows())


def test_reference_table_lists_every_command():
    from gitcli.cli import COMMANDS

    assert sorted(r[0] for r in REFERENCE) == sorted(c[0] for c in COMMANDS)


@pytest.mark.parametrize("name,subs,options", REFERENCE, ids=[r[0] for r in REFERENCE])
def test_reference_table_matches_help(name, subs, options):
    helps = [runner.invoke(app, [name, *([s] if s else []), "--help"], terminal_width=200) for s in (subs or [None])]
    assert all(h.exit_code == 0 for h in helps)
    for option in options:
        assert any(option in h.output for h in helps), f"`gitcap {name}` has no {option}"
