"""`fleet status`: what every host runs, read from the hosts themselves, in parallel."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from fleet import health
from fleet.alerts import Alert, FleetAlerts, cell
from fleet.errors import printable
from fleet.hostops import Breach, BreachKind, Declared, HostOps, HostState, clock
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
    # Its alerts in the fleet's Prometheus; None: no monitoring, or no server answered.
    alerts: tuple[Alert, ...] | None = None

    @property
    def breaches(self) -> list[Breach]:
        """How this host breaks the safety invariant (nothing when unreachable: unknown)."""
        if self.state is None:
            return []
        found = self.state.breaches(self.name)
        if self.health is not None and not self.health.ok and not self.state.failed_units:
            found.append(
                Breach(
                    BreachKind.UNHEALTHY,
                    self.health.message,
                    f"fleet rollback {self.name}, or repair the service",
                )
            )
        return found

    @property
    def ok(self) -> bool:
        return self.reachable and not self.breaches

    @property
    def drift(self) -> bool | None:
        if self.desired is None or self.state is None:
            return None
        return self.state.running != self.desired

    def as_json(self) -> dict[str, Any]:
        s = self.state
        alerts = None if self.alerts is None else [a.as_json() for a in self.alerts]
        if s is None:
            return {"reachable": False, "message": self.message, "alerts": alerts}
        running = s.running_generation()
        current = Generation(s.current, s.current_path or "") if s.current else None
        return {
            "reachable": True,
            "running": running.as_json() if running else None,
            "booted": s.booted,
            "current": current.as_json() if current else None,
            "pendingReboot": s.pending_reboot,
            "bootEntry": s.boot_entry,
            "transaction": (
                {
                    "release": s.txn.release,
                    "holder": s.txn.holder,
                    "mode": s.txn.mode,
                    "state": s.txn.state,
                    "deadline": s.txn.deadline,
                    "abandoned": s.txn.abandoned,
                }
                if s.txn
                else None
            ),
            "breaches": [b.as_json() for b in self.breaches],
            "failedUnits": list(s.failed_units),
            "healthy": self.health.ok if self.health else None,
            "health": self.health.message if self.health else None,
            "lastRelease": s.last_release,
            "lock": s.lock,
            "desired": self.desired,
            "drift": self.drift,
            # Out of rotation: an operator's `fleet drain`, or a transaction's drain or weight.
            "maintenance": dict(s.maintenance) if s.maintenance is not None else None,
            "traffic": dict(s.traffic),
            "alerts": alerts,
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
            "current": f"#{s.current}" + (" (pending reboot)" if s.pending_reboot else ""),
            "booted": short_path(s.booted) if s.booted != s.running else "= running",
            "failed units": " ".join(s.failed_units) or "-",
            "health": ("ok" if self.health.ok else self.health.message[:40])
            if self.health else "-",
            "last release": printable(
                f"{last.get('release')} {last.get('result')} by "
                f"{str(last.get('operator', '?')).split('@')[0]}"
            ) if last else "-",
            "lock": (f"{s.lock}, {'ABANDONED' if s.txn.abandoned else 'until'} "
                     f"{clock(s.txn.deadline)}") if s.txn and s.lock else "-",
            "rotation": rotation(s),
            "invariant": "; ".join(f"{b.message} (repair: {b.repair})"
                                   for b in self.breaches)[:120] or "ok",
        } | ({} if self.drift is None else {"drift": "yes" if self.drift else "no"})  # fmt: skip


# Top-level keys of the status document beside the hosts' names, with monitoring: a host
# name holds letters, digits and '-' only, so no host can be named like them.
FLEET_ALERTS, ALERTS_ERROR = "_fleetAlerts", "_alertsError"


@dataclass(frozen=True)
class FleetStatus:
    """Every selected host's status, and the alerts of the fleet's Prometheus."""

    hosts: list[HostStatus]
    alerts: FleetAlerts | None = None  # None: the fleet has no monitoring

    @property
    def ok(self) -> bool:
        """The safety invariant alone: alerts are Prometheus's view, which lags, and
        some (a recent rollback) outlast a fleet already repaired."""
        return all(h.ok for h in self.hosts)

    def as_json(self) -> dict[str, Any]:
        """Host name -> its status; with monitoring, the fleet's alerts and why they are
        unknown beside them."""
        doc = {h.name: h.as_json() for h in self.hosts}
        if self.alerts is None:
            return doc
        fleet = None
        if self.alerts.error is None:
            fleet = [a.as_json() | {"host": a.host} for a in self.alerts.fleet]
        return doc | {FLEET_ALERTS: fleet, ALERTS_ERROR: self.alerts.error}

    def table(self) -> list[dict[str, str]]:
        """One row per host, every row with the same columns in the same order (an
        unreachable host's row has fewer cells); the alerts last, with monitoring."""
        rows = [h.row() for h in self.hosts]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        if self.alerts is not None:
            for row, host in zip(rows, self.hosts, strict=True):
                row["alerts"] = cell(host.alerts)
            keys.append("alerts")
        return [{k: r.get(k, "") for k in keys} for r in rows]

    @property
    def note(self) -> str | None:
        """One line for the operator when a monitoring server did not answer."""
        if self.alerts is None or not self.alerts.notes:
            return None
        if self.alerts.error is not None:
            return f"alerts unknown: {self.alerts.error}"
        return f"alerts from {self.alerts.server}; {'; '.join(self.alerts.notes)}"


def rotation(state: HostState) -> str:
    """Whether the host keeps its instances out of the balancers' rotation, and why."""
    if state.maintenance is not None:
        why = state.maintenance.get("reason")
        return "drained (maintenance" + (f": {printable(str(why))})" if why else ")")
    if state.traffic:
        return ", ".join(f"{service} {word}" for service, word in sorted(state.traffic.items()))
    return "-"


# A host that connects but then hangs (a stuck disk, a frozen systemd) must not hang status.
STATE_TIMEOUT = 15.0


def one_attempt(declared: Declared) -> Declared:
    """Status reports health as it is now: each check once, no retries."""
    checks = tuple(dataclasses.replace(c, retries=1) for c in declared.checks)
    return dataclasses.replace(declared, checks=checks)


def probe(host: Host, ops: HostOps) -> HostStatus:
    """One host's status: one round trip for its state, then each check the running
    system declares, once."""
    state = ops.state(timeout=STATE_TIMEOUT)
    if state.failed_units:
        verdict = health.Health(False, state.failed_units, ())
    else:
        verdict = health.prove(ops.remote, one_attempt(state.declared), time.monotonic() + 10)
    return HostStatus(host.name, True, state=state, health=verdict)
