"""Release history, merged from the records every host keeps, and rollback targets from it.

The hosts hold the truth; the operator's machine keeps nothing. Merging is by release id,
the newest record of a host winning (a fleet-wide rollback adds a second record for the
same release), so the result does not depend on which host answered first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import UsageError, printable
from fleet.hostops import HostState, is_count
from fleet.models import Generation


@dataclass(frozen=True)
class ReleaseEntry:
    id: str
    action: str
    operator: str
    time: str  # of the first record: when the release reached its first host
    flake: str | None
    revision: str | None
    hosts: dict[str, dict[str, Any]]  # host -> its newest record of this release
    # host -> all its records of this release, oldest first, whole (a fleet-wide revert
    # adds a second): for the report's timeline; not part of the history's JSON.
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict, compare=False)

    @property
    def result(self) -> str:
        counts = Counter(printable(str(h.get("result")), 40) for h in self.hosts.values())
        if set(counts) == {"deployed"}:
            return "deployed"
        return ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "operator": self.operator,
            "time": self.time,
            "flake": self.flake,
            "revision": self.revision,
            "result": self.result,
            "hosts": self.hosts,
        }


def merge(records: Mapping[str, Sequence[dict[str, Any]]]) -> list[ReleaseEntry]:
    """Releases newest first, from each host's records (oldest first, as the hosts keep them)."""
    by_release: dict[str, dict[str, dict[str, Any]]] = {}
    every: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for host in sorted(records):
        for record in records[host]:
            release = record.get("release")
            if isinstance(release, str):
                by_release.setdefault(release, {})[host] = record
                every.setdefault(release, {}).setdefault(host, []).append(record)
    entries = []
    for release, hosts in by_release.items():
        first = min(hosts.values(), key=lambda r: str(r.get("time", "")))
        # The hosts' words, shown in tables and on the page: printable, never escapes.
        entries.append(ReleaseEntry(
            id=printable(release),
            action=printable(str(first.get("action", "deploy"))),
            operator=printable(str(first.get("operator", "?"))),
            time=printable(str(first.get("time", ""))),
            flake=first.get("flake"),
            revision=first.get("revision"),
            hosts={h: {k: r.get(k) for k in ("result", "previous", "new", "phase", "message")}
                   for h, r in sorted(hosts.items())},
            records=every[release],
        ))  # fmt: skip
    return sorted(entries, key=lambda e: (e.time, e.id), reverse=True)


def _numbers(state: HostState) -> list[int]:
    return [g.number for g in state.generations]


def _existing(name: str, state: HostState, number: int, why: str) -> Generation:
    path = state.path_of(number)
    if path is None:
        have = ", ".join(f"#{n}" for n in _numbers(state)) or "none"
        raise UsageError(f"{name}: generation #{number} {why} no longer exists (it has {have})")
    return Generation(number, path)


def rollback_target(
    name: str,
    state: HostState,
    records: Sequence[dict[str, Any]],
    to: int | None = None,
    release: str | None = None,
) -> Generation | None:
    """Where a rollback takes a host; None when it had no part in ``release``.

    Without options: the generation before the profile's current one. ``to``: that
    generation. ``release``: the generation the host ran before that release reached it.
    """
    if to is not None:
        return _existing(name, state, to, "(asked for with --to)")
    if release is not None:
        # Records come from the host: one of another shape is passed over, never trusted.
        taken = [r for r in records if r.get("release") == release and r.get("action") == "deploy"
                 and r.get("result") in ("deployed", "pending-reboot")
                 and isinstance(r.get("previous"), dict)]  # fmt: skip
        if not taken:
            return None
        number = taken[-1]["previous"].get("number")
        if not is_count(number):
            raise UsageError(
                f"{name}: the system it ran before release {release} was in no "
                "generation of its profile; use --to"
            )
        return _existing(name, state, number, f"(from before release {release})")
    if state.current is None:
        raise UsageError(f"{name}: its system profile has no current generation")
    earlier = [n for n in _numbers(state) if n < state.current]
    if not earlier:
        raise UsageError(f"{name}: no generation before its current one (#{state.current})")
    return _existing(name, state, max(earlier), "(the one before the current)")
