"""The vocabulary of a rollout: phases, results, generations and per-host reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Hosts a command other than deploy and rollback works on at once (--parallel): bounded,
# so that a thousand hosts are never a thousand connections and threads at once.
READ_PARALLEL = 32


class Phase(StrEnum):
    """Steps of the one-host protocol, in order; a failure names the phase it happened in."""

    CONNECT = "connect"
    COPY = "copy"
    LOCK = "lock"  # begin: lock, record the running generation, arm the dead-man switch
    DRAIN = "drain"  # the host's instances out of rotation, their sessions ended
    ACTIVATE = "activate"
    REBOOT = "reboot"
    HEALTH = "health"
    CANARY = "canary"  # a canary's share of traffic, held while its checks keep passing
    CONFIRM = "confirm"  # commit, over a new connection: profile, boot entry, record, unlock
    PERSIST = "persist"
    ROLLBACK = "rollback"
    DONE = "done"


class HostResult(StrEnum):
    DEPLOYED = "deployed"  # running, healthy, persisted
    PENDING_REBOOT = "pending-reboot"  # persisted for the next boot (--boot); not activated
    ROLLED_BACK = "rolled-back"  # back on its recorded generation, verified healthy
    FAILED = "failed"  # not known to be on a good generation: needs an operator
    UNREACHABLE = "unreachable"  # could not be reached; a dead-man switch may still act
    SKIPPED = "skipped"  # never touched: the rollout stopped before its wave

    @property
    def needs_attention(self) -> bool:
        return self in (HostResult.FAILED, HostResult.UNREACHABLE)

    @property
    def succeeded(self) -> bool:
        return self in (HostResult.DEPLOYED, HostResult.PENDING_REBOOT)


class RolloutResult(StrEnum):
    DEPLOYED = "deployed"
    ROLLED_BACK = "rolled-back"
    ATTENTION = "attention"
    INTERRUPTED = "interrupted"  # Ctrl-C: hosts after it never started (exit 130)


@dataclass(frozen=True)
class Generation:
    number: int | None  # None: the running system is in no generation of the profile
    path: str

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "path": self.path}


@dataclass
class HostReport:
    """What happened on one host; mutable while the host's protocol runs."""

    name: str
    result: HostResult = HostResult.SKIPPED
    changed: bool = False
    previous: Generation | None = None
    new: Generation | None = None
    # The generation this run tried to put on the host (the release's system): after a
    # rollback ``new`` is the restored one, and this says what failed.
    attempted: Generation | None = None
    phase: Phase | None = None  # the failing phase, when one failed
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    record_error: str | None = None  # the host could not write its release record
    # The checks that proved (or failed) the generation the host ended on, from that
    # generation's own manifest; None when it has none (its units alone proved it).
    checks: list[str] | None = None
    # What the balancers did not do in time (a drain or a return to rotation), for the
    # operator; the result stands.
    traffic: str | None = None
    # A fleet-wide revert's own transaction on the host: its phases are "revert-PHASE".
    reverting: bool = False
    # How the closure came: {"source": "cache" | "operator", ...} (fleet/cache.py).
    copy: dict[str, Any] | None = None
    # The failing remote step as a command line an operator can paste (fleet/ssh.py
    # Remote.command_line); None when the host did not fail or no remote step failed.
    command: str | None = None
    # When the host's protocol started (seconds since the epoch), for the release record:
    # the report's timeline places each phase from it.
    started: float | None = None

    def fail(self, result: HostResult, phase: Phase, message: str) -> None:
        self.result, self.phase, self.message = result, phase, message

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result.value,
            "changed": self.changed,
            "previous": self.previous.as_json() if self.previous else None,
            "new": self.new.as_json() if self.new else None,
            "attempted": self.attempted.as_json() if self.attempted else None,
            "phase": self.phase.value if self.phase else None,
            "message": self.message,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "recordError": self.record_error,
            "checks": self.checks,
            "traffic": self.traffic,
            "copy": self.copy,
            "command": self.command,
        }
