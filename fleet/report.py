"""`fleet report --html`: one self-contained page (no scripts, no network) with the status
table and the recent releases, for someone who has never used the tool."""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from fleet.errors import UsageError
from fleet.history import ReleaseEntry
from fleet.output import short_path
from fleet.status import HostStatus


def render(
    flake: str, statuses: list[HostStatus], releases: list[ReleaseEntry], unread: list[str]
) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fleet", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["short"] = short_path
    hosts = [{"name": s.name, "message": s.message, **s.as_json()} for s in statuses]
    return env.get_template("report.html.j2").render(
        flake=flake,
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        operator=f"{getpass.getuser()}@{socket.gethostname()}",
        hosts=hosts,
        healthy=sum(1 for h in hosts if h["reachable"] and h.get("healthy")),
        releases=[r.as_json() for r in releases],
        unread=unread,
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
