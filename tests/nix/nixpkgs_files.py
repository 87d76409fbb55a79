"""The nixpkgs files the Nix tests read, by their path in nixpkgs.

Without a nixpkgs checkout (FLEET_NIXPKGS), these files are kept in the cache folder
~/.cache/fleet/nixpkgs, each at its nixpkgs path, with where each came from in the folder's
SOURCES files; they are never committed. The NixOS modules are those
fixtures/nixos-real.nix lists (`h.real.modules`).
"""

from __future__ import annotations

NIXOS_LIB = ["utils.nix", "systemd-lib.nix", "systemd-unit-options.nix", "systemd-types.nix"]
# The flake's devShell and package name these; each is pkgs/development/python-modules/<name>.
PYTHON_PACKAGES = ["click", "jinja2", "jsonschema", "mypy", "pytest", "pyyaml", "tabulate",
                   "types-pyyaml", "types-tabulate"]  # fmt: skip


def needed(modules: list[str]) -> list[str]:
    """Every file, given the NixOS modules (paths under nixos/modules)."""
    return (
        [f"nixos/lib/{f}" for f in NIXOS_LIB]
        + ["pkgs/pkgs-lib/formats.nix"]
        + [f"nixos/modules/{m}" for m in modules]
        + [f"pkgs/development/python-modules/{p}/default.nix" for p in PYTHON_PACKAGES]
    )
