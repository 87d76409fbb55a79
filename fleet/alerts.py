"""The alerts the fleet's Prometheus holds, by host, for `fleet status` and the report.

Prometheus listens on the monitoring hosts' loopback only, so the alerts are asked of a
monitoring host through its ssh connection (`fleet-host prom-alerts`). Its answer is
another machine's word: every value is checked, cut and made printable here, and an
alert of the wrong shape is passed over, so that nothing a monitoring host says can break
the table or the page, nor fail `fleet status`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleet.errors import FleetError, printable
from fleet.hostops import HostOps
from fleet.inventory import Monitoring

# More than any fleet raises at once; the rest is dropped, not the whole answer.
MAX_ALERTS = 2000
NAME_MAX = 100
SUMMARY_MAX = 200
CELL_MAX = 100


class AlertState(StrEnum):
    FIRING = "firing"
    PENDING = "pending"  # its condition holds, but not yet for the rule's `for`


@dataclass(frozen=True)
class Alert:
    name: str
    state: AlertState
    severity: str | None
    summary: str | None
    active_at: str | None
    host: str | None  # its `host` label; None: the fleet's as a whole

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "severity": self.severity,
            "summary": self.summary,
            "activeAt": self.active_at,
        }

    @property
    def label(self) -> str:
        return self.name + (" (pending)" if self.state is AlertState.PENDING else "")


@dataclass(frozen=True)
class FleetAlerts:
    """One monitoring server's alerts, or why none could be had.

    ``error`` is set when no server answered: then nothing is known, which is not the
    same as no alert. ``notes``: the servers that failed before one answered."""

    by_host: Mapping[str, tuple[Alert, ...]] = field(default_factory=dict)
    fleet: tuple[Alert, ...] = ()
    server: str | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()

    def of(self, host: str) -> tuple[Alert, ...] | None:
        """A host's alerts; None when they are unknown."""
        return None if self.error is not None else self.by_host.get(host, ())


class Garbage(ValueError):
    """An answer that is not Prometheus's list of alerts."""


def _text(value: Any, limit: int) -> str | None:
    """A label or annotation as one printable line, cut; None unless it is a string."""
    if not isinstance(value, str):
        return None
    line = "".join(c if c.isprintable() else "?" for c in value[: limit + 1])
    return line[: limit - 1] + "…" if len(line) > limit else line


def parse_alert(raw: Any) -> Alert | None:
    """One entry of /api/v1/alerts; None when it has not the shape of an alert."""
    if not isinstance(raw, dict):
        return None
    labels, annotations = raw.get("labels"), raw.get("annotations")
    if not isinstance(labels, dict):
        return None
    if not isinstance(annotations, dict):
        annotations = {}
    name = _text(labels.get("alertname"), NAME_MAX)
    state = raw.get("state")
    if not name or state not in ("firing", "pending"):
        return None
    host = labels.get("host")
    if host is not None and not isinstance(host, str):
        return None
    return Alert(
        name=name,
        state=AlertState(state),
        severity=_text(labels.get("severity"), 20),
        summary=_text(annotations.get("summary"), SUMMARY_MAX),
        active_at=_text(raw.get("activeAt"), 40),
        host=_text(host, 80) or None,  # a fleet's host name is printable and short
    )


def _order(alert: Alert) -> tuple[int, str, str]:
    return (alert.state is AlertState.PENDING, alert.name, alert.active_at or "")


def group(answer: Any, hosts: Collection[str], known: Collection[str]) -> FleetAlerts:
    """Prometheus's answer, grouped by the ``host`` label: alerts of ``hosts`` (those
    asked about), and the fleet's (no host label, or a host the inventory does not know).

    Raises Garbage for an answer that is not a successful list of alerts."""
    if not isinstance(answer, dict) or answer.get("status") != "success":
        raise Garbage("not a successful answer of Prometheus")
    data = answer.get("data")
    entries = data.get("alerts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise Garbage("no list of alerts in its answer")
    by_host: dict[str, list[Alert]] = {h: [] for h in hosts}
    fleet: list[Alert] = []
    for raw in entries[:MAX_ALERTS]:
        alert = parse_alert(raw)
        if alert is None:
            continue
        if alert.host is None or alert.host not in known:
            fleet.append(alert)
        elif alert.host in by_host:
            by_host[alert.host].append(alert)
    return FleetAlerts(
        {h: tuple(sorted(a, key=_order)) for h, a in by_host.items()},
        tuple(sorted(fleet, key=_order)),
    )


def fetch(
    monitoring: Monitoring,
    ops_of: Callable[[str], HostOps],
    hosts: Collection[str],
    known: Collection[str],
    timeout: float,
) -> FleetAlerts:
    """Ask the monitoring servers in turn until one answers, all within ``timeout``: each
    is an independent copy that watches the whole fleet, so any one of them will do."""
    deadline = time.monotonic() + timeout
    notes: list[str] = []
    for server in monitoring.servers:
        left = deadline - time.monotonic()
        if left <= 0:
            notes.append(f"{server}: not asked, no time left")
            continue
        try:
            answer = ops_of(server).prom_alerts(monitoring.prometheus_port, timeout=left)
            found = group(answer, hosts, known)
        except Garbage as exc:
            notes.append(f"{server}: {exc}")
        except FleetError as exc:
            notes.append(printable(str(exc)))
        else:
            return FleetAlerts(found.by_host, found.fleet, server, None, tuple(notes))
    return FleetAlerts(error="; ".join(notes) or "no monitoring server", notes=tuple(notes))


def cell(alerts: Sequence[Alert] | None) -> str:
    """The table's cell: each alert's name once, firing before pending."""
    if alerts is None:
        return "unknown"
    labels = list(dict.fromkeys(a.label for a in sorted(alerts, key=_order)))
    text = ", ".join(labels) or "-"
    return text[: CELL_MAX - 1] + "…" if len(text) > CELL_MAX else text
