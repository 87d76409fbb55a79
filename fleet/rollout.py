"""The rollout: waves of hosts, each through the one-host protocol, and fleet-wide rollback.

One host (every failure after arming ends with the host re-activating its recorded
generation, by the tool at once or by the dead-man switch on its own):

  connect, copy, lock, record the running generation, arm the dead-man switch,
  switch-to-configuration test, health, confirm (disarm over a new connection),
  persist (profile + boot entry), release record, unlock.

The fleet: canary hosts first, then batches; a wave that takes failures past
--max-failures stops the rollout, and hosts this release already persisted go back to
their recorded generations too, unless --no-rollback.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet import health, nix
from fleet.errors import ExitCode, FleetError, NixError, SshError
from fleet.hostops import HostOps, HostState, LockHeld
from fleet.inventory import Host
from fleet.models import Generation, HostReport, HostResult, Phase, RolloutResult
from fleet.output import Reporter
from fleet.ssh import Endpoint, Remote, Transport

# switch-to-configuration exit codes, as NixOS defines them.
SWITCH_MESSAGES = {
    1: "switch-to-configuration failed (usage or boot loader)",
    2: "the activation script failed",
    3: "a unit failed to stop or restart",
    4: "a unit failed to start, or some unit is failed after the switch",
    100: "the switch needs a reboot to take effect",
}


@dataclass(frozen=True)
class DeployOptions:
    parallel: int
    canary: int
    batch_size: int | str
    max_failures: int
    health_timeout: float
    confirm_timeout: float
    rollback: bool = True
    dry_run: bool = False
    boot: bool = False
    break_lock: bool = False


@dataclass(frozen=True)
class Release:
    id: str
    action: str
    operator: str
    flake: str
    revision: str | None
    started: str

    @classmethod
    def new(cls, action: str, flake: str, revision: str | None) -> Release:
        now = datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        return cls(
            id=f"{stamp}-{secrets.token_hex(2)}",
            action=action,
            operator=f"{getpass.getuser()}@{socket.gethostname()}",
            flake=flake,
            revision=revision,
            started=now.isoformat(timespec="seconds"),
        )

    def lock_info(self) -> str:
        return json.dumps(
            {
                "release": self.id,
                "operator": self.operator,
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
                "action": self.action,
            },
            sort_keys=True,
        )


@dataclass
class Report:
    release: Release
    reports: list[HostReport]
    duration: float = 0.0
    stopped: str | None = None  # why the rollout stopped early, if it did
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> RolloutResult:
        touched = [r for r in self.reports if r.result is not HostResult.SKIPPED]
        if any(r.result.needs_attention for r in self.reports):
            return RolloutResult.ATTENTION
        if self.stopped is None and all(r.result is HostResult.DEPLOYED for r in touched):
            return RolloutResult.DEPLOYED
        return RolloutResult.ROLLED_BACK

    @property
    def exit_code(self) -> ExitCode:
        return {
            RolloutResult.DEPLOYED: ExitCode.OK,
            RolloutResult.ROLLED_BACK: ExitCode.ROLLED_BACK,
            RolloutResult.ATTENTION: ExitCode.ATTENTION,
        }[self.result]

    def as_json(self) -> dict[str, Any]:
        return {
            "release": self.release.id,
            "action": self.release.action,
            "operator": self.release.operator,
            "flake": self.release.flake,
            "revision": self.release.revision,
            "started": self.release.started,
            "durationSeconds": round(self.duration, 3),
            "result": self.result.value,
            "exitCode": int(self.exit_code),
            "stopped": self.stopped,
            "hosts": {r.name: r.as_json() for r in self.reports},
            **self.extra,
        }


def batch_count(total: int, batch_size: int | str) -> int:
    if isinstance(batch_size, str):
        return max(1, math.ceil(total * int(batch_size.rstrip("%")) / 100))
    return max(1, batch_size)


def plan_waves(names: Sequence[str], canary: int, batch_size: int | str) -> list[list[str]]:
    """Canary hosts alone first, then batches of the rest (a share counts the whole selection)."""
    names = list(names)
    waves = [names[:canary]] if canary > 0 and names else []
    rest = names[canary:] if canary > 0 else names
    size = batch_count(len(names), batch_size)
    waves += [rest[i : i + size] for i in range(0, len(rest), size)]
    return [w for w in waves if w]


class _Failed(Exception):
    """A protocol step failed; the host still runs (or will run) a known system."""

    def __init__(self, phase: Phase, message: str) -> None:
        super().__init__(message)
        self.phase = phase


def endpoint(host: Host, user: str | None = None) -> Endpoint:
    return Endpoint(host.name, host.address, host.ssh_port, user or host.ssh_user, host.host_key)


class Rollout:
    def __init__(
        self,
        hosts: Sequence[Host],
        options: DeployOptions,
        release: Release,
        transport: Transport,
        reporter: Reporter,
        ssh_user: str | None = None,
        generations: Mapping[str, int] | None = None,
    ) -> None:
        self.hosts = {h.name: h for h in hosts}
        # Rollback targets: existing generation numbers to switch the profile back to.
        self.generations = dict(generations or {})
        self.options = options
        self.release = release
        self.transport = transport
        self.reporter = reporter
        self.ssh_user = ssh_user

    def remote(self, name: str) -> Remote:
        return self.transport.remote(endpoint(self.hosts[name], self.ssh_user))

    # -- one host -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _phase(self, report: HostReport, phase: Phase) -> Iterator[None]:
        self.reporter.phase(report.name, phase)
        start = time.monotonic()
        try:
            yield
        finally:
            report.timings[phase.value] = report.timings.get(phase.value, 0.0) + (
                time.monotonic() - start
            )

    def deploy_host(self, name: str, path: str) -> HostReport:
        report = HostReport(name)
        ops = HostOps(self.remote(name))
        try:
            with self._phase(report, Phase.CONNECT):
                state = ops.state()
        except SshError as exc:
            report.fail(HostResult.UNREACHABLE, Phase.CONNECT, str(exc))
            return self._done(report)
        report.previous = state.running_generation()
        if state.running == path and state.current_path == path:
            report.result, report.new = HostResult.DEPLOYED, report.previous
            return self._done(report)
        report.changed = True
        try:
            with self._phase(report, Phase.COPY):
                nix.copy_closure(ops.remote, path)
        except (NixError, SshError) as exc:
            report.fail(HostResult.FAILED, Phase.COPY, f"nothing was activated: {exc}")
            return self._done(report)
        info = self.release.lock_info()
        try:
            with self._phase(report, Phase.LOCK):
                locked = ops.lock(info, force=self.options.break_lock)
        except (LockHeld, SshError, FleetError) as exc:
            result = HostResult.UNREACHABLE if isinstance(exc, SshError) else HostResult.FAILED
            report.fail(result, Phase.LOCK, str(exc))
            return self._done(report)
        try:
            self._locked_protocol(ops, report, path, locked)
        finally:
            self._finish_host(ops, report, info)
        return self._done(report)

    def _locked_protocol(
        self, ops: HostOps, report: HostReport, path: str, locked: HostState
    ) -> None:
        # The rollback target: what ran when the lock was taken (read in the same round trip).
        recorded = locked.running_generation()
        if recorded is None:
            report.fail(HostResult.FAILED, Phase.RECORD,
                        "the host runs no system (/run/current-system)")  # fmt: skip
            return
        report.previous = recorded
        if self.options.boot:
            self._persist(ops, report, path)
            return
        try:
            self._switch_and_prove(ops, report, recorded, path)
        except _Failed as failure:
            self._restore(ops, report, recorded, failure)
            return
        except FleetError as exc:  # lost connection, or a step that could not run
            self._restore(ops, report, recorded, _Failed(self._last_phase(report), str(exc)))
            return
        if not self._persist(ops, report, path):
            # The profile still names the recorded generation: run that again, so that the
            # running system is the profile's current one.
            self._restore(ops, report, recorded, _Failed(Phase.PERSIST, report.message or ""))

    def _last_phase(self, report: HostReport) -> Phase:
        return Phase(list(report.timings)[-1]) if report.timings else Phase.CONNECT

    def _switch_and_prove(
        self, ops: HostOps, report: HostReport, recorded: Generation, path: str
    ) -> None:
        with self._phase(report, Phase.ARM):
            ops.arm(recorded.path, self.options.confirm_timeout)
        with self._phase(report, Phase.ACTIVATE):
            code, output = ops.activate(path, "test")
        if code != 0:
            why = SWITCH_MESSAGES.get(code, f"switch-to-configuration exited {code}")
            raise _Failed(Phase.ACTIVATE, f"{why} (exit {code})" + _tail(output))
        with self._phase(report, Phase.HEALTH):
            verdict = health.check_host(
                ops, self.hosts[report.name].checks, self.options.health_timeout
            )
        if not verdict.ok:
            raise _Failed(Phase.HEALTH, verdict.message)
        with self._phase(report, Phase.CONFIRM):
            confirmed = ops.disarm(fresh=True)
        if not confirmed:
            raise _Failed(
                Phase.CONFIRM,
                "the dead-man switch fired before confirmation; "
                "the host re-activated its recorded generation",
            )

    def _restore(
        self, ops: HostOps, report: HostReport, recorded: Generation, failure: _Failed
    ) -> None:
        """Re-activate the recorded generation now, prove it healthy, then disarm."""
        report.fail(HostResult.FAILED, failure.phase, str(failure))
        try:
            with self._phase(report, Phase.ROLLBACK):
                code, output = ops.activate(recorded.path, "test")
                verdict = health.check_host(
                    ops, self.hosts[report.name].checks, self.options.health_timeout
                )
                ops.disarm()
        except FleetError as exc:
            lost = isinstance(exc, SshError)
            report.fail(
                HostResult.UNREACHABLE if lost else HostResult.FAILED,
                failure.phase,
                f"{failure}; then {'unreachable' if lost else 'the rollback failed'} ({exc}): "
                f"its dead-man switch re-activates the recorded generation within "
                f"{self.options.confirm_timeout:g} s",
            )
            return
        if code == 0 and verdict.ok:
            report.result = HostResult.ROLLED_BACK
            report.new = recorded
        else:
            report.message = (
                f"{failure}; the rollback did not come back healthy either: "
                f"{verdict.message if code == 0 else f'exit {code}'}{_tail(output)}"
            )

    def _persist(self, ops: HostOps, report: HostReport, path: str) -> bool:
        """Profile and boot entry; False when the profile was left as it was."""
        try:
            with self._phase(report, Phase.PERSIST):
                # A rollback goes back to its existing generation rather than adding one.
                number, code, output = ops.persist(path, self.generations.get(report.name))
        except FleetError as exc:
            report.fail(HostResult.FAILED, Phase.PERSIST, f"not made the profile's current "
                        f"generation: {exc}")  # fmt: skip
            return False
        report.new = Generation(number, path)
        if code != 0:
            # Running and current agree; only the boot loader lags: an operator must look.
            report.fail(HostResult.FAILED, Phase.PERSIST,
                        f"boot entry not installed (exit {code}){_tail(output)}")  # fmt: skip
            return True
        report.result = HostResult.DEPLOYED
        return True

    def _finish_host(self, ops: HostOps, report: HostReport, info: str) -> None:
        """Release record and unlock, best effort: the host may be gone."""
        with contextlib.suppress(SshError, FleetError):
            ops.finish(self.record(report), info)

    def record(self, report: HostReport) -> dict[str, Any]:
        return {
            "release": self.release.id,
            "action": self.release.action,
            "host": report.name,
            "operator": self.release.operator,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "flake": self.release.flake,
            "revision": self.release.revision,
            "previous": report.previous.as_json() if report.previous else None,
            "new": report.new.as_json() if report.new else None,
            "result": report.result.value,
            "phase": report.phase.value if report.phase else None,
            "message": report.message,
        }

    def _done(self, report: HostReport) -> HostReport:
        detail = report.result.value + (f" ({report.message})" if report.message else "")
        self.reporter.phase(report.name, Phase.DONE, detail[:160])
        return report

    # -- fleet-wide rollback of persisted hosts ------------------------------------------

    def revert_host(self, report: HostReport) -> None:
        """Put a host this release persisted back on its recorded generation, as a switch."""
        assert report.previous is not None
        ops = HostOps(self.remote(report.name))
        info = self.release.lock_info()
        target = report.previous
        try:
            with self._phase(report, Phase.ROLLBACK):
                ops.lock(info, force=self.options.break_lock)
        except (SshError, FleetError) as exc:
            result = HostResult.UNREACHABLE if isinstance(exc, SshError) else HostResult.FAILED
            report.fail(result, Phase.ROLLBACK, f"fleet rollback failed: {exc}")
            return
        try:
            with self._phase(report, Phase.ROLLBACK):
                _, code, output = ops.persist(target.path, target.number)
                if code == 0:
                    code, output = ops.activate(target.path, "test")
                verdict = health.check_host(
                    ops, self.hosts[report.name].checks, self.options.health_timeout
                )
            if code == 0 and verdict.ok:
                report.result, report.new = HostResult.ROLLED_BACK, target
                report.message = "rolled back with the rest of the release"
            else:
                report.fail(
                    HostResult.FAILED,
                    Phase.ROLLBACK,
                    f"fleet rollback unhealthy: "
                    f"{verdict.message if code == 0 else f'exit {code}'}{_tail(output)}",
                )
        except (SshError, FleetError) as exc:
            result = HostResult.UNREACHABLE if isinstance(exc, SshError) else HostResult.FAILED
            report.fail(result, Phase.ROLLBACK, f"fleet rollback failed: {exc}")
        finally:
            self._finish_host(ops, report, info)

    # -- the fleet ---------------------------------------------------------------------

    def _guarded(self, name: str, path: str) -> HostReport:
        """One host's protocol; an error nobody foresaw fails that host, not the rollout
        (an armed dead-man switch still reverts it)."""
        try:
            return self.deploy_host(name, path)
        except Exception as exc:
            report = HostReport(name, changed=True)
            report.fail(HostResult.FAILED, Phase.DONE, f"unexpected error: {exc!r}; if a "
                        "dead-man switch was armed it reverts the host by itself")  # fmt: skip
            return self._done(report)

    def run(self, paths: dict[str, str], order: Sequence[str]) -> Report:
        start = time.monotonic()
        reports = {n: HostReport(n) for n in order}
        report = Report(self.release, [reports[n] for n in order])
        waves = plan_waves(order, self.options.canary, self.options.batch_size)
        self.reporter.start(list(order))
        failures = 0
        with ThreadPoolExecutor(max_workers=max(1, self.options.parallel)) as pool:
            for number, wave in enumerate(waves, 1):
                done = list(pool.map(lambda n: self._guarded(n, paths[n]), wave))
                for r in done:
                    reports[r.name] = r
                failures += sum(r.result is not HostResult.DEPLOYED for r in done)
                if failures > self.options.max_failures:
                    report.stopped = (
                        f"wave {number} of {len(waves)} brought failures to "
                        f"{failures} (more than --max-failures "
                        f"{self.options.max_failures})"
                    )
                    break
            report.reports = [reports[n] for n in order]
            if report.stopped and self.options.rollback:
                persisted = [
                    r for r in report.reports if r.result is HostResult.DEPLOYED and r.changed
                ]
                list(pool.map(self.revert_host, persisted))
        self.reporter.finish()
        report.duration = time.monotonic() - start
        return report


def _tail(output: str, lines: int = 3) -> str:
    kept = [line for line in output.strip().splitlines() if line.strip()][-lines:]
    return (": " + " | ".join(kept)) if kept else ""


@dataclass(frozen=True)
class Plan:
    """What a dry run shows: per host, the running system and what the flake builds now."""

    host: str
    running: str | None
    desired: str
    reachable: bool
    message: str = ""

    @property
    def changed(self) -> bool:
        return self.running != self.desired


def dry_run(
    hosts: Sequence[Host], paths: dict[str, str], remote: Callable[[str], Remote], parallel: int
) -> list[Plan]:
    def one(host: Host) -> Plan:
        try:
            state: HostState = HostOps(remote(host.name)).state()
        except SshError as exc:
            return Plan(host.name, None, paths[host.name], False, str(exc))
        return Plan(host.name, state.running, paths[host.name], True)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, hosts))
