"""Day-2 operations over the selected hosts: generations, health, diff, gc, exec.

Each reads or changes every host at once through ``Session.each``; a host that cannot be
reached is a result of its own, never a reason to stop the others.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from fleet import closure, generations, health, nix, testhook, traffic
from fleet.errors import FleetError, UsageError
from fleet.flows import Session
from fleet.hostops import RUNNING_HELPER, HostOps, new_token
from fleet.inventory import Host
from fleet.process import Result
from fleet.rollout import Release, endpoint

# Text an operator hands a host: a drain's reason is kept in every record and shown in
# `history`; a command goes to ssh as one argument, which the kernel caps at 128 KiB.
REASON_MAX = 500
COMMAND_MAX = 100_000


def list_generations(
    session: Session, selectors: Sequence[str]
) -> dict[str, list[generations.GenerationRow] | FleetError]:
    return session.each(selectors, lambda _h, ops: generations.rows(ops.state()))


def check_health(
    session: Session, selectors: Sequence[str], timeout: float | None = None
) -> dict[str, health.Health | FleetError]:
    """Every check the running system declares, with its retries, as after a deploy."""
    limit = float(
        timeout or session.config.get("healthTimeout") or session.inventory.deploy.health_timeout
    )
    return session.each(
        selectors, lambda _h, ops: health.check_host(ops, ops.state().declared, limit)
    )


def diff(
    session: Session, selectors: Sequence[str]
) -> dict[str, list[closure.Change] | FleetError]:
    """Packages that a deploy would add, remove or change, per host (builds, copies nothing)."""
    hosts = session.inventory.select(selectors)
    desired = nix.build_systems(session.flake, [h.name for h in hosts])

    def one(host: Host, ops: HostOps) -> list[closure.Change]:
        return closure.diff(ops.running_closure(), nix.closure(desired[host.name]))

    return session.each(selectors, one)


@dataclass(frozen=True)
class Collected:
    deleted: list[int]
    summary: str


def gc(
    session: Session, selectors: Sequence[str], keep: int, break_lock: bool = False
) -> dict[str, Collected | FleetError]:
    """Delete old generations and collect garbage, each host under its deploy lock.

    The running, booted, current and boot-default generations stay whatever ``keep``
    says (the host enforces it), and so does the rollback target (chosen here).
    """
    release = Release.new("gc", session.flake, None)

    def one(_host: Host, ops: HostOps) -> Collected:
        victims = generations.gc_victims(ops.state(), keep)
        testhook.pause("gc", ops.name)
        answer = ops.gc(new_token(), release.holder(), victims, take_over=break_lock)
        return Collected(list(answer.get("deleted", [])), str(answer.get("summary", "")))

    return session.each(selectors, one)


@dataclass(frozen=True)
class Drained:
    """What `fleet drain` or `undrain` did on one host, and what the balancers say."""

    before: bool  # it was in maintenance already
    balancers: str  # "drained", "serving", or what is still pending


def drain(
    session: Session, selectors: Sequence[str], on: bool, reason: str | None
) -> dict[str, Drained | FleetError]:
    """Take whole hosts out of rotation for maintenance (``on``), or put them back; then
    wait for the balancers to agree (their sessions ended, or serving again)."""
    if reason is not None and not (reason.isprintable() and 0 < len(reason) <= REASON_MAX):
        raise UsageError(f"--reason: one printable line of 1 to {REASON_MAX} characters")
    balanced = session.inventory.traffic
    release = Release.new("drain" if on else "undrain", session.flake, None)
    holder = release.holder() | ({"reason": reason} if reason else {})
    user = session.config.get("sshUser")

    def one(host: Host, ops: HostOps) -> Drained:
        answer = ops.call("maintenance", "on" if on else "off", "--holder",
                          json.dumps(holder, sort_keys=True))  # fmt: skip
        before = answer.get("before") is not None
        services = traffic.balanced(balanced, host.name)
        if balanced is None or not services:
            return Drained(before, "not balanced")
        remotes = lambda n: ops.remote.transport.remote(  # noqa: E731
            endpoint(session.inventory.hosts[n], user), pinned=True
        )
        wait = traffic.wait_drained if on else traffic.wait_serving
        waited = wait(balanced, remotes, host.name, services, balanced.drain_timeout)
        if waited.done:
            return Drained(before, "drained" if on else "serving")
        return Drained(before, f"after {balanced.drain_timeout:g} s: {waited.describe()}")

    return session.each(selectors, one)


def run_everywhere(
    session: Session, selectors: Sequence[str], argv: Sequence[str]
) -> dict[str, Result | FleetError]:
    """One command on every selected host, its argument list quoted, never pasted.

    It runs under the host's ``fleet-host run``, which ends it when our ssh session ends
    (Ctrl-C, a cut link); a host whose running system predates that runs it bare."""
    size = len(shlex.join(argv))
    if size > COMMAND_MAX:
        raise UsageError(f"exec: the command is {size} bytes quoted; at most {COMMAND_MAX}")

    def one(_host: Host, ops: HostOps) -> Result:
        result = ops.remote.run([RUNNING_HELPER, "run", "--", *argv], check=False, hold_stdin=True)
        if result.returncode in (2, 126, 127) and _no_run_command(result):
            return ops.remote.run(argv, check=False)
        return result

    return session.each(selectors, one)


def _no_run_command(result: Result) -> bool:
    """The host's fleet-host has no ``run`` (argparse's refusal), or there is none."""
    err = result.stderr
    return "invalid choice: 'run'" in err or (
        RUNNING_HELPER in err and ("No such file" in err or "not found" in err)
    )
