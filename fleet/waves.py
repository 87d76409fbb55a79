"""The order of a rollout: canaries first, then the fleet's dependencies before what
depends on them, in batches.

A service's *tier* is 0 when it depends on no other service, else one more than the
highest tier among its dependencies; a host's tier is the highest among its services. Hosts
go tier by tier (a database's hosts before the applications that need it), each tier in
batches of ``batch_size`` (a share counts the whole selection), never two tiers in one
batch. The canaries go first and alone: the selected hosts tagged with the policy's canary
tag, or, when none is, the first hosts of the first tier.

A balanced service's ``maxUnavailable`` bounds every wave, the canaries' too: a wave never
holds more hosts running an instance of that service than it allows, whatever the batch
size says, since each of those hosts takes its instance out of rotation at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from fleet.errors import UsageError

if TYPE_CHECKING:
    from fleet.inventory import Host


class Order(StrEnum):
    DEPENDENCIES = "dependencies"  # a dependency's hosts before its dependents'
    NAMES = "names"  # the inventory's order alone


@dataclass(frozen=True)
class Wave:
    hosts: list[str]
    why: dict[str, str] = field(default_factory=dict)  # host -> why it is in this wave


def batch_count(total: int, batch_size: int | str) -> int:
    if isinstance(batch_size, str):
        return max(1, math.ceil(total * int(batch_size.rstrip("%")) / 100))
    return max(1, batch_size)


def service_tiers(depends_on: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each service's tier; dependencies on services not in the map are not counted.

    Depth first with a stack of its own, not recursion: a chain of a few hundred services
    (the inventory's to choose) must not exhaust Python's recursion limit."""
    tiers: dict[str, int] = {}

    def deps(name: str) -> list[str]:
        return [d for d in depends_on.get(name, ()) if d in depends_on]

    for root in depends_on:
        if root in tiers:
            continue
        path, on_path = [root], {root}
        pending = [iter(deps(root))]
        while pending:
            following = next(pending[-1], None)
            if following is None:
                name = path.pop()
                on_path.discard(name)
                pending.pop()
                tiers[name] = 1 + max((tiers[d] for d in deps(name)), default=-1)
            elif following in on_path:
                cycle = " -> ".join((*path[path.index(following) :], following))
                raise UsageError(f"services depend on each other in a cycle: {cycle}")
            elif following not in tiers:
                path.append(following)
                on_path.add(following)
                pending.append(iter(deps(following)))
    return tiers


def _reason(host: Host, tier: int, depends_on: Mapping[str, Sequence[str]]) -> str:
    needed = sorted({s for s in host.services for other, deps in depends_on.items() if s in deps})
    needs = sorted({d for s in host.services for d in depends_on.get(s, ())})
    parts = [f"tier {tier}"]
    if needs:
        parts.append(f"its services need {', '.join(needs)}")
    if needed:
        parts.append(f"{', '.join(needed)} needed by others")
    return "; ".join(parts)


def within_limits(
    hosts: Sequence[Host], limits: Mapping[str, int]
) -> list[tuple[list[Host], str | None]]:
    """``hosts`` in order, cut wherever one more would take more instances of a service
    out of rotation at once than its ``limits`` allow; each part with why it was cut."""
    parts: list[tuple[list[Host], str | None]] = []
    current: list[Host] = []
    counts: Counter[str] = Counter()
    why: str | None = None
    for host in hosts:
        balanced = [s for s in host.services if s in limits]
        over = sorted(s for s in balanced if counts[s] + 1 > limits[s])
        if over and current:
            parts.append((current, why))
            current, counts = [], Counter()
            why = "; ".join(
                f"{s} allows {limits[s]} instance{'s' if limits[s] != 1 else ''} out of "
                "rotation at once (maxUnavailable)"
                for s in over
            )
        current.append(host)
        counts.update(balanced)
    if current:
        parts.append((current, why))
    return parts


def plan(
    hosts: Sequence[Host],
    *,
    canary: int,
    batch_size: int | str,
    canary_tag: str | None = None,
    depends_on: Mapping[str, Sequence[str]] | None = None,
    order: Order = Order.DEPENDENCIES,
    max_unavailable: Mapping[str, int] | None = None,
) -> list[Wave]:
    """The waves of a rollout of ``hosts`` (given in the inventory's order).
    ``max_unavailable``: each balanced service's maxUnavailable."""
    waves = _plan(hosts, canary, batch_size, canary_tag, depends_on or {}, order)
    limits = max_unavailable or {}
    if not limits:
        return waves
    by_name = {h.name: h for h in hosts}
    split: list[Wave] = []
    for wave in waves:
        for part, why in within_limits([by_name[n] for n in wave.hosts], limits):
            reasons = {h.name: wave.why.get(h.name, "") for h in part}
            if why:
                reasons = {n: f"{r}; {why}" if r else why for n, r in reasons.items()}
            split.append(Wave([h.name for h in part], reasons))
    return split


def _plan(
    hosts: Sequence[Host],
    canary: int,
    batch_size: int | str,
    canary_tag: str | None,
    depends_on: Mapping[str, Sequence[str]],
    order: Order,
) -> list[Wave]:
    tiers = service_tiers(depends_on) if order is Order.DEPENDENCIES else {}
    host_tier = {h.name: max((tiers.get(s, 0) for s in h.services), default=0) for h in hosts}
    ordered = sorted(hosts, key=lambda h: host_tier[h.name])  # stable: inventory order kept
    waves: list[Wave] = []
    if canary > 0 and ordered:
        tagged = [h for h in ordered if canary_tag and canary_tag in h.tags]
        chosen = (tagged or ordered)[:canary]
        reason = (
            f"canary: tagged {canary_tag}"
            if tagged
            else "canary: first in order"
            + (f" (no selected host is tagged {canary_tag})" if canary_tag else "")
        )
        waves.append(Wave([h.name for h in chosen], {h.name: reason for h in chosen}))
        ordered = [h for h in ordered if h not in chosen]
    size = batch_count(len(hosts), batch_size)
    for tier in sorted({host_tier[h.name] for h in ordered}):
        members = [h for h in ordered if host_tier[h.name] == tier]
        for start in range(0, len(members), size):
            batch = members[start : start + size]
            why = {
                h.name: _reason(h, tier, depends_on) if tiers else "batch in inventory order"
                for h in batch
            }
            waves.append(Wave([h.name for h in batch], why))
    return waves
