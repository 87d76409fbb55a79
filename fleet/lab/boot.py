"""Booting many lab hosts on few cores: how many at once, how long to wait, and what to say
about each host that did not come up.

A host's boot is mostly CPU (systemd, journald, sshd, Nix's daemon, lab-web starting): two
hundred containers started in the same second on two cores all miss any deadline together.
So hosts are started a window at a time, and the deadline grows with their number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pace:
    """How hosts are started and how long they are waited for.

    At most ``window`` hosts boot at once: the next host starts when one of them has
    booted and answered ssh, or has had ``stall`` seconds (a host that hangs must not hold
    the others back). The deadline for the whole boot is ``base + per_host * hosts``.
    """

    window: int = 16
    stall: float = 20.0
    base: float = 60.0
    per_host: float = 1.5

    def deadline(self, hosts: int) -> float:
        return self.base + self.per_host * hosts


PACE = Pace()


@dataclass(frozen=True)
class HostFacts:
    """What is known of a host that did not come up, collected once its wait ended."""

    name: str
    waited: float  # seconds
    started: bool = True  # False: the deadline passed before the host's turn came
    ended: bool = False  # the container is gone
    exit_status: int | None = None  # nspawn's, when the container's supervisor saw it end
    console: tuple[str, ...] = ()  # the last lines of the container's console, this boot
    leader: bool = True  # the container's PID 1 exists
    link_up: bool = True
    system_state: str | None = None  # `systemctl is-system-running` inside; None: not asked
    failed_units: tuple[str, ...] = ()
    sshd: str | None = None  # `systemctl is-active ssh.service` inside
    port_open: bool = False
    key_mismatch: bool = False  # ssh answered with a key other than the pinned one
    ssh_error: str | None = None  # the last ssh attempt's error
    degraded: str | None = None  # booted, but units failed: which and why


def _console(facts: HostFacts) -> str:
    return f"; console: {' | '.join(facts.console)}" if facts.console else ""


def _failed(facts: HostFacts) -> str:
    return f"; failed units: {', '.join(facts.failed_units)}" if facts.failed_units else ""


def describe(facts: HostFacts) -> str:
    """One line: the first thing that went wrong for the host, as far as the facts tell."""
    name, waited = facts.name, f"{facts.waited:.0f} s"
    if not facts.started:
        return f"{name}: not started: the deadline passed ({waited}) before its turn came"
    if facts.ended:
        status = "" if facts.exit_status is None else f" with status {facts.exit_status}"
        return (
            f"{name} is down: its container ended{status} (`fleet lab up` boots it again)"
            + _console(facts)
        )
    if facts.key_mismatch:
        return f"{name}: ssh answered with a host key other than the one pinned for it"
    if facts.degraded is not None:
        return f"{name} booted degraded: {facts.degraded}"
    if not facts.leader:
        return f"{name}: systemd-nspawn had not started the container's systemd after {waited}"
    if not facts.link_up:
        return f"{name}: its link is cut (`fleet lab fault {name} heal` restores it)"
    if facts.system_state is None:
        return f"{name}: no answer from inside the container after {waited}" + _console(facts)
    if facts.system_state in ("initializing", "starting"):
        sshd = f"; sshd {facts.sshd}" if facts.sshd else ""
        return (
            f"{name}: systemd had not finished booting after {waited} "
            f"(state {facts.system_state}{sshd}){_failed(facts)}"
        )
    if facts.sshd != "active":
        return (
            f"{name}: sshd is {facts.sshd or 'unknown'} (systemd state {facts.system_state})"
            + _failed(facts)
        )
    if not facts.port_open:
        return f"{name}: sshd is active but port 22 does not answer"
    if facts.ssh_error:
        return f"{name}: port 22 answers but ssh fails: {facts.ssh_error}"
    return (
        f"{name}: answered ssh but had not finished booting after {waited} "
        f"(systemd state {facts.system_state} a moment later){_failed(facts)}"
    )


# The supervisor's last line for a container that ended (containers.SUPERVISE).
ENDED = re.compile(r"^fleet lab: the container ended with status (\d+)$")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def console_tail(log: Path, offset: int, lines: int = 3) -> tuple[tuple[str, ...], int | None]:
    """The last ``lines`` lines the container printed since ``offset`` (colours stripped),
    and nspawn's exit status if the supervisor wrote it."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return (), None
    kept = [_ESCAPES.sub("", line).strip() for line in text.splitlines()]
    kept = [line for line in kept if line]
    status = None
    if kept and (match := ENDED.match(kept[-1])):
        status = int(match.group(1))
        kept.pop()
    return tuple(kept[-lines:]), status
