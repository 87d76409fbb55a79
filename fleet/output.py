"""Progress while a rollout runs, and the final table or JSON report."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from fleet.models import Generation, HostReport, Phase


class Reporter:
    """Plain lines prefixed by host: for logs, CI and pipes (and --json, on stderr)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.start_time = time.monotonic()
        self.lock = threading.Lock()

    def start(self, hosts: list[str]) -> None:
        pass

    def phase(self, host: str, phase: Phase, detail: str = "") -> None:
        with self.lock:
            elapsed = time.monotonic() - self.start_time
            suffix = f": {detail}" if detail else ""
            self.stream.write(f"{host}: {phase.value}{suffix} [{elapsed:.1f}s]\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        with self.lock:
            self.stream.write(message + "\n")
            self.stream.flush()

    def finish(self) -> None:
        pass


class LiveReporter(Reporter):
    """One line per host, redrawn in place on a terminal: phase and time in it."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__(stream)
        self.rows: dict[str, tuple[Phase | None, str, float]] = {}
        self.drawn = 0
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def start(self, hosts: list[str]) -> None:
        now = time.monotonic()
        self.rows = {h: (None, "waiting", now) for h in hosts}
        self.ticker.start()

    def phase(self, host: str, phase: Phase, detail: str = "") -> None:
        with self.lock:
            self.rows[host] = (phase, detail, time.monotonic())
            self._draw()

    def note(self, message: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(message + "\n")
            self._draw()

    def _tick(self) -> None:
        while not self.stop.wait(0.5):
            with self.lock:
                self._draw()

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        self._clear()
        now = time.monotonic()
        width = max((len(h) for h in self.rows), default=0)
        for host, (phase, detail, since) in self.rows.items():
            label = phase.value if phase else detail
            extra = f"  {detail}" if phase and detail else ""
            self.stream.write(f"  {host:<{width}}  {label:<9} {now - since:5.1f}s{extra}\n")
        self.drawn = len(self.rows)
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


def host_table(reports: list[HostReport]) -> str:
    rows: list[dict[str, Any]] = []
    for r in reports:
        rows.append({
            "host": r.name,
            "result": r.result.value + ("" if r.changed or r.result.value != "deployed"
                                        else " (unchanged)"),
            "previous": generation_cell(r.previous),
            "new": generation_cell(r.new),
            "failed in": r.phase.value if r.phase else "",
            "message": (r.message or "")[:100],
            "time": f"{sum(r.timings.values()):.1f}s",
        })  # fmt: skip
    return table(rows)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned table, headed by their keys. tabulate is imported only when a
    table is printed: --json and every error never need it."""
    from tabulate import tabulate

    return tabulate(rows, headers="keys")
