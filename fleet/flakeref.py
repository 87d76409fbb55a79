"""A flake reference as Nix 2.8 reads it: which ones name a local folder, where that
flake's root is, and what is wrong with one before Nix is asked.

Nix reads a reference without a scheme as a flake registry name when it looks like one
(``nixpkgs``, ``nixpkgs/nixos-24.05``), else as a path; a path that holds no flake.nix
stands for the nearest folder above it that does, up to a git repository's root or the
file system's boundary. ``path:`` and ``git+file:`` name their folder exactly. Anything
else (``github:``, ``git+https:``, a registry name) is Nix's alone to fetch and judge.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import UsageError

# Nix's flakeRegex: an id, then optionally /ref (or /rev): a registry entry, not a path.
_REGISTRY = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*(?:/[a-zA-Z0-9][a-zA-Z0-9_./-]*)?")
# Nix's pathUrlRegex: the characters a path without a scheme may have.
_PATH = re.compile(r"/?[0-9a-zA-Z._~!$&'\"()*+,;=-]+(?:/[0-9a-zA-Z._~!$&'\"()*+,;=-]+)*/?")

MISSING_OUTPUT = (
    'the flake has no "fleet" output (a fleet flake\'s outputs come from fleet.lib.mkFleet)'
)
# Nix's words for an installable the flake lacks: `does not provide attribute 'packages.
# SYSTEM.fleet', 'legacyPackages.SYSTEM.fleet' or 'fleet'`.
_NO_FLEET = re.compile(r"does not provide attribute .*'fleet'$")


@dataclass(frozen=True)
class Local:
    """A reference to a folder on this machine."""

    folder: Path  # as written, relative to the working directory
    search_up: bool  # without a scheme: Nix looks in the folders above for flake.nix
    subdir: str = ""  # git+file's ?dir=: where in the repository flake.nix is


def local(ref: str) -> Local | None:
    """The folder a reference names, or None when Nix fetches it or looks it up."""
    address, _, query = ref.partition("#")[0].partition("?")
    for scheme in ("path:", "git+file://", "git+file:"):
        if address.startswith(scheme):
            subdir = urllib.parse.parse_qs(query).get("dir", [""])[0]
            folder = urllib.parse.unquote(address[len(scheme) :])
            return Local(Path(folder), search_up=False, subdir=subdir if "git" in scheme else "")
    if _REGISTRY.fullmatch(address) or not _PATH.fullmatch(address):
        return None  # a registry name, or a URL: Nix's to resolve
    return Local(Path(address), search_up=True)


def _root(found: Local) -> Path | None:
    """The folder holding the flake.nix Nix would read, or None when there is none."""
    if not found.search_up:
        folder = found.folder / found.subdir
        return folder if (folder / "flake.nix").is_file() else None
    # As Nix: from the path itself up, stopping at a repository's root or another device.
    path = Path(os.path.abspath(found.folder))
    device = path.lstat().st_dev
    while path != path.parent:
        if (path / "flake.nix").is_file():
            return path
        if (path / ".git").exists() or path.lstat().st_dev != device:
            return None
        path = path.parent
    return None


def root(ref: str) -> Path | None:
    """A local flake's folder, where its fleet.yaml is: the one holding the flake.nix Nix
    reads (for a path without a scheme, maybe a folder above), else the folder named.
    None for a reference Nix fetches or looks up."""
    found = local(ref)
    if found is None or not found.folder.exists():
        return None
    folder = _root(found) or found.folder / found.subdir
    return folder if folder.is_dir() else None


def check(ref: str, named: str) -> None:
    """Refuse, in one line that begins with ``named``, a reference Nix could not use: a
    fragment (fleet names the output itself), a folder that is not there or holds no
    flake.nix. A reference Nix fetches is left to Nix."""
    if "#" in ref:
        raise UsageError(f'{named}: no #fragment: fleet reads the flake\'s "fleet" output')
    found = local(ref)
    if found is None:
        return
    if not found.folder.exists():
        raise UsageError(f"{named}: no such folder")
    if not found.search_up and not found.folder.is_dir():
        raise UsageError(f"{named}: not a folder (name the folder that holds flake.nix)")
    if _root(found) is None:
        where = f"its folder {found.subdir}" if found.subdir else "that folder"
        above = " nor in one above it" if found.search_up else ""
        raise UsageError(f"{named}: no flake.nix in {where}{above}")


def missing_output(nix_error: str) -> bool:
    """Whether a failed evaluation of ``FLAKE#fleet`` says the flake has no such output."""
    return _NO_FLEET.search(nix_error) is not None


def registry_hint(ref: str) -> str:
    """For Nix's failure with a registry name that is also a folder here: how to say the
    folder (Nix never reads ``NAME`` as ./NAME)."""
    name = ref.partition("?")[0]
    if _REGISTRY.fullmatch(name) and Path(name).is_dir():
        return f" (a bare name is a flake registry entry to Nix; the folder is ./{name})"
    return ""
