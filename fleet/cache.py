"""The fleet's binary cache: each new closure leaves the operator's machine once.

A deploy copies the closures to the cache host and has it add them to the cache it serves
(``fleet-host publish``, signed with the cache's own key); each host then substitutes what
it lacks from the cache (``fleet-host fetch``), over the fleet's network, not the
operator's uplink. Whatever fails (the cache host unreachable, its HTTP server down, a
path missing) falls back to copying from the operator's machine, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet import nix
from fleet.errors import FleetError
from fleet.hostops import HostOps
from fleet.inventory import Cache
from fleet.ssh import Remote


@dataclass(frozen=True)
class Published:
    """What the deploy put in the cache; ``error``: nothing, and why."""

    url: str
    paths: frozenset[str]
    seconds: float
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "published": len(self.paths),
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def publish(
    cache: Cache, remote: Remote, paths: Sequence[str], *, substitute: bool = False
) -> Published:
    """Copy the closures to the cache host (one copy) and add them to its cache;
    ``substitute``: the cache host first fetches what it can from its own substituters."""
    unique = sorted(set(paths))
    start = time.monotonic()
    try:
        nix.copy_closure(remote, *unique, substitute=substitute)
        HostOps(remote).call("publish", *unique)
    except FleetError as exc:
        return Published(cache.url, frozenset(), time.monotonic() - start, str(exc))
    return Published(cache.url, frozenset(unique), time.monotonic() - start)


def fetch_or_copy(
    ops: HostOps, published: Published | None, path: str, *, substitute: bool = False
) -> dict[str, Any]:
    """Bring a closure to a host: from the cache when it holds it, else (and when that
    fails) from the operator's machine, from which ``substitute`` has the host first fetch
    what it can from its own substituters. What happened, for the host's report."""
    if published is not None and path in published.paths:
        try:
            answer = ops.call("fetch", "--cache", published.url, path)
        except FleetError as exc:
            nix.copy_closure(ops.remote, path, substitute=substitute)
            return {"source": "operator", "cacheError": str(exc)}
        return {
            "source": "cache",
            "paths": _amount(answer.get("fetched")),
            "downloadBytes": _amount(answer.get("downloadBytes")),
        }
    nix.copy_closure(ops.remote, path, substitute=substitute)
    why = None if published is None else (published.error or "the cache does not hold it")
    return {"source": "operator", "cacheError": why} if why else {"source": "operator"}


def _amount(value: Any) -> int | None:
    """A count the host reports for the report: a whole number (never a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
