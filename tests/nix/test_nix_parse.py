"""Every Nix file of the repository parses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.nix.conftest import REPO


def nix_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d != ".git"]
        found += [Path(root, f) for f in files if f.endswith(".nix")]
    return sorted(found)


FILES = nix_files()


def test_the_repository_has_its_nix_files() -> None:
    names = {str(p.relative_to(REPO)) for p in FILES}
    assert {
        "flake.nix",
        "modules/host.nix",
        "modules/fleet/default.nix",
        "hosts/default.nix",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_parses(nix_instantiate: str, path: Path) -> None:
    result = subprocess.run(
        [nix_instantiate, "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
