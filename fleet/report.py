"""`fleet report --html`: one self-contained page (no scripts, no network) with the status
table, each host's alerts beside its last release, the recent releases and a timeline of
the last rollouts (fleet/timeline.py), for someone who has never used the tool."""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from fleet import timeline
from fleet.errors import UsageError
from fleet.history import ReleaseEntry
from fleet.output import short_path
from fleet.status import FleetStatus


def render(
    flake: str,
    found: FleetStatus,
    releases: list[ReleaseEntry],
    unread: list[str],
    timelines: int = 3,
) -> str:
    """The page; ``timelines``: how many of the newest rollouts get a timeline."""
    # Autoescape stays on: alerts, messages and records are other machines' words.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fleet", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["short"] = short_path
    hosts = [{"name": s.name, "message": s.message, **s.as_json()} for s in found.hosts]
    monitored = found.alerts is not None
    return env.get_template("report.html.j2").render(
        flake=flake,
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        operator=f"{getpass.getuser()}@{socket.gethostname()}",
        hosts=hosts,
        healthy=sum(1 for h in hosts if h["reachable"] and h.get("healthy")),
        releases=[r.as_json() for r in releases],
        unread=unread,
        timelines=timeline.recent(releases, timelines),
        phases=[p for p in timeline.PROTOCOL if p in timeline.COLOURS],
        colours=timeline.COLOURS,
        failed_colour=timeline.FAILED,
        monitored=monitored,
        fleet_alerts=(
            [a.as_json() | {"host": a.host} for a in found.alerts.fleet]
            if found.alerts is not None
            else []
        ),
        alerts_error=found.alerts.error if found.alerts is not None else None,
    )


def write(path: Path, html: str) -> None:
    """Whole or not at all, through a temporary file of an unpredictable name made with
    O_EXCL (never one planted beside the target)."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(html)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
