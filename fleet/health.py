"""Health of one host: systemd settled with no failed unit, then every declared check.

A system whose checks are all HTTP and TCP (to the host's own 127.0.0.1) is proven by the
host itself, in the step that needs it (``fleet-host health``, or the activation's own
answer): no ssh channel per check, no round trip of their own. Otherwise this side makes
them: HTTP checks reach 127.0.0.1:PORT on the host through the ssh master connection
(``ssh -W``), so they need no open port towards the operator and work through jump hosts;
TCP checks are made by the host itself (``fleet-host probe-tcp``), since an ``ssh -W``
channel that stays open does not prove a connection; a command runs as the ssh user.
Checks run concurrently; each retries until it passes, runs out of retries, or the
host's health deadline passes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fleet import interrupt
from fleet.errors import SshError, printable
from fleet.hostops import RUNNING_HELPER, Declared, HelperUsage, HostOps, declared, parse_json
from fleet.hostside.fleet_host import http_request, http_verdict
from fleet.inventory import Check, CheckType
from fleet.ssh import Remote


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    attempts: int
    message: str


@dataclass(frozen=True)
class Health:
    ok: bool
    failed_units: tuple[str, ...]
    checks: tuple[CheckResult, ...]

    @property
    def message(self) -> str:
        if self.failed_units:
            return f"failed units: {', '.join(self.failed_units)}"
        bad = [c for c in self.checks if not c.ok]
        return "; ".join(f"check {c.name}: {c.message}" for c in bad) or "healthy"


def _http(remote: Remote, check: Check) -> tuple[bool, str]:
    if check.port is None or check.path is None or check.expect_status is None:
        return False, "an HTTP check without its port, path or expected status"
    request = http_request(check.path, check.port)
    with remote.tunnel(check.port) as proc:
        try:
            out, err = proc.communicate(request, timeout=check.timeout)
        except subprocess.TimeoutExpired:
            return False, f"no answer within {check.timeout:g} s"
    if not out:
        lines = err.decode(errors="replace").strip().splitlines()
        return False, printable(lines[-1]) if lines else "connection closed without an answer"
    return http_verdict(out, check.expect_status, check.expect_body)


def _tcp(remote: Remote, check: Check) -> tuple[bool, str]:
    """The host itself connects (fleet-host probe-tcp): a channel that merely stays open
    proves nothing, however slow the link."""
    assert check.port is not None
    argv = [RUNNING_HELPER, "probe-tcp", "--port", str(check.port), "--timeout",
            f"{check.timeout:g}"]  # fmt: skip
    try:
        result = remote.run(argv, check=False, timeout=check.timeout + 15)
    except SshError as exc:
        return False, str(exc)
    lines = result.stdout.strip().splitlines()
    try:
        answer = parse_json(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if result.ok and isinstance(answer, dict) and answer.get("connected") is True:
        return True, "connected"
    if not isinstance(answer, dict):
        answer = {}
    return False, printable(str(answer.get("error") or result.last_error_line()))


# timeout(1)'s exit codes when it stopped the command.
_TIMED_OUT = (124, 137)


def _command(remote: Remote, check: Check) -> tuple[bool, str]:
    """The host stops a command that outlives its time-out (coreutils' timeout): one
    that hangs must not outlive the check on the host either."""
    argv = ["timeout", "--kill-after=2", f"{check.timeout:g}", *check.command]
    try:
        result = remote.run(argv, check=False, timeout=check.timeout + 15)
    except SshError as exc:
        return False, str(exc)
    if result.ok:
        return True, "exit 0"
    if result.returncode in _TIMED_OUT:
        return False, f"no exit within {check.timeout:g} s"
    return False, f"exit {result.returncode}: {result.last_error_line()}"


PROBES = {CheckType.HTTP: _http, CheckType.TCP: _tcp, CheckType.COMMAND: _command}


def run_check(remote: Remote, check: Check, deadline: float) -> CheckResult:
    message = "not attempted"
    for attempt in range(1, check.retries + 1):
        ok, message = PROBES[check.type](remote, check)
        if ok:
            return CheckResult(check.name, True, attempt, message)
        if attempt == check.retries or time.monotonic() + check.interval > deadline:
            return CheckResult(check.name, False, attempt, message)
        interrupt.sleep(check.interval)
    return CheckResult(check.name, False, check.retries, message)


def run_checks(remote: Remote, checks: Sequence[Check], deadline: float) -> Health:
    """Every declared check at once, without looking at systemd first."""
    if not checks:
        return Health(True, (), ())
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        one = interrupt.carried(lambda c: run_check(remote, c, deadline))
        results = tuple(pool.map(one, checks))
    return Health(all(r.ok for r in results), (), results)


def prove(remote: Remote, declared: Declared, deadline: float) -> Health:
    """A generation's own checks (its manifest); unreadable ones fail, never vanish."""
    if declared.problem is not None:
        return Health(False, (), (CheckResult("manifest", False, 0, declared.problem),))
    return run_checks(remote, declared.checks, deadline)


def from_host(answer: object, checks: Declared) -> Health | None:
    """The host's own run of ``checks`` (fleet-host's ``health`` answer), or None when it
    is not a run of exactly those checks: then this side makes them."""
    if not isinstance(answer, Mapping) or checks.problem is not None:
        return None
    raw = answer.get("checks")
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) for r in raw):
        return None
    if [r.get("name") for r in raw] != [c.name for c in checks.checks]:
        return None
    results = tuple(
        CheckResult(c.name, r.get("ok") is True, _attempts(r.get("attempts")),
                    printable(str(r.get("message", ""))))
        for c, r in zip(checks.checks, raw, strict=True)
    )  # fmt: skip
    return Health(all(r.ok for r in results), (), results)


def _attempts(value: object) -> int:
    """A count the host reports: a small whole number, else 0 (it may say anything)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1_000_000:
        return value
    return 0


def verdict(
    ops: HostOps, answer: Mapping[str, object], checks: Declared, deadline: float
) -> Health:
    """What the host said of a system it runs (settled, failed units, and its run of the
    checks when it made them), with the checks it left to this side made here."""
    failed = answer.get("failedUnits")
    if isinstance(failed, list) and failed:
        return Health(False, tuple(printable(str(u)) for u in failed), ())
    if not answer.get("settled"):
        return Health(False, ("(systemd jobs still running)",), ())
    # Its own checks, exactly the ones asked for, made by the host.
    if declared(answer.get("checks"), "the running system's manifest") == checks:
        made = from_host(answer.get("health"), checks)
        if made is not None:
            return made
    return prove(ops.remote, checks, deadline)


def check_host(ops: HostOps, checks: Sequence[Check] | Declared, timeout: float) -> Health:
    """Settle, then look for failed units, then run every check concurrently: one round
    trip when the host can make the checks itself."""
    deadline = time.monotonic() + timeout
    if not isinstance(checks, Declared):
        checks = Declared(tuple(checks), manifest=True)
    try:
        answer = ops.health(timeout)
    except HelperUsage:  # a running helper from before `health`
        settled, failed = ops.settle(timeout)
        answer = {"settled": settled, "failedUnits": list(failed)}
    return verdict(ops, answer, checks, deadline)
