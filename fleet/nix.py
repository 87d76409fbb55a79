"""Local Nix operations, one function each, using only commands Nix 2.8 already has."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet import flakeref, process
from fleet.errors import DeclarationError, NixError

if TYPE_CHECKING:
    from fleet.ssh import Remote

# Flakes are enabled per call: the operator's nix.conf is theirs, not ours.
NIX = ("nix", "--extra-experimental-features", "nix-command flakes")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


# `--show-trace` of the command line: Nix's whole trace, as Nix prints it.
TRACE: list[str] = []


def evaluate(argv: Sequence[str], what: str, flake: str) -> process.Result:
    """A ``nix eval``: its failure is the declaration's (exit 2), in full (every problem,
    file and hint in one line; with --show-trace, Nix's own lines)."""
    result = process.run([*argv, *TRACE], check=False)
    if result.ok:
        return result
    if TRACE:
        raise DeclarationError(f"{what}:\n{result.stderr.rstrip()}")
    text = result.error_text()
    root = flakeref.root(flake)
    if "No such file or directory" in text and root is not None and (root / ".git").exists():
        text += (
            " (a flake in a git repository sees only the files git tracks: `git add` the"
            " file, even uncommitted)"
        )
    raise DeclarationError(f"{what}: {text}")


def eval_json(flake: str, attribute: str) -> Any:
    """``nix eval --json FLAKE#ATTR``, decoded."""
    what = f"nix eval {flake}#{attribute}"
    result = evaluate([*NIX, "eval", "--json", f"{flake}#{attribute}"], what, flake)
    return json.loads(result.stdout)


def eval_inventory(flake: str) -> Any:
    """The flake's ``fleet`` output.

    Nix looks an installable up under ``packages.<system>`` first, so a flake that also
    ships the tool as ``packages.<system>.fleet`` hides its inventory from ``FLAKE#fleet``.
    The inventory's own fields are missing from a package, and Nix falls through to the
    top-level output for them.
    """
    data = eval_json(flake, "fleet")
    if isinstance(data, dict):
        return data
    return {key: eval_json(flake, f"fleet.{key}") for key in ("schemaVersion", "hosts", "deploy")}


def nix_string(text: str) -> str:
    """A Nix string literal holding exactly ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


# Maps the selected hosts' configurations to their system's derivation and output paths.
_SYSTEMS = """configurations:
  let wanted = builtins.fromJSON {names};
  in builtins.mapAttrs (name: c: {{
    drv = c.config.system.build.toplevel.drvPath;
    out = c.config.system.build.toplevel.outPath;
  }}) (builtins.intersectAttrs wanted configurations)
"""


def build_systems(
    flake: str, hosts: Sequence[str], options: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build the hosts' systems: one evaluation, then one build of every derivation.

    Evaluating gives each host its derivation and output path by name (the order of a
    multi-installable ``nix build`` says nothing about which result is whose), and
    ``nix-store --realise``, in every Nix version, builds them without evaluating again.
    """
    names = json.dumps({h: None for h in hosts})
    apply = _SYSTEMS.format(names=nix_string(names))
    result = evaluate(
        [*NIX, "eval", *_options(options or {}), "--json", f"{flake}#nixosConfigurations",
         "--apply", apply],
        "nix eval of the systems",
        flake,
    )  # fmt: skip
    systems: dict[str, dict[str, str]] = json.loads(result.stdout)
    missing = [h for h in hosts if h not in systems]
    if missing:
        raise DeclarationError(f"{flake}: no nixosConfigurations for {', '.join(missing)}")
    realise = ["nix-store", *_options(options or {}), "--realise",
               *sorted({s["drv"] for s in systems.values()})]  # fmt: skip
    process.run(realise, error=NixError, what="nix build")
    return {h: systems[h]["out"] for h in hosts}


def _options(options: Mapping[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--option", key, value)]


def sign(paths: Sequence[str], key_file: str) -> None:
    """Sign closures with the fleet's key, so that hosts whose deploy user Nix does not trust
    accept them (``nix store sign``: the operator must be root or a trusted Nix user)."""
    if not paths:
        return
    process.run(
        [*NIX, "store", "sign", "--key-file", key_file, "--recursive", "--", *sorted(set(paths))],
        error=NixError,
        what="nix store sign",
    )


SIGNATURE_HINT = (
    "the host's deploy user is not trusted by Nix, so the closure must be signed by a key "
    "in the host's fleet.trustedPublicKeys: set signingKey in the operator's config"
)


def copy_closure(remote: Remote, *paths: str) -> None:
    """Copy closures to a host through the transport's connection and host-key policy."""
    endpoint = remote.endpoint
    try:
        with remote.session():
            process.run(
                ["nix-copy-closure", "--to", endpoint.address, *paths],
                env=_env({"NIX_SSHOPTS": remote.nix_sshopts()}),
                error=NixError,
                what=f"{remote.name}: copy of {' '.join(paths)}",
            )
    except NixError as exc:
        # "lacks a valid signature" (Nix 2.8), "lacks a signature by a trusted key" (later).
        if re.search(r"lacks a (valid )?signature", str(exc)):
            raise NixError(f"{exc} ({SIGNATURE_HINT})") from exc
        raise


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


def closure(path: str) -> list[str]:
    """Every store path ``path`` depends on, itself included (``nix-store -qR``)."""
    result = process.run(["nix-store", "-qR", path], error=NixError, what=f"nix-store -qR {path}")
    return result.stdout.split()
