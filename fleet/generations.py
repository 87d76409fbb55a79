"""Which generations a host has, which of them matter, and which garbage collection may drop."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fleet.hostops import HostState


@dataclass(frozen=True)
class GenerationRow:
    number: int
    created: str
    path: str
    running: bool
    booted: bool
    current: bool


def rows(state: HostState) -> list[GenerationRow]:
    return [
        GenerationRow(
            number=g.number,
            created=datetime.fromtimestamp(g.created, UTC).isoformat(timespec="seconds"),
            path=g.path,
            running=g.path == state.running,
            booted=g.path == state.booted,
            current=g.number == state.current,
        )
        for g in state.generations
    ]


def protected(state: HostState) -> set[int]:
    """Generations gc must keep whatever --keep says: running, booted, current, and the
    rollback target (the newest one before the current)."""
    keep = {g.number for g in state.generations if g.path in (state.running, state.booted)}
    if state.current is not None:
        keep.add(state.current)
        earlier = [g.number for g in state.generations if g.number < state.current]
        if earlier:
            keep.add(max(earlier))
    return keep


def gc_victims(state: HostState, keep: int) -> list[int]:
    """Generation numbers to delete: all but the newest ``keep`` and the protected ones."""
    numbers = sorted(g.number for g in state.generations)
    kept = set(numbers[-keep:]) if keep > 0 else set()
    return [n for n in numbers if n not in kept | protected(state)]
