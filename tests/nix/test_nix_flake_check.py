"""Nix's own `nix flake check --no-build` on this repository's flake.

nixpkgs cannot be had here, so its input is overridden with a stand-in
(fixtures/nixpkgs-stub): nixpkgs' real `lib`, packages that are derivations
never built, and NixOS as the fleet host module over stubbed options. What Nix
checks of the outputs' shapes (modules are modules, packages and checks are
derivations, apps are apps, templates have a path and a description, every
host configuration's toplevel instantiates) is Nix's own code: the Nix on PATH,
Debian's 2.8 here and a current release in the flake's own checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.nix.conftest import FIXTURES, REPO, Nix

pytestmark = pytest.mark.skipif(shutil.which("nix") is None, reason="nix is not installed")

NIX = ["nix", "--extra-experimental-features", "nix-command flakes"]


def stub_nixpkgs(nix: Nix, into: Path) -> Path:
    """The stand-in nixpkgs, with the real lib, as a folder of its own."""
    stub = into / "nixpkgs"
    shutil.copytree(FIXTURES / "nixpkgs-stub", stub)
    shutil.copytree(nix.lib / "lib", stub / "lib")
    shutil.copy(FIXTURES / "nixos-stubs.nix", stub / "nixos-stubs.nix")
    # nixpkgs' lib reads file types with builtins.readFileType (Nix 2.14);
    # older Nix gets it from the parent directory's listing (a store path
    # itself, the root of a flake's source, is a directory).
    filesystem = stub / "lib" / "filesystem.nix"
    filesystem.chmod(0o644)
    text = filesystem.read_text()
    filesystem.write_text(
        text.replace(
            "pathType = builtins.readFileType;",
            "pathType = builtins.readFileType or (p: if toString (dirOf p) == builtins.storeDir "
            'then "directory" else (builtins.readDir (dirOf p)).${baseNameOf p});',
        )
    )
    return stub


def this_flake(into: Path) -> str:
    """This repository as a flake: its git files, or a copy of the tree."""
    if (REPO / ".git").exists():
        return f"git+file://{REPO}"
    copy = into / "fleet"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", "*.egg-info", "__pycache__"))
    return f"path:{copy}"


def flake_check(flake: str, inputs: dict[str, str], tmp_path: Path) -> str:
    """Nix's `flake check --no-build` of a flake with inputs overridden; its warnings."""
    overrides = [a for name, ref in inputs.items() for a in ("--override-input", name, ref)]
    command = [*NIX, "flake", "check", "--no-build", "--show-trace", "--no-write-lock-file"]
    result = subprocess.run(
        [*command, *overrides, flake],
        capture_output=True,
        text=True,
        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    return result.stderr


def test_nix_flake_check_passes_without_building(nix: Nix, tmp_path: Path) -> None:
    stub = stub_nixpkgs(nix, tmp_path)
    warnings = flake_check(this_flake(tmp_path), {"nixpkgs": f"path:{stub}"}, tmp_path)
    # Nix knows no `fleet` or `lib` output; that is all it may say.
    unknown = {w for w in warnings.splitlines() if w.startswith("warning: unknown flake output")}
    assert unknown <= {f"warning: unknown flake output '{o}'" for o in ("fleet", "lib")}


def test_the_templates_flake_check_passes_without_building(nix: Nix, tmp_path: Path) -> None:
    """A fleet of one's own, as `nix flake init -t` gives it, with this flake as its
    `fleet` input."""
    own = tmp_path / "own"
    shutil.copytree(REPO / "templates" / "default", own)
    stub = stub_nixpkgs(nix, tmp_path)
    inputs = {"nixpkgs": f"path:{stub}", "fleet": this_flake(tmp_path)}
    flake_check(f"path:{own}", inputs, tmp_path)
