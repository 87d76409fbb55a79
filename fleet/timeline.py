"""The report's timeline of recent rollouts, from the hosts' release records alone: per
host, each phase as a bar on the release's time axis, the waves marked, failures red.

A record holds the seconds of each phase before the step that wrote it (``timings``; the
host keeps them in name order, so they are placed in protocol order here) and, since
records had them, when the host's protocol started (``started``, epoch seconds) and its
wave. An older record's start is estimated from the time it was written. What a record
cannot time (the commit that writes it, an undo's length beyond the second the host wrote
its record) is drawn as a thin mark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleet.errors import printable
from fleet.history import ReleaseEntry
from fleet.hostops import LATEST_EPOCH, is_real
from fleet.models import Phase

PROTOCOL = [p.value for p in Phase]
SUCCEEDED = ("deployed", "pending-reboot")
ACTIONS = ("deploy", "rollback")  # releases that change systems (not gc, drain, undrain)
# Each phase's colour on the page; a failed phase is red whatever its phase.
COLOURS = {
    "connect": "#90a4ae",
    "copy": "#42a5f5",
    "lock": "#7e57c2",
    "drain": "#8d6e63",
    "activate": "#26a69a",
    "reboot": "#5c6bc0",
    "health": "#66bb6a",
    "canary": "#fbc02d",
    "confirm": "#1b5e20",
    "persist": "#00838f",
    "rollback": "#ff8f00",
}
FAILED = "#d32f2f"
STEPS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
TICKS = 8  # the most ticks an axis gets, however long a record says a rollout took


@dataclass(frozen=True)
class Bar:
    phase: str
    start: float  # seconds since the release's first host started
    seconds: float  # 0: a mark (a step the record does not time)
    failed: bool = False
    revert: bool = False  # a fleet-wide revert's transaction on the host

    @property
    def css(self) -> str:
        """Its phase as a class of the page: a phase of the protocol, or "other" (the
        name is the host's word: it only ever reaches the tooltip, escaped)."""
        return self.phase if self.phase in COLOURS else "other"

    @property
    def title(self) -> str:
        what = ("revert: " if self.revert else "") + self.phase
        length = f"{self.seconds:.1f} s" if self.seconds else "not timed"
        return f"{what}, at {self.start:.1f} s, {length}" + (": failed" if self.failed else "")


@dataclass(frozen=True)
class Lane:
    host: str
    wave: int | None
    result: str
    message: str | None
    bars: tuple[Bar, ...]

    @property
    def failed(self) -> bool:
        return self.result not in SUCCEEDED


@dataclass(frozen=True)
class Timeline:
    release: str
    action: str
    time: str
    result: str
    span: float  # seconds the axis covers
    lanes: tuple[Lane, ...]
    waves: tuple[tuple[int, float], ...]  # each wave and when its first host started
    estimated: bool  # some start estimated from an older record's time

    def at(self, seconds: float) -> float:
        """A moment as a percentage of the axis, for the page's CSS."""
        return round(100 * min(max(seconds, 0.0), self.span) / self.span, 3)

    @property
    def ticks(self) -> list[tuple[float, str]]:
        step = next((s for s in STEPS if self.span / s <= TICKS), None)
        if step is None:  # beyond two hours a tick: whole hours, at most TICKS of them
            step = 3600 * math.ceil(self.span / (3600 * TICKS))
        count = int(self.span // step) + 1
        return [(i * step, _seconds(i * step)) for i in range(count)]


def _seconds(value: float) -> str:
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def _epoch(text: Any) -> float | None:
    """A record's ISO 8601 time in epoch seconds (no zone: UTC); None if it is none."""
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _clocked(value: Any) -> bool:
    """A record's epoch seconds, or a phase's length: a number (never a bool) from 0 to
    what a clock can show, so that no record can stretch the axis beyond it."""
    return is_real(value) and 0 <= value <= LATEST_EPOCH


def _order(phase: str) -> int:
    return PROTOCOL.index(phase) if phase in PROTOCOL else len(PROTOCOL)


@dataclass(frozen=True)
class _Placed:
    """One record's bars, in epoch seconds."""

    start: float
    bars: list[tuple[str, float, float, bool]]  # phase, start, seconds, failed
    estimated: bool


def _place(record: Mapping[str, Any]) -> _Placed | None:
    timings = record.get("timings")
    if not isinstance(timings, dict):
        return None  # written by the host alone (its switch, its boot): nothing timed
    phases = sorted(
        ((printable(str(k), 40), float(v)) for k, v in timings.items() if _clocked(v)),
        key=lambda kv: _order(kv[0]),
    )
    written = _epoch(record.get("time"))
    written = written if _clocked(written) else None
    started = record.get("started")
    estimated = not _clocked(started)
    if estimated:
        if written is None:
            return None
        started = written - sum(s for _, s in phases)
    assert isinstance(started, int | float)
    result, failing = record.get("result"), record.get("phase")
    failed = result not in SUCCEEDED and isinstance(failing, str)
    failing = printable(failing, 40) if isinstance(failing, str) else failing
    bars: list[tuple[str, float, float, bool]] = []
    at = float(started)
    for name, seconds in phases:
        bars.append((name, at, seconds, failed and name == failing))
        at += seconds
    if failed and failing not in timings:
        bars.append((str(failing), at, 0.0, True))  # the step that failed was not timed
    if not failed and "confirm" not in timings:
        bars.append(("confirm", at, 0.0, False))  # the commit that wrote the record
    elif result == "rolled-back" and failed:
        # The host wrote an undo's record when the undo ended (to the second).
        undo = max(0.0, written - at) if written is not None and not estimated else 0.0
        bars.append(("rollback", at, undo, False))
    return _Placed(float(started), bars, estimated)


def build(entry: ReleaseEntry) -> Timeline:
    """The timeline of one release."""
    placed: dict[str, list[_Placed]] = {}
    for host, records in entry.records.items():
        placed[host] = [p for p in map(_place, records) if p is not None]
    starts = [p.start for found in placed.values() for p in found]
    origin = min(starts, default=0.0)
    ends = [
        start + seconds
        for found in placed.values()
        for p in found
        for _, start, seconds, _ in p.bars
    ]
    span = max(1.0, max(ends, default=origin) - origin)
    lanes = []
    first_of_wave: dict[int, float] = {}
    for host, records in entry.records.items():
        wave = next((r["wave"] for r in records if _wave(r.get("wave"))), None)
        found = placed[host]
        bars = tuple(
            Bar(name, start - origin, seconds, failed, revert=index > 0)
            for index, p in enumerate(found)
            for name, start, seconds, failed in p.bars
        )
        if wave is not None and found:
            first_of_wave[wave] = min(first_of_wave.get(wave, math.inf), found[0].start - origin)
        newest = entry.hosts.get(host, {})
        message = newest.get("message")
        lanes.append(
            Lane(
                host,
                wave,
                str(newest.get("result")),
                str(message) if message else None,
                bars,
            )
        )
    lanes.sort(key=lambda lane: (
        lane.wave if lane.wave is not None else math.inf,
        lane.bars[0].start if lane.bars else math.inf,
        lane.host,
    ))  # fmt: skip
    return Timeline(
        release=entry.id,
        action=entry.action,
        time=entry.time,
        result=entry.result,
        span=span,
        lanes=tuple(lanes),
        waves=tuple(sorted(first_of_wave.items())),
        estimated=any(p.estimated for found in placed.values() for p in found),
    )


def _wave(value: Any) -> bool:
    """A record's wave: 1 first, never a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1_000_000


def recent(releases: Sequence[ReleaseEntry], count: int) -> list[Timeline]:
    """The timelines of the newest ``count`` releases that changed systems."""
    chosen = [r for r in releases if r.action in ACTIONS][:count]
    return [build(r) for r in chosen]
