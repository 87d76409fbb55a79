"""The README says what the code does: commands and their options, exit codes, config keys."""

from __future__ import annotations

import re
from pathlib import Path

import click

from fleet import config
from fleet.cli import cli
from fleet.errors import ExitCode

README = (Path(__file__).parents[2] / "README.md").read_text()
GLOBAL = {o for p in cli.params for o in p.opts}


def options_of(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def documented_uses() -> list[tuple[str, str]]:
    """Every `fleet COMMAND ...` the README shows, inline or in a code block."""
    uses = re.findall(r"`(fleet [^`]+)`", README)
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        uses += [" ".join(block.split("\n")).replace("\\", " ")]
    found = []
    for use in uses:
        for chunk in re.split(r"(?=\bfleet \[|\bfleet [a-z])", use):
            words = [w for w in re.split(r"[\s\[\]|()]+", chunk) if w]
            if len(words) < 2 or words[0] != "fleet":
                continue
            command = next((w for w in words[1:] if not w.startswith("-") and w.isalpha()), None)
            if command is not None:
                found.append((command, chunk))
    return found


def test_every_documented_command_and_option_exists() -> None:
    seen = 0
    for name, use in documented_uses():
        if name not in cli.commands:  # e.g. "fleet is the tool" in prose
            continue
        command = cli.commands[name]
        if isinstance(command, click.Group):
            sub = re.search(rf"{name} ([a-z]+)", use)
            # Asked through click: `fleet lab` loads its commands when one is asked for.
            found = command.get_command(click.Context(command), sub.group(1)) if sub else None
            command = found or command
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z]\b)", use):
            assert option in options_of(command) | GLOBAL | {"--"}, f"{use!r}: {option}"
        seen += 1
    assert seen > 15


def test_exit_codes_table_matches_the_code() -> None:
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", README, re.M))
    assert {int(k) for k in table} == {int(c) for c in ExitCode}


def test_every_config_key_is_documented() -> None:
    section = README.split("## Operator configuration", 1)[1].split("\n## ", 1)[0]
    for key in config.KEYS:
        for name in (key, *(f"{key}.{sub}" for sub in config.SECTIONS.get(key, {}))):
            assert f"`{name}`" in section, name
    for key in config.OPERATOR_ONLY:
        assert f"`{key}`" in section.split("may not set", 1)[1], key


def test_every_report_field_is_documented() -> None:
    """docs/report.md names every field a deploy report has."""
    from fleet.models import HostReport
    from fleet.rollout import Release, Report

    doc = (Path(__file__).parents[2] / "docs" / "report.md").read_text()
    report = Report(Release.new("deploy", "/f", None), [HostReport("h1")])
    for key in (*report.as_json(), *report.as_json()["hosts"]["h1"]):
        if key not in ("hosts", "action", "operator", "flake", "started", "durationSeconds"):
            assert f"`{key}`" in doc or f".{key}`" in doc, key
    for key in ("action", "operator", "flake", "started", "durationSeconds"):
        assert f'"{key}"' in doc, key
