"""The rollout: waves of hosts, each through one host-owned transaction, and fleet-wide
rollback.

One host (docs/transaction.md): connect (the master connection), copy the closure, begin
(lock, record the running generation, arm the dead-man switch), activate and settle,
health, commit over a new connection (profile, boot entry, commit point, record, unlock:
one step on the host). Begin, activation and the checks are one step on the host when
nothing happens between them (no drain) and the host can make the checks (HTTP, TCP); a
host that already runs the target is proven by begin's own answer. Every failure after
begin ends with the host's own undo, run by the tool at once or by the host's switch when
the tool cannot.

The fleet: canary hosts first, then batches; a wave that takes failures past
--max-failures stops the rollout, and hosts this release already persisted go back to
their recorded generations too (each through a transaction of its own), unless
--no-rollback. After the canary wave, the declared analyses ask Prometheus about the
canaries (fleet/analysis.py): a failed one rolls the release back as a failed canary does;
an inconclusive one stops the rollout with the canaries kept.
"""

from __future__ import annotations

import contextlib
import getpass
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet import analysis, health, interrupt, testhook, traffic
from fleet.cache import Published, fetch_or_copy
from fleet.errors import (
    ExitCode,
    FleetError,
    Interrupted,
    NixError,
    SshError,
    UsageError,
    printable,
)
from fleet.events import Events
from fleet.hostops import (
    RUNNING_HELPER,
    Activation,
    Declared,
    Expired,
    Fenced,
    HelperError,
    HostOps,
    HostState,
    LockHeld,
    Malformed,
    clock,
    declared,
    generation,
    helper_of,
    is_real,
    new_token,
    shape,
)
from fleet.inventory import Host, Monitoring, Traffic
from fleet.models import Generation, HostReport, HostResult, Phase, RolloutResult
from fleet.output import Reporter
from fleet.ssh import Endpoint, Remote, Transport
from fleet.waves import Order, Wave, within_limits
from fleet.waves import plan as plan_waves

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
    reboot: bool = False
    boot_timeout: float = 300.0  # --reboot: how long a host may take to come back
    break_lock: bool = False
    canary_tag: str | None = None  # hosts with this tag are the canaries, when any is
    order: Order = Order.DEPENDENCIES
    drain: bool = True  # take balanced instances out of rotation before activating
    # Canary by traffic: the canaries' new systems get this share (%) of each balanced
    # service's traffic, held for canary_hold seconds while their checks keep passing.
    canary_weight: int | None = None
    canary_hold: float = 30.0
    skip_analysis: bool = False  # an emergency: no canary analysis
    use_cache: bool = True  # publish to the fleet's binary cache and fetch from it
    # --substitute-on-destination: a host fetches what it can from its own substituters
    # before the rest is copied from the operator's machine.
    substitute: bool = False
    build_host: str | None = None  # --build-host: where the systems are built (flows.build)

    @property
    def mode(self) -> str:
        return "reboot" if self.reboot else "boot" if self.boot else "switch"


MIN_CONFIRM = 2.0  # the commit's own round trip, over a new connection, must fit


def check_timeouts(options: DeployOptions, hosts: Sequence[Host]) -> None:
    """Timeouts that cannot add up are bad input (exit 2), before any host is touched.

    The health timeout runs from the start of activation and bounds every check; the
    dead-man switch fires at activation start + health timeout + confirm timeout.
    """
    if options.confirm_timeout < MIN_CONFIRM:
        raise UsageError(
            f"confirm timeout {options.confirm_timeout:g} s: at least {MIN_CONFIRM:g} s, "
            "or no commit could reach the host before its dead-man switch fires"
        )
    for host in hosts:
        for check in host.checks:
            if check.timeout >= options.health_timeout:
                raise UsageError(
                    f"host {host.name}: check {check.name!r} waits up to {check.timeout:g} s "
                    f"for one answer, not less than the health timeout "
                    f"{options.health_timeout:g} s: it could never pass in time; raise "
                    "healthTimeout (or --health-timeout) or lower the check's timeout"
                )


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

    def holder(self) -> dict[str, Any]:
        """Who holds a host's lock, as other operators will read it."""
        return {
            "release": self.id,
            "operator": self.operator,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "action": self.action,
        }

    def base(self, host: str) -> dict[str, Any]:
        """The fields every release record of this release has on ``host``."""
        return {
            "release": self.id,
            "action": self.action,
            "host": host,
            "operator": self.operator,
            "flake": self.flake,
            "revision": self.revision,
        }


@dataclass
class Report:
    release: Release
    reports: list[HostReport]
    duration: float = 0.0
    stopped: str | None = None  # why the rollout stopped early, if it did
    interrupted: bool = False  # by Ctrl-C (stopped says where)
    extra: dict[str, Any] = field(default_factory=dict)
    analysis: list[analysis.Run] = field(default_factory=list)  # none ran: empty

    @property
    def held(self) -> bool:
        """An inconclusive analysis stopped the rollout with the canaries on the release."""
        return (
            bool(self.analysis) and analysis.verdict(self.analysis) is analysis.Outcome.INCONCLUSIVE
        )

    @property
    def result(self) -> RolloutResult:
        touched = [r for r in self.reports if r.result is not HostResult.SKIPPED]
        if any(r.result.needs_attention or r.record_error for r in self.reports) or self.held:
            return RolloutResult.ATTENTION
        if self.interrupted:
            return RolloutResult.INTERRUPTED
        if self.stopped is None and all(r.result.succeeded for r in touched):
            return RolloutResult.DEPLOYED
        return RolloutResult.ROLLED_BACK

    @property
    def exit_code(self) -> ExitCode:
        return {
            RolloutResult.DEPLOYED: ExitCode.OK,
            RolloutResult.ROLLED_BACK: ExitCode.ROLLED_BACK,
            RolloutResult.ATTENTION: ExitCode.ATTENTION,
            RolloutResult.INTERRUPTED: ExitCode.INTERRUPTED,
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
            "analysis": [run.as_json() for run in self.analysis],
            **self.extra,
        }


class _Failed(Exception):
    """A protocol step failed; the host's transaction is still ours to undo. ``command``:
    the remote step, as a line the operator can paste."""

    def __init__(self, phase: Phase, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.phase = phase
        self.command = command


def endpoint(host: Host, user: str | None = None) -> Endpoint:
    return Endpoint(host.name, host.address, host.ssh_port, user or host.ssh_user, host.host_key)


@dataclass
class _Txn:
    """This side's view of one host's transaction: enough to drive it and to tell the
    truth about it when the host cannot be asked."""

    token: str
    helper: str
    target: Generation
    recorded: Generation | None = None
    deadline: float | None = None  # the host's own undo deadline, as it last told us
    activated: float = 0.0  # this side's clock (monotonic) when it asked for activation
    record: dict[str, Any] = field(default_factory=dict)  # what the release record says


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
        secrets: Mapping[str, Sequence[dict[str, str]]] | None = None,
        depends_on: Mapping[str, Sequence[str]] | None = None,
        traffic: Traffic | None = None,
        balancers: Sequence[Host] = (),
        events: Events | None = None,
        analyses: Sequence[analysis.Analysis] = (),
        monitoring: Monitoring | None = None,
        monitors: Sequence[Host] = (),
        published: Published | None = None,
    ) -> None:
        self.hosts = {h.name: h for h in hosts}
        # What this deploy put in the fleet's binary cache, for the hosts to fetch.
        self.published = published
        # The balancers in front of the hosts' instances, read (never changed) to see a
        # drain take effect and the instances come back.
        self.traffic = traffic
        self.balancers = {h.name: h for h in balancers}
        self.canaries: set[str] = set()  # this rollout's canary hosts, once planned
        # Measured after the canary wave through the first monitoring host that answers.
        self.analyses = list(analyses)
        self.monitoring = monitoring
        self.monitors = {h.name: h for h in monitors}
        self.revert_message = "rolled back with the rest of the release"
        # Rollback targets: existing generation numbers to switch the profile back to.
        self.generations = dict(generations or {})
        # A deploy: all that each host gets delivered at begin (fleet/secrets.py), [] for
        # none; None (a rollback, which does not read the declaration): nothing changes.
        self.secrets = dict(secrets) if secrets is not None else None
        self.depends_on = dict(depends_on or {})  # service -> the services it needs
        self.options = options
        self.release = release
        self.transport = transport
        self.reporter = reporter
        self.ssh_user = ssh_user
        self.events = events if events is not None else Events(release)  # none: no sinks
        self.wave_of: dict[str, int] = {}  # host -> its wave (1 first), once run() plans them

    def remote(self, name: str) -> Remote:
        return self.transport.remote(endpoint(self.hosts[name], self.ssh_user))

    def balancer(self, name: str) -> Remote:
        return self.transport.remote(endpoint(self.balancers[name], self.ssh_user), pinned=True)

    # -- one host -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _phase(self, report: HostReport, phase: Phase, pause: bool = True) -> Iterator[None]:
        """One step, timed and told; then its boundary (fleet/testhook.py), unless the
        caller passes the boundaries of the steps the call made (``_split``)."""
        self.reporter.phase(report.name, phase, "revert" if report.reverting else "")
        label = f"revert-{phase.value}" if report.reverting else phase.value
        self.events.phase_start(report, label)
        start = time.monotonic()
        error: str | None = None
        try:
            yield
        except BaseException as exc:
            error = printable(str(exc) or type(exc).__name__)
            report.command = getattr(exc, "command", None) or report.command
            raise
        finally:
            seconds = time.monotonic() - start
            report.timings[phase.value] = report.timings.get(phase.value, 0.0) + seconds
            self.events.phase_end(report, phase, label, seconds, error)
        if pause:
            testhook.pause(phase.value, report.name)

    def deploy_host(self, name: str, path: str) -> HostReport:
        report = HostReport(name, started=time.time())
        ops = HostOps(self.remote(name))
        target = Generation(self.generations.get(name), path)
        try:
            with self._phase(report, Phase.CONNECT):
                ops.remote.connect()  # the master connection, nothing run yet
        except Interrupted as exc:
            report.fail(HostResult.SKIPPED, Phase.CONNECT, f"{exc}: nothing was changed")
            return self._done(report)
        except SshError as exc:
            report.fail(HostResult.UNREACHABLE, Phase.CONNECT, str(exc))
            return self._done(report)
        # Nothing is read first: the copy finds what the host lacks, and begin finds a host
        # that already runs and names the target (it then proves it and changes nothing).
        report.changed = True
        report.attempted = target
        try:
            with self._phase(report, Phase.COPY):
                report.copy = fetch_or_copy(
                    ops, self.published, path, substitute=self.options.substitute
                )
            failed = report.copy.get("cacheError")
            if failed and self.published is not None and self.published.error is None:
                self.reporter.note(f"{name}: the binary cache failed ({failed}); copied directly")
        except Interrupted as exc:
            report.fail(HostResult.SKIPPED, Phase.COPY, f"{exc}: nothing was changed")
            return self._done(report)
        except (NixError, SshError) as exc:
            report.fail(HostResult.FAILED, Phase.COPY, f"nothing was changed: {exc}")
            return self._done(report)
        # A deploy gives all the host is declared to get, [] included: begin removes what
        # the host holds beyond it.
        delivered = None if self.secrets is None else self.secrets.get(name, [])
        self._transaction(ops, report, target, secrets=delivered)
        return self._done(report)

    def _unchanged(
        self,
        ops: HostOps,
        report: HostReport,
        checks: Declared | None,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        """Nothing to change; the host still has to prove itself healthy, by the checks of
        the system it runs (``checks``; None: ask the host for them). ``answer``: what the
        host already said of its health (settled, failed units, its run of the checks)."""
        report.changed = False
        report.new = report.previous
        report.copy = None  # it needed none (the copy found it there)
        with self._phase(report, Phase.HEALTH):
            if checks is None:
                checks = ops.state().declared
            report.checks = checks.names()
            if answer is not None and "settled" in answer:
                deadline = time.monotonic() + self.options.health_timeout
                verdict = health.verdict(ops, answer, checks, deadline)
            else:
                verdict = health.check_host(ops, checks, self.options.health_timeout)
        if verdict.ok:
            report.result = HostResult.DEPLOYED
        else:
            report.fail(
                HostResult.FAILED,
                Phase.HEALTH,
                f"already runs this system, but it is unhealthy: {verdict.message}",
            )

    def _transaction(
        self,
        ops: HostOps,
        report: HostReport,
        target: Generation,
        record: dict[str, Any] | None = None,
        secrets: Sequence[dict[str, str]] | None = None,
    ) -> None:
        """One transaction on the host: begin, then the mode's steps, then commit; any
        failure after begin (foreseen or not) is undone by the host. ``record``: fields of
        the release record the commit writes, where they differ from a deploy's;
        ``secrets``: what begin delivers (``HostOps.begin``).

        A switch that drains nothing has nothing to do between begin and activation: the
        host takes the lock, activates and makes the new system's checks in one call."""
        txn = _Txn(new_token(), helper_of(target.path), target, record=record or {})
        mode = self.options.mode
        drain = self._drained(report.name)
        merged = mode == "switch" and not drain
        # The host undoes a transaction not activated by begin's deadline: the drain
        # comes first, so it gets the drain timeout on top.
        deadline = self.options.confirm_timeout + (
            self.traffic.drain_timeout if self.traffic and drain else 0
        )
        after = self.options.health_timeout + self.options.confirm_timeout
        # Until the host answers, the latest it may act by itself.
        txn.deadline = time.time() + (max(deadline, after) if merged else deadline)
        txn.activated = time.monotonic()
        try:
            # Never cut, even when it also activates and proves: a begin cut on its way
            # may still start on the host after an undo found nothing to end, and leave a
            # transaction for its switch alone. Whole, a Ctrl-C finds one to undo, by
            # token, once it answers (within the health timeout); any later step is
            # fenced by the token instead, so those may be cut.
            phase = Phase.ACTIVATE if merged else Phase.LOCK
            with self._phase(report, phase, pause=not merged), interrupt.protected():
                answer = ops.begin(
                    txn.token,
                    self.release.holder(),
                    self.release.base(report.name) | self._placed(report),
                    mode,
                    target,
                    deadline,
                    self._after_boot(),
                    take_over=self.options.break_lock,
                    secrets=secrets,
                    drain=drain,
                    health=self.options.health_timeout if mode == "switch" else None,
                    activate=self.options.confirm_timeout if merged else None,
                )
        except LockHeld as exc:
            report.fail(HostResult.FAILED, Phase.LOCK, str(exc))
            return
        except Malformed as exc:  # it may have begun (and activated): ours to undo
            self._undo(ops, report, txn, phase, str(exc))
            return
        except SshError as exc:
            if merged:  # it may have begun and activated: ours to undo, or the host's
                self._undo(ops, report, txn, Phase.ACTIVATE, str(exc))
                return
            report.fail(
                HostResult.UNREACHABLE,
                Phase.LOCK,
                f"{exc}; if the lock was taken, the host releases it by itself "
                f"within {deadline:g} s",
            )
            return
        except HelperError as exc:
            if not exc.data.get("begun"):
                report.fail(HostResult.FAILED, Phase.LOCK, f"nothing was changed: {exc}")
                return
            # Begun, then its activation failed on the host.
            self._begun(report, txn, exc.data)
            report.command = self._activation_line(ops, txn)
            if isinstance(exc, Expired):
                self._expired(ops, report, txn, exc)
            elif isinstance(exc, Fenced):
                self._resolved_by_host(ops, report, txn, str(exc))
            else:
                self._undo(ops, report, txn, Phase.ACTIVATE, str(exc))
            return
        except FleetError as exc:
            report.fail(HostResult.FAILED, Phase.LOCK, f"nothing was changed: {exc}")
            return
        except Exception as exc:  # the host may have begun: an undo with our token ends it
            self._undo(ops, report, txn, Phase.LOCK, f"unexpected error: {exc!r}")
            return
        if answer.get("noop"):
            if merged:  # no activation: the call was begin's alone
                self._split(report, Phase.ACTIVATE, {Phase.LOCK: None})
            self._noop(ops, report, answer)
            return
        try:
            # Begun: an answer of another shape from here on is undone like any failure.
            with shape(ops.name, "begin"):
                txn.helper = self._helper(answer, txn)
                self._begun(report, txn, answer, required=True)
                txn.deadline = time.time() + deadline
                activation = None
                if isinstance(answer.get("activation"), dict):
                    activation = Activation.parse(
                        answer["activation"], self._activation_line(ops, txn)
                    )
                    txn.deadline = activation.deadline
            if activation is not None:
                self._split(report, Phase.ACTIVATE, self._host_times(answer, activation))
            elif merged:  # a helper from before --activate: the steps one by one
                self._split(report, Phase.ACTIVATE, {Phase.LOCK: None})
            interrupt.check()
            if drain:
                self._drain(report, drain)
            if mode == "boot":
                self._commit(ops, report, txn)
            elif mode == "reboot":
                self._reboot(ops, report, txn)
            else:
                self._switch(ops, report, txn, activation)
        except _Failed as failure:
            report.command = failure.command or report.command
            self._undo(ops, report, txn, failure.phase, str(failure))
        except Expired as exc:
            self._expired(ops, report, txn, exc)
        except Fenced as exc:
            self._resolved_by_host(ops, report, txn, str(exc))
        except Interrupted:
            phase = Phase(list(report.timings)[-1]) if report.timings else Phase.LOCK
            self._undo(ops, report, txn, phase, f"interrupted (Ctrl-C twice) in {phase.value}")
        except Exception as exc:  # lost link, or anything unforeseen: the host undoes
            phase = Phase(list(report.timings)[-1]) if report.timings else Phase.LOCK
            why = str(exc) if isinstance(exc, FleetError) else f"unexpected error: {exc!r}"
            self._undo(ops, report, txn, phase, why)

    def _activation_line(self, ops: HostOps, txn: _Txn) -> str:
        """The activation that begin made in its own call, as the step to run again: never
        begin itself, which would start a transaction outside the tool. Once the
        transaction is over, the host refuses it (no longer this transaction's)."""
        health, confirm = self.options.health_timeout, self.options.confirm_timeout
        args = ["--token", txn.token, "--health", f"{health:g}", "--confirm", f"{confirm:g}"]
        return ops.command_line("activate", *args, helper=txn.helper)

    @staticmethod
    def _helper(answer: Mapping[str, Any], txn: _Txn) -> str:
        """The helper that drives the transaction, as begin named it: the target's, or the
        running system's (a target from before fleet-host); never another program."""
        named = answer.get("helper", txn.helper)
        if named not in (txn.helper, RUNNING_HELPER):
            raise ValueError(f"helper {printable(str(named), 80)!r} is not a fleet-host")
        return str(named)

    def _begun(
        self, report: HostReport, txn: _Txn, answer: Mapping[str, Any], required: bool = False
    ) -> None:
        """What the host recorded as the generation to go back to (``required``: a begin
        that says it began names one; a revert puts the host back on it)."""
        recorded = generation(answer.get("recorded"))
        if recorded is not None:
            txn.recorded = report.previous = recorded
        elif required:
            raise ValueError("it names no recorded generation (a store path)")

    def _noop(self, ops: HostOps, report: HostReport, answer: Mapping[str, Any]) -> None:
        """The host already runs and names the target: proven by its checks, unchanged."""
        running = answer.get("running")
        checks = None
        if "checks" in answer:
            checks = declared(answer["checks"], "the running system's manifest")
        if isinstance(running, dict):
            report.previous = generation(running)
        else:  # a helper from before it named the running system: one more round trip
            state = ops.state()
            report.previous = state.running_generation()
            checks = checks or state.declared
        self._unchanged(ops, report, checks, answer)

    @staticmethod
    def _host_times(
        answer: Mapping[str, Any] | None, activation: Activation
    ) -> dict[Phase, float | None]:
        """The parts of one call the host timed: its lock (when begin was in the call), its
        switch and settling, its checks."""
        parts: dict[Phase, float | None] = {}
        if answer is not None:  # the rest of the call, the round trip's too, is the lock's
            parts[Phase.LOCK] = None
            if activation.seconds is not None:
                parts[Phase.ACTIVATE] = activation.seconds
        else:  # or the activation's
            parts[Phase.ACTIVATE] = None
        made = activation.health
        seconds = made.get("seconds") if made is not None else None
        if is_real(seconds) and seconds >= 0:
            parts[Phase.HEALTH] = float(seconds)
        return parts

    def _split(self, report: HostReport, whole: Phase, parts: Mapping[Phase, float | None]) -> None:
        """One call that did several steps on the host, timed as ``whole``: its timings
        split into those steps (the one given None gets what the others leave), and each
        step's boundary passed in order (fleet/testhook.py)."""
        total = report.timings.pop(whole.value, 0.0)
        known = sum(s for s in parts.values() if s is not None)
        for phase, seconds in parts.items():
            share = max(0.0, total - known) if seconds is None else min(seconds, total)
            report.timings[phase.value] = report.timings.get(phase.value, 0.0) + share
        for phase in parts:
            testhook.pause(phase.value, report.name)

    def _drained(self, name: str) -> list[str]:
        """The services whose instance on this host a transaction takes out of rotation:
        none for a boot, which changes nothing that runs."""
        if not self.options.drain or self.options.mode == "boot" or not self.balancers:
            return []
        return traffic.balanced(self.traffic, name)

    def _drain(self, report: HostReport, services: Sequence[str]) -> None:
        """The host drains itself (begin did that); wait until every balancer sends it
        nothing new and its sessions have ended, or the drain timeout. A balancer that
        cannot be read stops the host before anything is activated."""
        assert self.traffic is not None
        timeout = self.traffic.drain_timeout
        with self._phase(report, Phase.DRAIN):
            try:
                waited = traffic.wait_drained(
                    self.traffic, self.balancer, report.name, services, timeout
                )
            except traffic.BalancerError as exc:
                raise _Failed(
                    Phase.DRAIN,
                    f"{exc}: nothing was activated (--no-drain deploys without reading the "
                    "balancers)",
                ) from exc
        if not waited.done:
            report.traffic = f"drain timeout ({timeout:g} s), sessions cut: {waited.describe()}"

    def _back_in_rotation(self, report: HostReport) -> None:
        """After the commit (the host put itself back): wait until the balancers send to
        it again, so that the next wave never drains more than it should."""
        services = self._drained(report.name)
        if not services or self.traffic is None or report.result != HostResult.DEPLOYED:
            return
        try:
            waited = traffic.wait_serving(
                self.traffic, self.balancer, report.name, services, self.traffic.drain_timeout
            )
        except (traffic.BalancerError, Interrupted) as exc:
            report.traffic = f"back in rotation, not confirmed: {exc}"
            return
        if not waited.done:
            report.traffic = f"not back in rotation yet: {waited.describe()}"

    def _after_boot(self) -> float:
        """How long a host that booted its new generation waits for proof."""
        return self.options.health_timeout + self.options.confirm_timeout

    def _switch(
        self, ops: HostOps, report: HostReport, txn: _Txn, activation: Activation | None = None
    ) -> None:
        """Activate (unless begin did), prove, commit. ``activation``: begin's answer."""
        if activation is None:
            txn.activated = time.monotonic()
            with self._phase(report, Phase.ACTIVATE, pause=False):
                activation = ops.activate(
                    txn.helper, txn.token, self.options.health_timeout, self.options.confirm_timeout
                )
            self._split(report, Phase.ACTIVATE, self._host_times(None, activation))
        txn.deadline = activation.deadline
        line = activation.command
        if activation.switch_exit != 0:
            code = activation.switch_exit
            why = SWITCH_MESSAGES.get(code, f"switch-to-configuration exited {code}")
            raise _Failed(Phase.ACTIVATE, f"{why} (exit {code})" + _tail(activation.output), line)
        if activation.failed_units:
            failed = ", ".join(activation.failed_units)
            raise _Failed(Phase.HEALTH, f"failed units: {failed}", line)
        if not activation.settled:
            raise _Failed(Phase.HEALTH, "systemd jobs still running at the health timeout", line)
        made = health.from_host(activation.health, activation.declared)
        if made is None:
            deadline = txn.activated + self.options.health_timeout
            self._prove(ops, report, activation.declared, deadline)
        else:  # the host made the new generation's own checks in the same call
            report.checks = activation.declared.names()
            if not made.ok:
                raise _Failed(Phase.HEALTH, made.message, line)
        # A canary of the release, not a revert of one (a revert's record says so).
        if self.options.canary_weight and report.name in self.canaries and not txn.record:
            self._canary(ops, report, txn, activation.declared)
        interrupt.check()  # a second Ctrl-C restores even a host about to commit
        self._commit(ops, report, txn)
        self._back_in_rotation(report)

    def _canary(self, ops: HostOps, report: HostReport, txn: _Txn, declared: Declared) -> None:
        """The canary's share of real traffic, held while its checks keep passing; a
        failure takes it out of rotation first, then the host undoes."""
        services = self._drained(report.name)
        if not services or self.traffic is None or not self.options.canary_weight:
            return
        share, hold = self.options.canary_weight, self.options.canary_hold
        weights: dict[str, int | str] = {}
        for name in services:
            hosts = [i.host for i in self.traffic.services[name].instances]
            canaries = sum(h in self.canaries for h in hosts)
            weights[name] = traffic.canary_weight(len(hosts), canaries, share)
        with self._phase(report, Phase.CANARY):
            wait = self.traffic.drain_timeout
            txn.deadline = ops.weight(txn.helper, txn.token, weights, wait + hold)
            # The hold counts from when the balancers send it its share (the agent's next
            # answer), not from when the host was told.
            with contextlib.suppress(traffic.BalancerError):
                traffic.wait_serving(self.traffic, self.balancer, report.name, services,
                                     wait)  # fmt: skip
            end = time.monotonic() + hold
            failure = None
            while failure is None and time.monotonic() < end:
                verdict = health.check_host(
                    ops, declared, max(1.0, min(5.0, end - time.monotonic()))
                )
                if not verdict.ok:
                    failure = verdict.message
                else:
                    interrupt.sleep(1.0)
            if failure is not None:
                # Out of rotation before the old system comes back: no client sees the switch.
                ops.weight(txn.helper, txn.token, dict.fromkeys(services, "drain"), wait)
                with contextlib.suppress(traffic.BalancerError):
                    traffic.wait_drained(self.traffic, self.balancer, report.name, services,
                                         wait)  # fmt: skip
                raise _Failed(Phase.CANARY, f"at {share}% of the traffic: {failure}")

    def _prove(self, ops: HostOps, report: HostReport, declared: Declared, deadline: float) -> None:
        """The new generation's own checks (its manifest), not today's declaration's."""
        with self._phase(report, Phase.HEALTH):
            report.checks = declared.names()
            verdict = health.prove(ops.remote, declared, deadline)
        if not verdict.ok:
            raise _Failed(Phase.HEALTH, verdict.message)

    def _reboot(self, ops: HostOps, report: HostReport, txn: _Txn) -> None:
        """Boot the new generation once; prove it after the reboot, then make it default."""
        with self._phase(report, Phase.REBOOT):
            ops.reboot(txn.helper, txn.token, self.options.boot_timeout)
            state = self._wait_for_boot(ops, txn)
        if state is None:
            report.fail(
                HostResult.UNREACHABLE,
                Phase.REBOOT,
                f"did not come back within {self.options.boot_timeout:g} s; its "
                "default boot entry is still the recorded generation, and a boot "
                "of the new one reverts by itself unless confirmed",
            )
            return
        if state.txn is None or state.txn.token != txn.token:
            self._resolved_by_host(ops, report, txn, "the host did not boot the new generation")
            return
        txn.deadline = state.txn.deadline
        started = time.monotonic()
        with self._phase(report, Phase.HEALTH):
            settled, failed = ops.settle(self.options.health_timeout)
        if failed:
            raise _Failed(Phase.HEALTH, f"failed units after the reboot: {', '.join(failed)}")
        if not settled:
            raise _Failed(Phase.HEALTH, "systemd jobs still running at the health timeout")
        self._prove(ops, report, state.declared, started + self.options.health_timeout)
        interrupt.check()
        self._commit(ops, report, txn)
        self._back_in_rotation(report)

    def _wait_for_boot(self, ops: HostOps, txn: _Txn) -> HostState | None:
        """The host's state once it is back from its reboot (its transaction past
        ``rebooting``), or None if it is not back in time."""
        end = time.monotonic() + self.options.boot_timeout
        interrupt.sleep(1.0)
        while time.monotonic() < end:
            try:
                state = ops.state(fresh=True, timeout=10)
            except Interrupted:
                raise
            except FleetError:
                interrupt.sleep(1.0)
                continue
            if state.txn is None or state.txn.token != txn.token or state.txn.state != "rebooting":
                return state
            interrupt.sleep(1.0)
        return None

    @interrupt.protecting
    def _commit(self, ops: HostOps, report: HostReport, txn: _Txn) -> None:
        record = self.record(report) | {"phase": None, "message": None} | txn.record
        try:
            with self._phase(report, Phase.CONFIRM):
                answer = ops.commit(txn.helper, txn.token, record)
        except Fenced:
            # Gone: committed by us with the answer lost, or taken over. The host knows.
            self._resolved_by_host(ops, report, txn, "the commit's answer was lost")
            return
        except SshError as exc:
            # A new connection fails: the new system may lock new sessions out. Undo over
            # the session that still works, if one does.
            raise _Failed(Phase.CONFIRM, f"no new ssh connection after activation: {exc}") from exc
        except Expired:
            raise
        except HelperError as exc:  # not persisted: the host has undone it already
            report.fail(HostResult.FAILED, Phase.PERSIST, str(exc))
            self._verify_restored(ops, report, txn, exc.data)
            return
        new = answer.get("new")
        named = generation(new if isinstance(new, dict) else {"path": txn.target.path})
        # Committed to the target: its number as the host gave it, never another path.
        number = named.number if named is not None and named.path == txn.target.path else None
        report.new = report.attempted = Generation(number, txn.target.path)
        report.result = (
            HostResult.PENDING_REBOOT if self.options.mode == "boot" else HostResult.DEPLOYED
        )
        report.record_error = _text(answer.get("record_error"))

    @interrupt.protecting
    def _undo(self, ops: HostOps, report: HostReport, txn: _Txn, phase: Phase, why: str) -> None:
        """Ask the host to undo now; if it cannot be asked, say what the host will do."""
        report.fail(HostResult.FAILED, phase, why)
        record = self.record(report)
        try:
            with self._phase(report, Phase.ROLLBACK):
                data = ops.undo(txn.helper, txn.token, record, self.options.health_timeout)
        except Fenced:
            self._resolved_by_host(ops, report, txn, why)
            return
        except FleetError as exc:
            lost = isinstance(exc, SshError)
            report.fail(
                HostResult.UNREACHABLE if lost else HostResult.FAILED,
                phase,
                f"{why}; then the undo could not run ({exc}): the host's dead-man switch "
                f"undoes the change at {clock(txn.deadline)}",
            )
            return
        self._verify_restored(ops, report, txn, data)

    @interrupt.protecting
    def _verify_restored(
        self, ops: HostOps, report: HostReport, txn: _Txn, data: dict[str, Any]
    ) -> None:
        """The host undid the change; it counts as rolled back once proven healthy."""
        if txn.recorded is None:
            self._begun(report, txn, data)
        report.new = txn.recorded
        problems = []
        code = data.get("switch_exit")
        if code:
            exited = printable(str(code), 20)
            problems.append(f"re-activation exited {exited}{_tail(str(data.get('output', '')))}")
        failed = data.get("failed_units") or []
        if failed:
            units = failed if isinstance(failed, list) else [failed]
            problems.append(f"failed units: {', '.join(printable(str(u)) for u in units)}")
        for key in ("profile_error", "boot_error"):
            if data.get(key):
                problems.append(printable(str(data[key])))
        if not problems:
            # The restored generation is proven by its own checks: today's may name a
            # service it never had.
            restored = declared(data.get("checks"), "the restored system's manifest")
            report.checks = restored.names()
            try:
                verdict = health.prove(
                    ops.remote, restored, time.monotonic() + self.options.health_timeout
                )
            except FleetError as exc:
                problems.append(f"its health could not be checked: {exc}")
            else:
                if not verdict.ok:
                    problems.append(verdict.message)
        if not problems:
            report.result = HostResult.ROLLED_BACK
            report.record_error = _text(data.get("record_error"))
            return
        report.result = HostResult.FAILED
        report.message = (
            f"{report.message}; restored to its recorded generation, which is not healthy "
            f"either: {'; '.join(problems)}"
        )
        with contextlib.suppress(FleetError):
            report.record_error = ops.append_record(self.record(report))

    @interrupt.protecting
    def _expired(self, ops: HostOps, report: HostReport, txn: _Txn, exc: Expired) -> None:
        report.fail(
            HostResult.FAILED,
            Phase.CONFIRM,
            "not confirmed before the host's deadline; the host undid the change",
        )
        self._verify_restored(ops, report, txn, exc.data)

    @interrupt.protecting
    def _resolved_by_host(self, ops: HostOps, report: HostReport, txn: _Txn, why: str) -> None:
        """Our transaction ended without us: read what the host did, claim nothing else."""
        try:
            state = ops.state()
        except FleetError as exc:
            report.fail(
                HostResult.UNREACHABLE,
                report.phase or Phase.CONFIRM,
                f"{why}; the host cannot be asked what became of the change: {exc}",
            )
            return
        if state.txn is not None and state.txn.token != txn.token:
            report.fail(
                HostResult.FAILED,
                report.phase or Phase.CONFIRM,
                f"{why}; the host's lock was taken over by {state.lock}, whose "
                "transaction now decides this host's system",
            )
            return
        last = state.last_release or {}
        if last.get("release") == self.release.id and last.get("host") in (None, report.name):
            new = generation(last.get("new"))
            result = str(last.get("result"))
            if result in ("deployed", "pending-reboot") and new and new.path == txn.target.path:
                report.result = HostResult(result)
                report.new = new
                report.phase = None
                report.message = None
                return
            if result == "rolled-back":
                report.fail(
                    HostResult.FAILED,
                    report.phase or Phase.CONFIRM,
                    f"{why}; the host undid the change: {printable(str(last.get('message')))}",
                )
                self._verify_restored(ops, report, txn, {})
                return
        report.fail(
            HostResult.FAILED,
            report.phase or Phase.CONFIRM,
            f"{why}; the host holds no record of this release's outcome: see "
            f"`fleet status {report.name}`",
        )

    def _placed(self, report: HostReport) -> dict[str, Any]:
        """Where the host's transaction sits in the release, for the release records (and
        the report's timeline): its wave, and when its protocol started (epoch seconds)."""
        started = round(report.started, 3) if report.started is not None else None
        return {"wave": self.wave_of.get(report.name), "started": started}

    def record(self, report: HostReport) -> dict[str, Any]:
        return self.release.base(report.name) | {
            **self._placed(report),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "previous": report.previous.as_json() if report.previous else None,
            "new": report.new.as_json() if report.new else None,
            "result": report.result.value,
            "phase": report.phase.value if report.phase else None,
            "message": report.message,
            # The phases so far (not the step that writes the record): for the host's
            # metrics; `fleet history` does not show them.
            "timings": {k: round(v, 3) for k, v in report.timings.items()},
        }

    def _done(self, report: HostReport) -> HostReport:
        if report.result.succeeded:
            report.command = None  # a step that failed on the way did not fail the host
        self.reporter.done(report)
        self.events.host_end(report)
        return report

    # -- fleet-wide rollback of persisted hosts ------------------------------------------

    def _revert_held(self, report: HostReport) -> None:
        with self.transport.hold(self.remote(report.name)):
            self.revert_host(report)

    def revert_host(self, report: HostReport) -> None:
        """Put a host this release persisted back on its recorded generation, through a
        transaction of its own (switch, health, commit to the existing generation)."""
        if report.previous is None:  # never so after a begin that named it (_begun)
            report.fail(HostResult.FAILED, Phase.ROLLBACK, "no recorded generation to go back to")
            self.reporter.done(report)
            self.events.host_end(report)
            return
        back = HostReport(
            report.name, changed=True, previous=report.new, reverting=True, started=time.time()
        )
        ops = HostOps(self.remote(report.name))
        target = report.previous
        # The host's record: this release, rolled back from what it ran before it.
        record = {
            "result": HostResult.ROLLED_BACK.value,
            "previous": target.as_json(),
            "message": self.revert_message,
        }
        try:
            self._transaction(ops, back, target, record)  # the target is on the host: it ran it
        except Exception as exc:
            back.fail(HostResult.FAILED, Phase.ROLLBACK, f"unexpected error: {exc!r}")
        for phase, seconds in back.timings.items():
            key = f"revert-{phase}"
            report.timings[key] = report.timings.get(key, 0.0) + seconds
        if back.result is HostResult.DEPLOYED:
            report.result, report.new = HostResult.ROLLED_BACK, back.new
            report.message = self.revert_message
        else:
            report.result = back.result
            report.phase = Phase.ROLLBACK
            report.message = f"fleet rollback failed: {back.message}"
            report.new = back.new
            report.command = back.command
        self.reporter.done(report)
        self.events.host_end(report)  # its second end: the release's revert of it

    # -- the fleet ---------------------------------------------------------------------

    def _guarded(self, name: str, path: str) -> HostReport:
        """One host's protocol; an error nobody foresaw fails that host, not the rollout.
        (After begin, the transaction catches everything and has the host undo.)"""
        if interrupt.stopping():
            report = HostReport(name)
            report.message = NOT_STARTED
            return self._done(report)
        try:
            with self.transport.hold(self.remote(name)):
                return self.deploy_host(name, path)
        except Exception as exc:
            report = HostReport(name, changed=True)
            report.fail(
                HostResult.FAILED,
                Phase.DONE,
                f"unexpected error: {exc!r}; see `fleet status {name}`",
            )
            return self._done(report)

    def waves(self, order: Sequence[str]) -> list[Wave]:
        hosts = [self.hosts[n] for n in order]
        return waves_for(hosts, self.options, self.depends_on, self.traffic)

    def run(self, paths: dict[str, str], order: Sequence[str]) -> Report:
        start = time.monotonic()
        reports = {n: HostReport(n) for n in order}
        report = Report(self.release, [reports[n] for n in order])
        waves = self.waves(order)
        self.canaries = {n for w in waves for n, why in w.why.items() if why.startswith("canary")}
        self.reporter.start(list(order))
        failures = 0
        in_flight: set[str] = set()
        flight_lock = threading.Lock()

        def one(name: str) -> HostReport:
            with flight_lock:
                in_flight.add(name)
            try:
                return self._guarded(name, paths[name])
            finally:
                with flight_lock:
                    in_flight.discard(name)

        def notice(level: interrupt.Level) -> None:
            with flight_lock:
                hosts = ", ".join(sorted(in_flight)) or "none"
            self.reporter.note(INTERRUPT_NOTICES[level].format(hosts=hosts))

        with (
            interrupt.graceful(notice),
            ThreadPoolExecutor(max_workers=max(1, self.options.parallel)) as pool,
        ):
            for number, wave in enumerate(waves, 1):
                self.wave_of.update(dict.fromkeys(wave.hosts, number))
                self.reporter.wave(number, len(waves), list(wave.hosts))
                done = interrupt.gather(pool, one, wave.hosts)
                for r in done:
                    reports[r.name] = r
                failures += sum(not r.result.succeeded for r in done)
                if interrupt.stopping() and self._cut_short(number, len(waves), done):
                    report.interrupted = True
                    report.stopped = self._interrupted_at(number, len(waves), done)
                    break
                if failures > self.options.max_failures:
                    report.stopped = (
                        f"wave {number} of {len(waves)} brought failures to "
                        f"{failures} (more than --max-failures "
                        f"{self.options.max_failures})"
                    )
                    break
                later = waves[number].hosts if number < len(waves) else []
                if set(wave.hosts) <= self.canaries and not set(later) <= self.canaries:
                    report.stopped = self._analyse(report, reports, order)
                    if interrupt.stopping():
                        report.interrupted = True
                        report.stopped = "interrupted (Ctrl-C) during the canaries' analysis" + (
                            f"; {report.stopped}" if report.stopped else ""
                        )
                    if report.stopped:
                        break
            report.reports = [reports[n] for n in order]
            if report.interrupted:
                for r in report.reports:
                    if r.result is HostResult.SKIPPED and r.message is None:
                        r.message = NOT_STARTED
            # Ctrl-C stops the rollout; it does not revert hosts that finished: they run
            # the release, healthy and committed, and the report says which.
            revert = report.stopped and not report.interrupted
            if revert and self.options.rollback and not report.held:
                persisted = [r for r in report.reports if r.result.succeeded and r.changed]
                # Reverting drains too: as many at once as the services allow.
                limits = unavailability(self.traffic, self.options)
                for part, _ in within_limits([self.hosts[r.name] for r in persisted], limits):
                    names = {h.name for h in part}
                    interrupt.gather(
                        pool, self._revert_held, [r for r in persisted if r.name in names]
                    )
        self.reporter.finish()
        report.duration = time.monotonic() - start
        return report

    @staticmethod
    def _cut_short(number: int, waves: int, done: Sequence[HostReport]) -> bool:
        """Whether a Ctrl-C changed anything: a later wave, or a host of this one, that
        did not go its whole way (one pressed after the last host started changes none)."""
        return number < waves or any(INTERRUPTED in (r.message or "") for r in done)

    @staticmethod
    def _interrupted_at(number: int, waves: int, done: Sequence[HostReport]) -> str:
        cut = [r.name for r in done if r.phase is not None and INTERRUPTED in (r.message or "")]
        unstarted = sum(r.message == NOT_STARTED for r in done)
        where = f"interrupted (Ctrl-C) in wave {number} of {waves}"
        if cut:
            where += f"; stopped midway and restored: {', '.join(cut)}"
        if unstarted:
            where += f"; {unstarted} host{'s' if unstarted != 1 else ''} of the wave not started"
        return where + "; later waves not started"

    # -- canary analysis ---------------------------------------------------------------

    def _analyse(
        self, report: Report, reports: Mapping[str, HostReport], order: Sequence[str]
    ) -> str | None:
        """After the last canary wave: the declared analyses, on the canaries that now run
        the release. Why the rollout stops, or None to go on."""
        hosts = [n for n in order if n in self.canaries and reports[n].result.succeeded]
        if (
            not self.analyses
            or self.options.skip_analysis
            or self.monitoring is None
            or self.options.mode == "boot"  # nothing of the release runs yet
            or not hosts
        ):
            return None
        baseline = [n for n in order if n not in self.canaries]
        self.reporter.note(
            f"analysis of {', '.join(hosts)}: {', '.join(a.name for a in self.analyses)}"
        )

        def progress(run: analysis.Run, m: analysis.Measurement) -> None:
            values = ", ".join(f"{v:g}" for v in m.values) or "-"
            n, count = len(run.measurements), run.analysis.count
            why = f" ({m.message})" if m.message else ""
            self.reporter.note(
                f"analysis {run.analysis.name} {n}/{count}: {values}: {m.outcome.value}{why}"
            )

        runs = analysis.run_all(
            self.analyses, hosts, baseline, self._prometheus(), progress, wait=interrupt.wait
        )
        report.analysis = runs
        for run in runs:
            self.events.analysis(run)
        outcome = analysis.verdict(runs)
        decisive = next((r for r in runs if r.result is outcome), runs[0])
        why = f"analysis {decisive.analysis.name!r} {outcome.value}: {decisive.why()}"
        names = ", ".join(r.analysis.name for r in runs)
        successful = outcome is analysis.Outcome.SUCCESSFUL
        self.reporter.note(f"analysis successful: {names}" if successful else why)
        if outcome is analysis.Outcome.FAILED:
            self.revert_message = f"rolled back: analysis {decisive.analysis.name!r} failed"
            return why
        if outcome is analysis.Outcome.INCONCLUSIVE:
            return f"{why}; the canaries keep the new release"
        return None

    def _prometheus(self) -> analysis.Query:
        """Ask the first monitoring host whose Prometheus answers, over its ssh connection
        (Prometheus listens on its loopback only)."""
        assert self.monitoring is not None
        port, servers = self.monitoring.prometheus_port, self.monitoring.servers

        def ask(promql: str) -> Mapping[str, Any]:
            errors = []
            for name in servers:
                host = self.monitors.get(name) or self.hosts.get(name)
                if host is None:
                    continue
                remote = self.transport.remote(endpoint(host, self.ssh_user), pinned=True)
                try:
                    return HostOps(remote).prom_query(port, promql)
                except FleetError as exc:
                    errors.append(str(exc))
            raise FleetError("; ".join(errors) or "no monitoring host")

        return ask


# How a host's message says that Ctrl-C stopped it (fleet/interrupt.py).
INTERRUPTED = "interrupted (Ctrl-C"
NOT_STARTED = "not started: interrupted (Ctrl-C)"
# What the operator is told at each Ctrl-C of a rollout.
INTERRUPT_NOTICES = {
    interrupt.Level.STOP: "Ctrl-C: no new host starts; in flight, finishing or restoring as "
    "they would: {hosts} (Ctrl-C again to restore them now)",
    interrupt.Level.RESTORE: "Ctrl-C again: stopping and restoring the hosts in flight now: "
    "{hosts} (Ctrl-C a third time to leave them to their own dead-man switches)",
    interrupt.Level.LEAVE: "Ctrl-C a third time: leaving now; each host still in flight "
    "({hosts}) undoes its transaction by itself by its deadline: see `fleet status`",
}


def _tail(output: str, lines: int = 3) -> str:
    """The last lines a host's program printed, for a one-line message: printable."""
    kept = [printable(line) for line in output.strip().splitlines() if line.strip()][-lines:]
    return (": " + " | ".join(kept)) if kept else ""


def _text(value: Any) -> str | None:
    """What a host says went wrong (a record it could not write): one printable line."""
    return printable(str(value)) if value else None


@dataclass(frozen=True)
class Plan:
    """What a dry run shows: per host, the running system, what the flake builds now, and
    the wave the host would go in, and why."""

    host: str
    running: str | None
    desired: str
    reachable: bool
    message: str = ""
    wave: int = 0
    why: str = ""

    @property
    def changed(self) -> bool:
        return self.running != self.desired


def unavailability(balanced: Traffic | None, options: DeployOptions) -> dict[str, int]:
    """Each balanced service's maxUnavailable, where a wave drains its instances."""
    if balanced is None or not options.drain or options.mode == "boot":
        return {}
    return {name: s.max_unavailable for name, s in balanced.services.items()}


def waves_for(
    hosts: Sequence[Host],
    options: DeployOptions,
    depends_on: Mapping[str, Sequence[str]],
    balanced: Traffic | None = None,
) -> list[Wave]:
    return plan_waves(
        hosts,
        canary=options.canary,
        batch_size=options.batch_size,
        canary_tag=options.canary_tag,
        depends_on=depends_on,
        order=options.order,
        max_unavailable=unavailability(balanced, options),
    )


def dry_run(
    hosts: Sequence[Host],
    paths: dict[str, str],
    remote: Callable[[str], Remote],
    parallel: int,
    waves: Sequence[Wave] = (),
) -> list[Plan]:
    place = {n: (i, w.why.get(n, "")) for i, w in enumerate(waves, 1) for n in w.hosts}

    def one(host: Host) -> Plan:
        wave, why = place.get(host.name, (0, ""))
        try:
            state: HostState = HostOps(remote(host.name)).state()
        except SshError as exc:
            return Plan(host.name, None, paths[host.name], False, str(exc), wave, why)
        return Plan(host.name, state.running, paths[host.name], True, "", wave, why)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return interrupt.gather(pool, one, hosts)
