"""The report's timeline of recent rollouts, from synthetic release records: where each
phase goes, and the page as a browser draws it."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fleet import report, timeline
from fleet.history import merge
from fleet.status import FleetStatus, HostStatus
from tests.browser import needs_chromium, png_colours, screenshot

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
OLD = {"number": 4, "path": "/nix/store/" + "a" * 32 + "-nixos-system-4"}
NEW = {"number": 5, "path": "/nix/store/" + "b" * 32 + "-nixos-system-5"}
DEPLOYED = {"connect": 0.2, "copy": 3.0, "lock": 0.3, "activate": 4.0, "health": 2.5}


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def record(release: str, host: str, started: float | None, timings: dict[str, float],
           **fields: Any) -> dict[str, Any]:  # fmt: skip
    """A release record as the tool and the host write it (keys sorted: the host's
    order), ``written`` seconds after ``started``."""
    written = fields.pop("written", sum(timings.values()))
    base = {"release": release, "action": "deploy", "host": host, "operator": "alice@laptop",
            "flake": "/srv/fleet", "revision": None, "previous": OLD, "new": NEW,
            "result": "deployed", "phase": None, "message": None,
            "time": stamp((started or T0) + written),
            "timings": dict(sorted(timings.items()))}  # fmt: skip
    if started is not None:
        base["started"] = started
    return dict(sorted((base | fields).items()))


def history() -> dict[str, list[dict[str, Any]]]:
    """Release r1: three hosts in two waves, deployed. Release r2, an hour later: web1 (a
    canary) deploys, web2 fails its checks and is undone, and web1 is reverted with the
    release; web3 is never reached."""
    r2 = T0 + 3600
    revert = {"lock": 0.3, "activate": 3.0, "health": 1.5}
    reverted = {"result": "rolled-back", "new": OLD, "previous": NEW,
                "message": "rolled back with the rest of the release"}  # fmt: skip
    undone = {"result": "rolled-back", "new": OLD, "phase": "health",
              "message": "check api: HTTP 503, expected 200", "written": 12.0}  # fmt: skip
    return {
        "web1": [
            record("r1", "web1", T0, DEPLOYED, wave=1),
            record("r2", "web1", r2, DEPLOYED, wave=1),
            record("r2", "web1", r2 + 20, revert, wave=1, **reverted),
        ],
        "web2": [
            record("r1", "web2", T0 + 10.5, DEPLOYED, wave=2),
            record("r2", "web2", r2 + 10, DEPLOYED, wave=2, **undone),
        ],
        "web3": [record("r1", "web3", T0 + 10.6, DEPLOYED, wave=2)],
    }


def test_phases_go_in_protocol_order_from_each_host_start() -> None:
    [r2, r1] = timeline.recent(merge(history()), 3)
    assert [lane.host for lane in r1.lanes] == ["web1", "web2", "web3"]
    assert r1.waves == ((1, 0.0), (2, 10.5)) and not r1.estimated
    web2 = next(lane for lane in r1.lanes if lane.host == "web2")
    assert [b.phase for b in web2.bars] == [
        "connect", "copy", "lock", "activate", "health", "confirm"]  # fmt: skip
    assert [b.start for b in web2.bars] == pytest.approx([10.5, 10.7, 13.7, 14.0, 18.0, 20.5])
    assert web2.bars[-1].seconds == 0  # the commit that wrote the record: a mark
    failed = next(lane for lane in r2.lanes if lane.host == "web2")
    assert failed.failed and failed.message == "check api: HTTP 503, expected 200"
    assert [b.phase for b in failed.bars if b.failed] == ["health"]
    assert failed.bars[-1].phase == "rollback"
    assert failed.bars[-1].seconds == pytest.approx(2.0)  # till the host wrote its record
    reverted = next(lane for lane in r2.lanes if lane.host == "web1")
    assert [b.phase for b in reverted.bars if b.revert] == ["lock", "activate", "health", "confirm"]
    assert reverted.bars[-1].start == pytest.approx(24.8) == r2.span


def test_an_older_record_is_placed_from_the_time_it_was_written() -> None:
    old = record("r0", "web1", None, {"connect": 1.0, "health": 2.0}, written=3.0)
    alone = {"release": "r0", "host": "web2", "action": "deploy", "result": "rolled-back",
             "time": stamp(T0 + 60), "phase": "confirm", "message": "not confirmed"}  # fmt: skip
    [found] = timeline.recent(merge({"web1": [old], "web2": [alone]}), 3)
    assert found.estimated
    web1, web2 = found.lanes
    assert [(b.phase, b.start) for b in web1.bars] == [
        ("connect", 0.0), ("health", 1.0), ("confirm", 3.0)]  # fmt: skip
    assert web2.host == "web2" and web2.bars == () and web2.failed


def test_only_rollouts_get_a_timeline() -> None:
    drain = {"release": "d1", "host": "web1", "action": "drain", "time": stamp(T0 + 9000)}
    found = timeline.recent(merge(history() | {"web9": [drain]}), 1)
    assert [t.release for t in found] == ["r2"]


@needs_chromium
def test_the_timeline_in_a_browser(tmp_path: Path) -> None:
    found = FleetStatus([HostStatus(n, False, "unreachable") for n in ("web1", "web2", "web3")])
    html = report.render("/srv/fleet", found, merge(history()), [])
    assert "<script" not in html.lower() and not re.search(r"https?://", html)
    assert 'title="health, at 17.5 s, 2.5 s: failed: check api: HTTP 503, expected 200"' in html
    page = tmp_path / "report.html"
    report.write(page, html)
    png = tmp_path / "report.png"
    screenshot(page, png, tmp_path / "profile")
    colours = png_colours(png)
    assert sum(colours.values()) == 1400 * 1000
    assert len(colours) > 20, colours.most_common(5)  # not a blank page
    shown = {c: colours[c] for c in (*timeline.COLOURS.values(), timeline.FAILED)}
    drawn = ("connect", "copy", "lock", "activate", "health", "confirm", "rollback")
    for phase in drawn:
        assert shown[timeline.COLOURS[phase]] > 20, (phase, shown)
    assert shown[timeline.FAILED] > 100, shown
