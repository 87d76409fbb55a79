"""`fleet status`: what every host runs, read from the hosts themselves, in parallel."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from fleet import health
from fleet.hostops import HostOps, HostState, describe_lock
from fleet.inventory import Host
from fleet.models import Generation
from fleet.output import generation_cell, short_path


@dataclass(frozen=True)
class HostStatus:
    name: str
    reachable: bool
    message: str = ""
    state: HostState | None = None
    health: health.Health | None = None
    desired: str | None = None  # what the flake builds now, when asked (it needs a build)

    @property
    def drift(self) -> bool | None:
        if self.desired is None or self.state is None:
            return None
        return self.state.running != self.desired

    def as_json(self) -> dict[str, Any]:
        s = self.state
        if s is None:
            return {"reachable": False, "message": self.message}
        running = s.running_generation()
        current = Generation(s.current, s.current_path or "") if s.current else None
        return {
            "reachable": True,
            "running": running.as_json() if running else None,
            "booted": s.booted,
            "current": current.as_json() if current else None,
            "pendingBoot": s.current_path is not None and s.current_path != s.running,
            "failedUnits": list(s.failed_units),
            "healthy": self.health.ok if self.health else None,
            "health": self.health.message if self.health else None,
            "lastRelease": s.last_release,
            "lock": s.lock,
            "desired": self.desired,
            "drift": self.drift,
        }

    def row(self) -> dict[str, str]:
        s = self.state
        if s is None:
            return {"host": self.name, "reachable": "no", "running": self.message[:60]}
        last = s.last_release or {}
        return {
            "host": self.name,
            "reachable": "yes",
            "running": generation_cell(s.running_generation()),
            "current": f"#{s.current}" + ("" if s.current_path == s.running else " (pending)"),
            "booted": short_path(s.booted) if s.booted != s.running else "= running",
            "failed units": " ".join(s.failed_units) or "-",
            "health": ("ok" if self.health.ok else self.health.message[:40])
            if self.health else "-",
            "last release": (f"{last.get('release')} {last.get('result')} by "
                             f"{str(last.get('operator', '?')).split('@')[0]}") if last else "-",
            "lock": describe_lock(s.lock) if s.lock else "-",
        } | ({} if self.drift is None else {"drift": "yes" if self.drift else "no"})  # fmt: skip


def one_attempt(host: Host) -> Host:
    """Status reports health as it is now: each check once, no retries."""
    checks = tuple(dataclasses.replace(c, retries=1) for c in host.checks)
    return dataclasses.replace(host, checks=checks)


def probe(host: Host, ops: HostOps) -> HostStatus:
    """One host's status: one round trip for its state, then each check once."""
    state = ops.state()
    if state.failed_units:
        verdict = health.Health(False, state.failed_units, ())
    else:
        verdict = health.run_checks(ops.remote, one_attempt(host).checks, time.monotonic() + 10)
    return HostStatus(host.name, True, state=state, health=verdict)
