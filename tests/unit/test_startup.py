"""`fleet` starts fast: loading the CLI loads no core module and no heavy library, and each
command loads only what it runs (bench/startup.py has the times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the modules a command loaded, as the last line of stdout.
PROBE = """
import json, sys
from fleet.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print()
print(json.dumps(sorted(sys.modules)))
"""

# What no command needs at its start: the HTML page's templates, the inventory's error
# search (the compiled check says "valid" alone), tables (--json, errors), the lab, the
# day-2 commands, YAML without a config file, HTTP without an events sink, package metadata
# outside --version.
HEAVY = (
    "jinja2", "jsonschema", "tabulate", "yaml", "fleet.lab", "fleet.day2", "fleet.report",
    "urllib.request", "http.client", "ssl", "email", "importlib.metadata",
)  # fmt: skip
# The core: `--help` and the CLI alone load none of it.
CORE = ("fleet.flows", "fleet.nix", "fleet.inventory", "fleet.rollout", "fleet.ssh")

STUB_NIX = """#!/bin/sh
touch "$(dirname "$0")/called"
echo "error: a stub nix" >&2
exit 1
"""


def loaded(tmp_path: Path, *argv: str) -> set[str]:
    """The modules `fleet ARGV` has loaded by its end: Nix a stub that fails at once, no
    operator config."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    for name in ("nix", "nix-store"):
        (stub / name).write_text(STUB_NIX)
        (stub / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=True,
    )
    return set(json.loads(proc.stdout.splitlines()[-1]))


def held(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (or their submodules) were loaded."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


def test_loading_the_cli_loads_nothing_heavy() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import json, sys, fleet.cli; print(json.dumps(list(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    modules = set(json.loads(proc.stdout))
    assert held(modules, HEAVY + CORE) == []


@pytest.mark.parametrize("argv", [["--help"], ["deploy", "--help"], ["report", "--help"]])
def test_help_loads_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    assert held(loaded(tmp_path, *argv), HEAVY + CORE) == []


def test_the_lab_loads_the_lab_only_under_fleet_lab(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "lab", "up", "--help")
    assert "fleet.lab.ops" in modules
    assert held(modules, ("jinja2", "jsonschema", "tabulate", "fleet.day2", "fleet.report")) == []


@pytest.mark.parametrize(
    ("argv", "needed"),
    [
        (["status"], ()),
        (["--json", "deploy", "--dry-run"], ()),
        (["report", "--html", "page.html"], ()),
        (["health"], ()),  # the day-2 module loads after Nix answered
        (["exec", "--", "true"], ()),
    ],
)
def test_a_command_reaches_nix_without_anything_heavy(
    tmp_path: Path, argv: list[str], needed: tuple[str, ...]
) -> None:
    (tmp_path / "flake").mkdir()
    (tmp_path / "flake/flake.nix").write_text("{ outputs = { self }: { }; }\n")
    modules = loaded(tmp_path, "--flake", str(tmp_path / "flake"), *argv)
    assert (tmp_path / "bin/called").exists()  # it got as far as evaluating the flake
    assert held(modules, HEAVY) == list(needed)
