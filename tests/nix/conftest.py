"""Fixtures of the Nix tests: nixpkgs' lib, and evaluation with nix-instantiate.

The modules need nixpkgs' `lib` alone. It is found through FLEET_NIXPKGS_LIB, or
in ~/.cache/fleet/nixpkgs-lib: a folder holding lib/default.nix. Tests that need
it are skipped, with that reason, when it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HARNESS = FIXTURES / "harness.nix"


def nix_path(path: Path) -> str:
    """A Nix expression for an absolute path, whatever characters it holds."""
    return "(/. + " + json.dumps(str(path)).replace("${", "\\${") + ")"


def nixpkgs_path() -> Path:
    """nixpkgs' NixOS sources: a checkout, or the files tests/nix/nixpkgs_files.py lists."""
    configured = os.environ.get("FLEET_NIXPKGS")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "fleet" / "nixpkgs"


def nixpkgs_lib_path() -> Path:
    configured = os.environ.get("FLEET_NIXPKGS_LIB")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "fleet" / "nixpkgs-lib"


@dataclass(frozen=True)
class Nix:
    """Evaluates expressions in which `h` is tests/nix/fixtures/harness.nix."""

    lib: Path
    nixpkgs: Path | None = None  # nixpkgs' NixOS sources, for h.realConfig

    def _run(self, expr: str) -> subprocess.CompletedProcess[str]:
        nixpkgs = "null" if self.nixpkgs is None else nix_path(self.nixpkgs)
        wrapped = (
            "{ nixpkgsLib }: let h = import "
            + nix_path(HARNESS)
            + f" {{ inherit nixpkgsLib; nixpkgs = {nixpkgs}; }}; in\n"
            + expr
        )
        return subprocess.run(
            [
                "nix-instantiate",
                "--eval",
                "--strict",
                "--json",
                "--argstr",
                "nixpkgsLib",
                str(self.lib),
                "--expr",
                wrapped,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    def eval(self, expr: str) -> Any:
        """The expression's value, as JSON; the evaluation must succeed."""
        result = self._run(expr)
        assert result.returncode == 0, f"evaluation failed:\n{result.stderr}"
        return json.loads(result.stdout)

    def error(self, expr: str) -> str:
        """The error text of an evaluation that must fail."""
        result = self._run(expr)
        assert result.returncode != 0, f"evaluation succeeded: {result.stdout}"
        return result.stderr

    def fleet(self, fixture: str) -> str:
        """An expression for the evaluated fleet of a fixture file."""
        return f"(h.evalFleet [ {nix_path(FIXTURES / fixture)} ])"


@pytest.fixture(scope="session")
def nix_instantiate() -> str:
    found = shutil.which("nix-instantiate")
    if found is None:
        pytest.skip("nix-instantiate is not installed")
    return found


@pytest.fixture(scope="session")
def nix(nix_instantiate: str) -> Nix:
    path = nixpkgs_lib_path()
    if not (path / "lib" / "default.nix").is_file():
        pytest.skip(
            f"nixpkgs lib not found at {path}: set FLEET_NIXPKGS_LIB to a folder "
            "holding nixpkgs' lib/ (or put one in ~/.cache/fleet/nixpkgs-lib)"
        )
    return Nix(path)
