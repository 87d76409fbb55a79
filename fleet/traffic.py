"""The balancers' side of a deploy: take a host's instances out of rotation, wait until
their sessions end, and see them back.

The host decides its own rotation: its agent answers HAProxy's agent checks from files the
host's transaction writes and its finish or undo removes (fleet-host `agent`), so no drain
outlives the transaction that made it, whatever happens to this tool. This module only
reads the balancers (fleet-host `traffic-stat`, HAProxy's runtime API) to know when a
drain has taken effect and when an instance is serving again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fleet import interrupt
from fleet.errors import FleetError, printable
from fleet.hostops import HostOps
from fleet.inventory import Traffic
from fleet.ssh import Remote

# HAProxy's statuses of a server that gets no new sessions ("DRAIN", "MAINT", "DOWN",
# "NOLB", with suffixes such as " (agent)" or "DOWN 1/2" while a check changes its mind).
NOT_SERVING = ("DRAIN", "MAINT", "DOWN", "NOLB", "no check")
POLL = 0.25


class BalancerError(FleetError):
    """A balancer could not be read: nothing may be activated on a guess."""


@dataclass(frozen=True)
class Server:
    """One instance as one balancer sees it."""

    balancer: str
    service: str
    host: str
    status: str
    weight: int | None
    sessions: int | None
    check: str
    agent: str

    @property
    def serving(self) -> bool:
        """In rotation: up, with weight, not drained."""
        return self.status.startswith("UP") and bool(self.weight)

    @property
    def drained(self) -> bool:
        return not self.serving and not self.sessions

    def as_json(self) -> dict[str, Any]:
        return {
            "balancer": self.balancer,
            "service": self.service,
            "host": self.host,
            "status": self.status,
            "weight": self.weight,
            "sessions": self.sessions,
            "check": self.check,
            "agent": self.agent,
        }


def balanced(traffic: Traffic | None, host: str) -> list[str]:
    """The services this host serves behind the balancers."""
    if traffic is None:
        return []
    return sorted(
        n for n, s in traffic.services.items() if any(i.host == host for i in s.instances)
    )


def canary_weight(instances: int, canaries: int, share: int) -> int:
    """The percent of its weight each of ``canaries`` instances (out of ``instances``, all
    of weight 100) gets so that together they take ``share`` % of the service's traffic."""
    if canaries >= instances:
        return 100
    weight = round(100 * share * (instances - canaries) / (canaries * (100 - share)))
    return max(1, min(100, weight))


def read(traffic: Traffic, balancer: str, remote: Remote) -> list[Server]:
    """One balancer's servers of the fleet's balanced services."""
    try:
        data = HostOps(remote).call("traffic-stat", "--socket", traffic.socket, timeout=15)
    except FleetError as exc:
        raise BalancerError(f"balancer {balancer}: {exc}") from exc
    rows = data.get("servers", [])
    if not isinstance(rows, list):
        raise BalancerError(f"balancer {balancer}: fleet-host traffic-stat: no list of servers")
    servers = []
    for row in rows:
        backend = row.get("backend") if isinstance(row, dict) else None
        if not isinstance(backend, str) or backend not in traffic.services:
            continue
        # What a balancer says is shown on the operator's terminal: printable only.
        servers.append(
            Server(
                balancer,
                backend,
                printable(str(row.get("server", ""))),
                printable(str(row.get("status", ""))),
                _whole(row.get("weight")),
                _whole(row.get("sessions")),
                printable(str(row.get("check", ""))),
                printable(str(row.get("agent", ""))),
            )
        )
    return servers


def _whole(value: Any) -> int | None:
    """A balancer's count (weight, sessions): a whole number, never a bool; else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_all(
    traffic: Traffic, remotes: Callable[[str], Remote], balancers: Sequence[str] | None = None
) -> dict[str, list[Server] | BalancerError]:
    """Every balancer at once; an unreadable one is its error, not an exception."""
    names = list(balancers if balancers is not None else traffic.balancers)

    def one(name: str) -> list[Server] | BalancerError:
        try:
            return read(traffic, name, remotes(name))
        except BalancerError as exc:
            return exc

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


@dataclass(frozen=True)
class Wait:
    """How a wait for the balancers ended: done, or what was still pending at its end."""

    done: bool
    pending: tuple[Server, ...]
    seconds: float

    def describe(self) -> str:
        return ", ".join(
            f"{s.service} on {s.balancer}: {s.status}, {s.sessions or 0} sessions"
            for s in self.pending
        )


def _wait(
    traffic: Traffic,
    remotes: Callable[[str], Remote],
    host: str,
    services: Sequence[str],
    timeout: float,
    ready: Callable[[Server], bool],
) -> Wait:
    start = time.monotonic()
    wanted = set(services)
    while True:
        views = read_all(traffic, remotes)
        failed = [v for v in views.values() if isinstance(v, BalancerError)]
        if failed:
            raise failed[0]
        mine = [
            s
            for servers in views.values()
            if not isinstance(servers, BalancerError)
            for s in servers
            if s.host == host and s.service in wanted
        ]
        pending = tuple(s for s in mine if not ready(s))
        elapsed = time.monotonic() - start
        if not pending or elapsed >= timeout:
            return Wait(not pending, pending, elapsed)
        interrupt.sleep(POLL)


def wait_drained(
    traffic: Traffic,
    remotes: Callable[[str], Remote],
    host: str,
    services: Sequence[str],
    timeout: float,
) -> Wait:
    """Until every balancer sends the host's instances nothing new and their sessions
    have ended, or ``timeout``."""
    return _wait(traffic, remotes, host, services, timeout, lambda s: s.drained)


def wait_serving(
    traffic: Traffic,
    remotes: Callable[[str], Remote],
    host: str,
    services: Sequence[str],
    timeout: float,
) -> Wait:
    """Until every balancer sends the host's instances traffic again, or ``timeout``."""
    return _wait(traffic, remotes, host, services, timeout, lambda s: s.serving)


def view(
    traffic: Traffic,
    remotes: Callable[[str], Remote],
    hosts: Sequence[str] | None = None,
) -> tuple[list[Server], dict[str, str]]:
    """`fleet traffic`: every balancer's view of the selected hosts' instances, and the
    balancers that could not be read (name -> why)."""
    servers: list[Server] = []
    errors: dict[str, str] = {}
    for name, found in read_all(traffic, remotes).items():
        if isinstance(found, BalancerError):
            errors[name] = str(found)
            continue
        servers += [s for s in found if hosts is None or s.host in hosts]
    servers.sort(key=lambda s: (s.service, s.host, s.balancer))
    return servers, errors


def out_of_rotation(
    servers: Sequence[Server],
    healthy: Mapping[str, bool],
) -> list[Server]:
    """The invariant's traffic half: instances of healthy hosts that a balancer does not
    send to (``healthy``: host -> whether its checks pass)."""
    return [s for s in servers if healthy.get(s.host) and not s.serving]
