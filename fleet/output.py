"""Progress while a rollout runs, and the final table or JSON report."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TextIO

from fleet.errors import printable, printable_lines
from fleet.models import Generation, HostReport, HostResult, Phase

WAVE_NAMES = 6  # hosts a plain wave line names before "(+N more)"


def fit(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` columns of a terminal, where a wide character (CJK,
    most emoji) takes two: a host's message cannot wrap a line of the live view, whose
    redraw counts lines."""
    used = 0
    for index, char in enumerate(text):
        used += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
        if used > columns:
            return text[:index]
    return text


class Reporter:
    """Plain lines prefixed by host: for logs, CI and pipes (and --json, on stderr)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.start_time = time.monotonic()
        self.lock = threading.Lock()

    def start(self, hosts: list[str]) -> None:
        pass

    def wave(self, number: int, total: int, hosts: list[str]) -> None:
        """A wave starts: ``number`` of ``total`` (1 first), with these hosts."""
        more = len(hosts) - WAVE_NAMES
        names = ", ".join(hosts[:WAVE_NAMES]) + (f" (+{more} more)" if more > 0 else "")
        self.note(f"wave {number} of {total}: {names}")

    def phase(self, host: str, phase: Phase, detail: str = "") -> None:
        with self.lock:
            elapsed = time.monotonic() - self.start_time
            suffix = f": {printable(detail, None)}" if detail else ""
            self.stream.write(f"{host}: {phase.value}{suffix} [{elapsed:.1f}s]\n")
            self.stream.flush()

    def done(self, report: HostReport) -> None:
        """The host's protocol ended (a revert of it ends it a second time)."""
        detail = report.result.value + (f" ({report.message})" if report.message else "")
        self.phase(report.name, Phase.DONE, detail[:160])

    def note(self, message: str) -> None:
        with self.lock:
            self.stream.write(printable_lines(message) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        pass


class State(Enum):
    """Where a host is in the rollout, as the live view counts it."""

    WAITING = "waiting"
    FLIGHT = "in flight"
    DONE = "done"
    FAILED = "failed"  # ended on anything but success: rolled back, failed, unreachable


@dataclass
class Row:
    """One host as the live view shows it."""

    state: State = State.WAITING
    phase: Phase | None = None
    detail: str = ""
    since: float = 0.0  # when its current phase started
    started: float | None = None  # when its first phase started
    ended: float | None = None  # when it ended: its time stops there
    result: HostResult | None = None


def _terminal_size(stream: TextIO) -> os.terminal_size:
    """The size of the terminal the view is drawn on (stderr, even when stdout is a pipe)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size()
    # A terminal that does not know its size says 0: then $COLUMNS/$LINES, or 80x24.
    return size if size.columns > 0 and size.lines > 0 else shutil.get_terminal_size()


class LiveReporter(Reporter):
    """A live view redrawn in place on a terminal: a header with the wave and the counts,
    then one line per host (phase and its time; a finished host's result and its whole
    time, frozen at its end). Events only update the rows; the ticker redraws at most
    ``1 / interval`` times a second, and only the lines that fit the terminal: in-flight
    and failed hosts first, a summary line for the rest. A fleet of thousands costs no
    more per redraw than one screenful."""

    def __init__(
        self,
        stream: TextIO = sys.stderr,
        *,
        clock: Callable[[], float] = time.monotonic,
        size: Callable[[], os.terminal_size] | None = None,
        interval: float = 0.25,
    ) -> None:
        super().__init__(stream)
        self.clock = clock
        self.size = size or (lambda: _terminal_size(stream))
        self.interval = interval
        self.rows: dict[str, Row] = {}
        # The hosts in each state, in the order they entered it (dicts as ordered sets).
        self.by_state: dict[State, dict[str, None]] = {s: {} for s in State}
        self.width = 0
        self.wave_text = "starting"
        self.began: float | None = None
        self.drawn = 0
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def start(self, hosts: list[str]) -> None:
        with self.lock:
            self.began = self.clock()
            self.rows = {h: Row() for h in hosts}
            self.by_state = {s: {} for s in State}
            self.by_state[State.WAITING] = dict.fromkeys(hosts)
            self.width = max((len(h) for h in hosts), default=0)
            self._draw()
        self.ticker.start()

    def wave(self, number: int, total: int, hosts: list[str]) -> None:
        with self.lock:
            self.wave_text = f"wave {number} of {total}"

    def _move(self, host: str, row: Row, state: State) -> None:
        self.by_state[row.state].pop(host, None)
        self.by_state[state][host] = None
        row.state = state

    def phase(self, host: str, phase: Phase, detail: str = "") -> None:
        with self.lock:
            row = self.rows.setdefault(host, Row())
            now = self.clock()
            if row.state is not State.FLIGHT:  # its start, or a revert of a finished host
                row.started, row.ended, row.result = now, None, None
                self._move(host, row, State.FLIGHT)
            row.phase, row.detail, row.since = phase, detail, now

    def done(self, report: HostReport) -> None:
        with self.lock:
            row = self.rows.setdefault(report.name, Row())
            now = self.clock()
            row.started = now if row.started is None else row.started
            row.ended, row.result = now, report.result
            row.detail = report.message or ""
            self._move(report.name, row, State.DONE if report.result.succeeded else State.FAILED)

    def note(self, message: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(printable_lines(message) + "\n")
            self._draw()

    def _tick(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                self._draw()

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def header(self, now: float) -> str:
        n = {s: len(hosts) for s, hosts in self.by_state.items()}
        elapsed = now - (self.began if self.began is not None else now)
        return (
            f"{self.wave_text} · {n[State.DONE]} done · {n[State.FAILED]} failed · "
            f"{n[State.FLIGHT]} in flight · {n[State.WAITING]} waiting · {elapsed:.1f}s"
        )

    def line(self, host: str, row: Row, now: float) -> str:
        if row.state is State.WAITING:
            return f"  {host:<{self.width}}  waiting"
        if row.ended is not None and row.result is not None:
            label, seconds = row.result.value, row.ended - (row.started or row.ended)
        else:
            label = row.phase.value if row.phase else ""
            seconds = now - row.since
        extra = f"  {printable(row.detail, None)}" if row.detail else ""
        return f"  {host:<{self.width}}  {label:<9} {seconds:5.1f}s{extra}"

    def frame(self) -> list[str]:
        """What one redraw shows: the header, then the rows that fit the terminal."""
        now = self.clock()
        columns, lines = self.size()
        room = max(1, lines - 2)  # the header, and the line the cursor waits on
        if len(self.rows) <= room:
            shown = list(self.rows)
            summary = None
        else:
            room = max(1, room - 1)  # the summary's line
            first = itertools.chain(self.by_state[State.FLIGHT], self.by_state[State.FAILED])
            shown = list(itertools.islice(first, room))
            on_screen = Counter(self.rows[h].state for h in shown)
            rest = [
                f"{count} {s.value}"
                for s in (State.DONE, State.FAILED, State.FLIGHT, State.WAITING)
                if (count := len(self.by_state[s]) - on_screen[s])
            ]
            summary = f"  … {len(self.rows) - len(shown)} more: {', '.join(rest)}"
        out = [self.header(now)] + [self.line(h, self.rows[h], now) for h in shown]
        if summary is not None:
            out.append(summary)
        limit = max(10, columns - 1)  # a wrapped line would throw the redraw off
        return [fit(text, limit) for text in out]

    def _draw(self) -> None:
        if self.began is None:
            return
        self._clear()
        out = self.frame()
        self.stream.write("".join(text + "\n" for text in out))
        self.drawn = len(out)
        self.stream.flush()

    def finish(self) -> None:
        self.stop.set()
        if self.ticker.is_alive():
            self.ticker.join()
        with self.lock:
            self._draw()


def reporter_for(stream: TextIO = sys.stderr) -> Reporter:
    return LiveReporter(stream) if stream.isatty() else Reporter(stream)


def short_path(path: str | None) -> str:
    """/nix/store/abcdefgh...-name -> abcdefg-name: enough to tell generations apart."""
    if not path:
        return "-"
    base = path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{digest[:7]}-{name}" if name else base[:20]


def generation_cell(gen: Generation | None) -> str:
    if gen is None:
        return "-"
    number = f"#{gen.number} " if gen.number is not None else ""
    return number + short_path(gen.path)


def new_cell(report: HostReport) -> str:
    """The generation the host ends on; after a rollback, what was attempted, then what
    was restored."""
    attempted, new = report.attempted, report.new
    if (
        attempted is not None
        and new is not None
        and attempted.path != new.path
        and not report.result.succeeded
    ):
        return f"{generation_cell(attempted)} → {generation_cell(new)}"
    return generation_cell(new)


def host_table(reports: list[HostReport]) -> str:
    """The report's table, then, for each host that failed in a remote step, that step
    as a command line to run again."""
    rows: list[dict[str, Any]] = []
    for r in reports:
        rows.append({
            "host": r.name,
            "result": r.result.value + ("" if r.changed or r.result.value != "deployed"
                                        else " (unchanged)"),
            "previous": generation_cell(r.previous),
            "new": new_cell(r),
            "failed in": r.phase.value if r.phase else "",
            "message": (r.message or "")[:100],
            "time": f"{sum(r.timings.values()):.1f}s",
        })  # fmt: skip
    lines = [table(rows)]
    for r in reports:
        if r.command and not r.result.succeeded:
            lines += [f"{r.name} ({r.phase.value if r.phase else r.result.value}):",
                      f"  to run it again: {printable(r.command, None)}"]  # fmt: skip
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned table, headed by their keys, every cell printable (cells hold
    hosts' words). tabulate is imported only when a table is printed: --json and every
    error never need it."""
    from tabulate import tabulate

    safe = [
        {k: printable(v, None) if isinstance(v, str) else v for k, v in r.items()} for r in rows
    ]
    return tabulate(safe, headers="keys")
