"""Local Nix operations, one function each, using only commands Nix 2.8 already has."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet import process
from fleet.errors import NixError
from fleet.ssh import Remote

_PLAIN_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")

# Flakes are enabled per call: the operator's nix.conf is theirs, not ours.
NIX = ("nix", "--extra-experimental-features", "nix-command flakes")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


def eval_json(flake: str, attribute: str) -> Any:
    """``nix eval --json FLAKE#ATTR``, decoded."""
    result = process.run(
        [*NIX, "eval", "--json", f"{flake}#{attribute}"],
        error=NixError,
        what=f"nix eval {flake}#{attribute}",
    )
    return json.loads(result.stdout)


def toplevel_attr(host: str) -> str:
    """The flake attribute of a host's system; names that are not Nix identifiers get quoted."""
    quoted = host if _PLAIN_ATTR.match(host) else f'"{host}"'
    return f"nixosConfigurations.{quoted}.config.system.build.toplevel"


def _options(options: Mapping[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--option", key, value)]


def build(
    flake: str, attributes: Sequence[str], options: Mapping[str, str] | None = None
) -> list[str]:
    """Build all attributes in one invocation (Nix schedules them together); out paths in order.

    Nothing is linked into the working directory and nothing is touched elsewhere.
    """
    installables = [f"{flake}#{a}" for a in attributes]
    argv = [*NIX, "build", *_options(options or {}), "--no-link", "--json", *installables]
    result = process.run(argv, error=NixError, what="nix build")
    built = json.loads(result.stdout)
    if len(built) != len(attributes):
        raise NixError(f"nix build: expected {len(attributes)} results, got {len(built)}")
    return [entry["outputs"]["out"] for entry in built]


def copy_closure(remote: Remote, path: str) -> None:
    """Copy a closure to a host through the transport's connection and host-key policy."""
    endpoint = remote.endpoint
    process.run(
        ["nix-copy-closure", "--to", endpoint.address, path],
        env=_env({"NIX_SSHOPTS": remote.nix_sshopts()}),
        error=NixError,
        what=f"{remote.name}: copy of {path}",
    )


def copy_to_root(root: Path, path: str) -> None:
    """Copy a closure into the store of a chroot (``ROOT/nix/store``): how the lab seeds hosts."""
    process.run(
        [*NIX, "copy", "--no-check-sigs", "--to", f"local?root={root}", path],
        error=NixError,
        what=f"nix copy to {root}",
    )


def flake_metadata(flake: str) -> dict[str, Any]:
    """``nix flake metadata --json``: the locked revision, when the flake has one."""
    result = process.run(
        [*NIX, "flake", "metadata", "--json", flake],
        error=NixError,
        what=f"nix flake metadata {flake}",
    )
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded
