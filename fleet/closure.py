"""Package-level difference of two closures, from store path names alone.

``nix store diff-closures`` needs both closures in one store; here one is on the host and
one on the operator's machine, so each side lists its closure with ``nix-store -qR``
(in every Nix version) and the names are compared here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def parse_name(path: str) -> tuple[str, str]:
    """``/nix/store/HASH-openssl-3.0.2`` -> ("openssl", "3.0.2"), as builtins.parseDrvName:
    the version starts after the first dash that a non-letter follows."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    name = base.split("-", 1)[1] if "-" in base else base
    for i, char in enumerate(name):
        if char == "-" and i + 1 < len(name) and not name[i + 1].isalpha():
            return name[:i], name[i + 1 :]
    return name, ""


@dataclass(frozen=True)
class Change:
    package: str
    old: tuple[str, ...]  # versions before; () when added
    new: tuple[str, ...]  # versions after; () when removed

    @property
    def kind(self) -> str:
        if not self.old:
            return "added"
        if not self.new:
            return "removed"
        return "rebuilt" if self.old == self.new else "changed"

    def __str__(self) -> str:
        def show(versions: tuple[str, ...]) -> str:
            return ", ".join(v or "(no version)" for v in versions) or "∅"

        if self.kind == "rebuilt":
            return f"{self.package}: {show(self.new)} rebuilt (same version, other inputs)"
        return f"{self.package}: {show(self.old)} → {show(self.new)}"


def _by_package(paths: Iterable[str]) -> dict[str, dict[str, set[str]]]:
    """package -> version -> store paths."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in paths:
        package, version = parse_name(path)
        found.setdefault(package, {}).setdefault(version, set()).add(path)
    return found


def diff(old: Iterable[str], new: Iterable[str]) -> list[Change]:
    """Packages added, removed, with other versions, or rebuilt; sorted by name."""
    before, after = _by_package(old), _by_package(new)
    changes = []
    for package in sorted(before.keys() | after.keys()):
        was, now = before.get(package, {}), after.get(package, {})
        if was != now:
            changes.append(Change(package, tuple(sorted(was)), tuple(sorted(now))))
    return changes
