"""The fault matrix: every change the tool makes, stopped at every boundary between two of
its remote steps, with every kind of fault injected there; then the recovery the design
promises, and the invariant on every host.

A case pauses `fleet` with FLEET_TEST_PAUSE (fleet/testhook.py) at one boundary, injects
one fault, lets the promised recovery happen (the host's dead-man switch, its boot, or
the next command) and asserts: every host runs its profile's current generation, which its
boot entry names and which is healthy; no lock, switch or abandoned transaction; the
host's newest record of the release agrees with what it runs; and the report and exit
code of every `fleet` run involved claimed nothing untrue.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.hostops import HostOps
from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.fleetrun import (
    fleet_argv,
    host_states,
    run_fleet,
    set_release,
    wait_until_safe,
)

# Short clocks, so that a switch fires soon after a fault: 4 s to prove health, 4 s to
# confirm after that.
TIMEOUTS = ("--health-timeout", "4", "--confirm-timeout", "4")
RECOVERY = 60.0  # seconds the promised recovery may take, at most


class Fault(StrEnum):
    KILL = "kill"  # SIGKILL of the tool
    PARTITION = "partition"  # the host's link cut, healed after the confirm timeout
    CRASH = "crash"  # the host dies; `lab up` boots it again
    TAKEOVER = "takeover"  # a second operator deploys another release with --break-lock
    INTERRUPT = "ctrl-c"  # one SIGINT: the hosts in flight finish, no new one starts
    INTERRUPT_TWICE = "ctrl-c-twice"  # two: the hosts in flight are restored at once


@dataclass(frozen=True)
class Operation:
    """A change and the boundaries it crosses, in order."""

    name: str
    argv: tuple[str, ...]
    points: tuple[str, ...]
    host: str = "lab1"
    prepare: Callable[[Lab], None] | None = None
    occurrence: int = 1  # which time the host reaches the point (2: a revert's own steps)


_counter = itertools.count(1)


def _release(version: str, **kwargs: Any) -> Callable[[Lab], None]:
    """A release no host runs yet, so that every case changes something."""
    return lambda lab: set_release(lab, f"{version}-{next(_counter)}", **kwargs)


def _two_releases(lab: Lab) -> None:
    """Something to roll back from: deploy a new release, then let rollback go back."""
    set_release(lab, f"mxa-{next(_counter)}")
    code, _, err = run_fleet(lab, "deploy", "lab1")
    assert code == 0, err


# "drain" is crossed only where a balancer serves the host's instances (lab up --balancers).
SWITCH_POINTS = ("connect", "copy", "lock", "drain", "activate", "health", "confirm")
OPERATIONS = (
    Operation("deploy", ("deploy", "lab1", *TIMEOUTS), SWITCH_POINTS, prepare=_release("mx")),
    Operation("boot", ("deploy", "lab1", "--boot", *TIMEOUTS),
              ("connect", "copy", "lock", "confirm"), prepare=_release("mxb")),
    Operation("rollback", ("rollback", "lab1", "--yes", *TIMEOUTS), SWITCH_POINTS,
              prepare=_two_releases),
    # lab2 fails its health check after lab1 persisted: lab1 is reverted through a
    # transaction of its own, whose boundaries are the second time lab1 reaches each point.
    Operation("revert", ("deploy", "lab1", "lab2", "--canary", "0", "--batch-size", "1",
                         *TIMEOUTS), ("lock", "drain", "activate", "health", "confirm"),
              prepare=_release("mxr", broken="health", broken_hosts=("lab2",)), occurrence=2),
    Operation("reboot", ("deploy", "lab1", "--reboot", "--boot-timeout", "60", *TIMEOUTS),
              ("connect", "copy", "lock", "drain", "reboot", "health", "confirm"),
              prepare=_release("mxo")),
    Operation("gc", ("gc", "lab1", "--keep", "1"), ("gc",)),
    # A canary with a share of the traffic (behind a balancer only): its weighted hold.
    Operation("weighted", ("deploy", "lab1", "--canary", "1", "--canary-weight", "10",
                           "--canary-hold", "3", *TIMEOUTS),
              ("connect", "copy", "lock", "drain", "activate", "health", "canary", "confirm"),
              prepare=_release("mxw")),
)  # fmt: skip
# Boundaries crossed only behind a balancer.
TRAFFIC_POINTS = ("drain", "canary")


@dataclass(frozen=True)
class Case:
    operation: Operation
    point: str
    fault: Fault

    @property
    def id(self) -> str:
        return f"{self.operation.name}-{self.point}-{self.fault.value}"


def _points(op: Operation, balanced: bool) -> tuple[str, ...]:
    if not balanced and "canary" in op.points:
        return ()  # without a balancer it is a plain deploy, which is in the matrix already
    return tuple(p for p in op.points if balanced or p not in TRAFFIC_POINTS)


def all_cases(balanced: bool = True) -> list[Case]:
    """Every fault at every boundary; ``balanced``: the lab has a balancer in front of lab1
    and lab2, so that changes drain them."""
    return [Case(op, point, fault)
            for op in OPERATIONS for point in _points(op, balanced) for fault in Fault]  # fmt: skip


def ci_cases() -> list[Case]:
    """Every boundary of every operation once, the faults taking turns (a lab without a
    balancer: traffic_cases() has the drain boundary)."""
    faults = list(Fault)
    cases = []
    for op in OPERATIONS:
        for i, point in enumerate(_points(op, False)):
            cases.append(Case(op, point, faults[(i + len(cases)) % len(faults)]))
    return cases


def traffic_cases() -> list[Case]:
    """The drain and canary boundaries of every change that crosses them, the faults
    taking turns."""
    faults = list(Fault)
    points = [(op, p) for op in OPERATIONS for p in op.points if p in TRAFFIC_POINTS]
    return [Case(op, p, faults[i % len(faults)]) for i, (op, p) in enumerate(points)]


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"never saw {marker!r}: {lines[-5:]}"
        line = proc.stderr.readline()
        if not line:
            return lines
        lines.append(line)
        if marker in line:
            return lines


def _wait_stopped(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until the paused tool has really stopped itself: it names the boundary first, and a
    SIGCONT sent before its SIGSTOP lands would leave it stopped for good."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                    return
        except OSError:
            return  # gone already
        time.sleep(0.01)
    raise AssertionError(f"the tool never stopped at its boundary (pid {proc.pid})")


def _finish(proc: subprocess.Popen[str]) -> tuple[int, Any, str]:
    import json

    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    report = json.loads(out) if out.strip() else None
    return proc.returncode, report, err


# The tool's notice of the first Ctrl-C of a rollout (fleet/rollout.py INTERRUPT_NOTICES).
FIRST_NOTICE = "Ctrl-C: no new host starts"


def _interrupt(proc: subprocess.Popen[str], presses: int) -> tuple[int, Any]:
    """Ctrl-C as a terminal sends it, ``presses`` times (a second one only once the tool
    has taken the first: pending signals of one kind do not add up); its exit code and
    report. Outside a rollout (gc) the first one ends the command."""
    import json

    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    seen = _read_until(proc, FIRST_NOTICE)
    if presses > 1 and seen and FIRST_NOTICE in seen[-1]:
        os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    report = json.loads(out) if out.strip() else None
    # 0 or 3: the Ctrl-C came after the last host had started and cut nothing.
    allowed = {0, 3, 4, 130}
    if report is not None and "release" in report:
        results = {h["result"] for h in report["hosts"].values()}
        if results & {"failed", "unreachable"}:
            allowed = {4}
        if proc.returncode == 130:
            assert report["result"] == "interrupted" and report["stopped"], report
    assert proc.returncode in allowed, f"exit {proc.returncode}: {report}"
    return proc.returncode, report


def _assert_truthful(lab: Lab, code: int | None, report: Any, what: str) -> None:
    """Nothing a report claims is false once the hosts have settled."""
    if report is None or "release" not in report:
        return  # gc's report makes no claim about systems
    states = host_states(lab)
    results = {h["result"] for h in report["hosts"].values()}
    if results & {"failed", "unreachable"}:
        assert code == 4, f"{what}: exit {code} with {results}"
    for name, host in report["hosts"].items():
        state = states[name]
        if host["result"] in ("deployed", "rolled-back"):
            assert host["new"] and state.running == host["new"]["path"], (
                f"{what}: {name} reported {host['result']} on {host['new']}, runs {state.running}"
            )
        if host["result"] == "pending-reboot":
            assert state.current_path == host["new"]["path"], f"{what}: {name}: {host}"


def _assert_claims_recorded(lab: Lab, report: Any, what: str) -> None:
    """For a run whose change another operator may have replaced since: what it claims is
    what the host recorded for its release."""
    if report is None or "release" not in report:
        return  # gc's report makes no claim about systems
    with ops.transport(lab) as transport:
        remotes = {e.name: transport.remote(e) for e in ops.endpoints(lab)}
        for name, host in report["hosts"].items():
            if host["result"] not in ("deployed", "rolled-back", "pending-reboot"):
                continue
            if not host["changed"]:
                continue  # nothing to record: it already ran that system
            mine = [r for r in HostOps(remotes[name]).records()
                    if r.get("release") == report["release"]]  # fmt: skip
            assert mine, f"{what}: {name} claims {host['result']} with no record"
            assert mine[-1]["result"] == host["result"], f"{what}: {name}: {mine[-1]}"
            assert (mine[-1].get("new") or {}).get("path") == host["new"]["path"], what


def _assert_records_agree(lab: Lab, what: str) -> None:
    """Every host's newest release record tells what it runs."""
    for name, state in host_states(lab).items():
        last = state.last_release or {}
        if last.get("result") in ("deployed", "rolled-back"):
            new = last.get("new") or {}
            assert new.get("path") == state.running, f"{what}: {name}: newest record {last}"


def run_case(lab: Lab, case: Case) -> float:
    """Run one case; the seconds from the fault to the invariant holding on every host."""
    op = case.operation
    if op.prepare is not None:
        op.prepare(lab)
    spec = f"{case.point}@{op.host}#{op.occurrence}"
    env = dict(os.environ, FLEET_TEST_PAUSE=spec)
    proc = subprocess.Popen(
        fleet_argv(lab, *op.argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    seen = _read_until(proc, "fleet-test-paused")
    if not seen or "fleet-test-paused" not in seen[-1]:
        _finish(proc)
        raise AssertionError(f"{case.id}: never reached the boundary: {seen[-3:]}")
    _wait_stopped(proc)
    runs: list[tuple[int | None, Any]] = []
    faulted = time.monotonic()
    if case.fault is Fault.KILL:
        proc.kill()
        proc.communicate()
    elif case.fault is Fault.PARTITION:
        ops.fault(lab, op.host, ops.Fault.PARTITION)
        try:
            code, report, _ = _finish(proc)
            runs.append((code, report))
            time.sleep(10)  # past the host's confirm deadline, still cut off
        finally:
            ops.fault(lab, op.host, ops.Fault.HEAL)
    elif case.fault is Fault.CRASH:
        ops.fault(lab, op.host, ops.Fault.CRASH)
        try:
            code, report, _ = _finish(proc)
            runs.append((code, report))
        finally:
            ops.up(lab, None, lambda _m: None)
    elif case.fault in (Fault.INTERRUPT, Fault.INTERRUPT_TWICE):
        runs.append(_interrupt(proc, 2 if case.fault is Fault.INTERRUPT_TWICE else 1))
    elif case.fault is Fault.TAKEOVER:
        set_release(lab, f"mxt-{next(_counter)}")
        second = run_fleet(lab, "deploy", op.host, "--break-lock", *TIMEOUTS)
        # Its claims hold when it ends; the first run, continued, may change the host again.
        _assert_truthful(lab, second[0], second[1], f"{case.id} (second operator)")
        code, report, _ = _finish(proc)
        _assert_claims_recorded(lab, report, f"{case.id} (first operator)")
        if report is not None and any(
            h.get("result") in ("failed", "unreachable") for h in report["hosts"].values()
        ):
            assert code == 4, f"{case.id}: first operator exit {code}"
    wait_until_safe(lab, RECOVERY)
    recovered = time.monotonic() - faulted
    for code, report in runs:
        _assert_truthful(lab, code, report, case.id)
    _assert_records_agree(lab, case.id)
    reboot_pending(lab)
    return recovered


def reboot_pending(lab: Lab) -> None:
    """Hosts a --boot deploy left for their next boot get it, so the next case starts
    from running = current; then the invariant holds without exception."""
    pending = [n for n, s in host_states(lab).items() if s.pending_reboot]
    if not pending:
        return
    before = ops.boot_ids(lab)
    for name in pending:
        ops.fault(lab, name, ops.Fault.REBOOT)
    ops.wait_booted(lab, pending, after=before)
    wait_until_safe(lab, RECOVERY)
    assert not any(s.pending_reboot for s in host_states(lab).values())
