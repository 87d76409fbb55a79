"""The flows behind each command: load what they need once, then drive the core."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleet import (
    alerts,
    cache,
    config,
    events,
    interrupt,
    inventory,
    nix,
    opening,
    secrets,
    traffic,
)
from fleet.errors import FleetError, NixError, UsageError
from fleet.history import ReleaseEntry, merge, rollback_target
from fleet.hostops import HostOps, HostState
from fleet.inventory import Host, Inventory
from fleet.models import READ_PARALLEL, Generation, HostReport, HostResult, Phase
from fleet.output import Reporter
from fleet.rollout import (
    DeployOptions,
    Plan,
    Release,
    Report,
    Rollout,
    check_timeouts,
    dry_run,
    endpoint,
    waves_for,
)
from fleet.ssh import Endpoint, Remote, SshConfig, Transport, jump_chain
from fleet.status import STATE_TIMEOUT, FleetStatus, HostStatus, probe
from fleet.waves import Order

# Status must not stall on a dead host: it reports it unreachable instead.
STATUS_CONNECT_TIMEOUT = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class Session:
    """A command's view of the fleet: the flake, the operator's config, the inventory."""

    flake: str
    config: config.Config
    inventory: Inventory
    parallel: int = READ_PARALLEL  # hosts worked on at once (each, transport)

    def ssh_config(self) -> SshConfig:
        identity = self.config.get("identityFile")
        known_hosts = self.config.get("knownHostsFile")
        jump = self.config.get("jumpHost")
        jump_keys = self.config.get("jumpHostKeys")
        if jump_keys and not jump:
            raise UsageError("jumpHostKeys: set, but jumpHost is not: no jump host to pin")
        # A jump host's key is looked up only where the operator said, never a checkout.
        own_known_hosts = config.load_user().get("knownHostsFile") if jump else None
        return SshConfig(
            identity_file=Path(identity) if identity else None,
            known_hosts_file=Path(known_hosts) if known_hosts else None,
            connect_timeout=float(self.config.get("connectTimeout", 10)),
            # Verified like every other host, through the run's ssh_config (fleet/ssh.py).
            jump_hosts=jump_chain(jump, jump_keys) if jump else (),
            jump_known_hosts_file=Path(own_known_hosts) if own_known_hosts else None,
            options=tuple(sorted((self.config.get("sshOptions") or {}).items())),
        )

    def transport(
        self, connect_timeout: float | None = None, parallel: int | None = None
    ) -> Transport:
        """The run's connections: at most ``parallel`` hosts (default the session's) at once."""
        config = self.ssh_config()
        if connect_timeout is not None:
            config = dataclasses.replace(
                config, connect_timeout=min(config.connect_timeout, connect_timeout)
            )
        return Transport(config, max_open=parallel or self.parallel)

    def ops(self, transport: Transport, host: Host) -> HostOps:
        return HostOps(transport.remote(endpoint(host, self.config.get("sshUser"))))

    def each(
        self,
        selectors: Sequence[str],
        work: Callable[[Host, HostOps], T],
        transport: Transport | None = None,
        connect_timeout: float | None = None,
    ) -> dict[str, T | FleetError]:
        """Run ``work`` on every selected host, ``parallel`` at a time, in inventory order; a
        host's failure (unreachable, say) is its result, not everyone's."""
        hosts = self.inventory.select(selectors)
        if transport is None:
            with self.transport(connect_timeout) as own:
                return self.each(selectors, work, own)

        def one(host: Host) -> T | FleetError:
            ops = self.ops(transport, host)
            try:
                with transport.hold(ops.remote):
                    return work(host, ops)
            except FleetError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(hosts)))) as pool:
            answers = interrupt.gather(pool, one, hosts)
            return dict(zip([h.name for h in hosts], answers, strict=True))


def open_session(flake: str | opening.Opening | None, parallel: int | None = None) -> Session:
    """Every command that reads the fleet starts here (``opening``: the flake checked, the
    inventory asked of Nix); the command line starts the opening itself, before it loads
    this module, so that both happen at once."""
    opened = flake if isinstance(flake, opening.Opening) else opening.start(flake)
    data = opened.inventory()
    return Session(
        opened.ref,
        opened.config,
        inventory.parse(data, f"{opened.ref}#fleet"),
        parallel or READ_PARALLEL,
    )


def revision(flake: str) -> str | None:
    try:
        meta = nix.flake_metadata(flake)
    except NixError:
        return None
    rev = meta.get("revision") or meta.get("dirtyRevision")
    return str(rev) if rev else None


def deploy_options(session: Session, overrides: dict[str, Any]) -> DeployOptions:
    """Command line first, then the operator's config, then the fleet's deploy policy."""
    policy = session.inventory.deploy
    cfg = session.config

    def pick(key: str, config_key: str | None, default: Any) -> Any:
        if overrides.get(key) is not None:
            return overrides[key]
        if config_key and cfg.get(config_key) is not None:
            return cfg.get(config_key)
        return default

    build_host = overrides.get("build_host")
    if build_host is not None:
        resolve_build_host(session, build_host)  # bad input: before anything is built
    batch = pick("batch_size", None, policy.batch_size)
    if isinstance(batch, str) and not batch.endswith("%"):
        batch = int(batch)
    return DeployOptions(
        parallel=pick("parallel", "parallel", policy.parallel),
        canary=pick("canary", None, policy.canary),
        batch_size=batch,
        max_failures=pick("max_failures", None, policy.max_failures),
        health_timeout=float(pick("health_timeout", "healthTimeout", policy.health_timeout)),
        confirm_timeout=float(pick("confirm_timeout", "confirmTimeout", policy.confirm_timeout)),
        rollback=not overrides.get("no_rollback", False),
        dry_run=bool(overrides.get("dry_run", False)),
        boot=bool(overrides.get("boot", False)),
        reboot=bool(overrides.get("reboot", False)),
        boot_timeout=float(overrides.get("boot_timeout") or 300),
        break_lock=bool(overrides.get("break_lock", False)),
        canary_tag=policy.canary_tag,
        order=Order(overrides.get("order") or Order.DEPENDENCIES),
        drain=not overrides.get("no_drain", False),
        canary_weight=overrides.get("canary_weight"),
        canary_hold=float(overrides.get("canary_hold") or 30),
        skip_analysis=bool(overrides.get("skip_analysis", False)),
        use_cache=not overrides.get("no_cache", False),
        substitute=bool(overrides.get("substitute_on_destination", False)),
        build_host=build_host,
    )


@dataclass(frozen=True)
class Recovered:
    """What ``fleet recover`` did on one host, and how the host stands after it."""

    action: str  # "none", "undone", "finished"
    detail: dict[str, Any]
    state: HostState


def recover(
    session: Session, selectors: Sequence[str], force: bool = False
) -> dict[str, Recovered | FleetError]:
    """Resolve every abandoned transaction as its record says (undo before the commit
    point, finish after it); with ``force``, live ones too."""

    def one(_host: Host, ops: HostOps) -> Recovered:
        answer = ops.recover(force=force, why="fleet recover" + (" --force" if force else ""))
        done = answer.get("recovered")
        action = str(done.get("action", "resolved")) if isinstance(done, dict) else "none"
        return Recovered(action, done if isinstance(done, dict) else {}, ops.state())

    return session.each(selectors, one)


def parse_batch_size(text: str) -> int | str:
    if re.fullmatch(r"([1-9][0-9]?|100)%", text):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UsageError(f"--batch-size {text!r}: expected a number of hosts or a share such as 25%")


def status(session: Session, selectors: Sequence[str], desired: bool = False) -> FleetStatus:
    """Every selected host's state and health, queried in parallel with a short timeout;
    with ``desired``, also whether it runs what the flake builds now (that needs a build).
    With monitoring, the alerts are asked of a monitoring server at the same time, once."""
    wanted: dict[str, str] = {}
    names = [h.name for h in session.inventory.select(selectors)]
    if desired:
        wanted = nix.build_systems(session.flake, names)
    monitoring = session.inventory.monitoring
    hosts = session.inventory.hosts
    with (
        session.transport(STATUS_CONNECT_TIMEOUT) as transport,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        asked = None
        if monitoring is not None:
            asked = pool.submit(alerts.fetch, monitoring,
                                lambda n: session.ops(transport, hosts[n]),
                                names, hosts, STATE_TIMEOUT)  # fmt: skip
        found = session.each(selectors, probe, transport)
        fleet_alerts = asked.result() if asked is not None else None
    statuses = [dataclasses.replace(got, desired=wanted.get(name))
                if not isinstance(got, FleetError) else HostStatus(name, False, str(got))
                for name, got in found.items()]  # fmt: skip
    if fleet_alerts is not None:
        statuses = [dataclasses.replace(s, alerts=fleet_alerts.of(s.name)) for s in statuses]
    return FleetStatus(statuses, fleet_alerts)


def traffic_view(
    session: Session, selectors: Sequence[str]
) -> tuple[list[traffic.Server], dict[str, str]]:
    """`fleet traffic`: what every balancer does with the selected hosts' instances."""
    balanced = session.inventory.traffic
    if balanced is None:
        raise UsageError("the fleet balances no service: no service has an ingress")
    hosts = [h.name for h in session.inventory.select(selectors)] if selectors else None
    user = session.config.get("sshUser")
    with session.transport(STATUS_CONNECT_TIMEOUT) as transport:
        return traffic.view(
            balanced,
            lambda n: transport.remote(endpoint(session.inventory.hosts[n], user)),
            hosts,
        )


def deploy(
    session: Session, selectors: Sequence[str], options: DeployOptions, reporter: Reporter
) -> Report | list[Plan]:
    """Build every selected host in one Nix call, then roll out (or only show, with dry_run)."""
    hosts = session.inventory.select(selectors)
    check_timeouts(options, hosts)
    delivered = secrets.payloads(hosts, session.config.get("secretsDir"))
    user = session.config.get("sshUser")
    waves = waves_for(hosts, options, session.inventory.depends_on, session.inventory.traffic)
    with session.transport(parallel=options.parallel) as transport:

        def remote(name: str) -> Remote:
            return transport.remote(endpoint(session.inventory.hosts[name], user))

        # The cache's and the first hosts' connections are set up while the systems
        # evaluate and build.
        first = [remote(n) for n in (waves[0].hosts[: options.parallel] if waves else [])]
        if options.use_cache and session.inventory.cache is not None and not options.dry_run:
            first.insert(0, cache_remote(session, transport))
        transport.warm(first)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The release's revision, asked of Nix while the systems evaluate and build.
            revised = None if options.dry_run else pool.submit(revision, session.flake)
            paths = build(session, [h.name for h in hosts], options.build_host, reporter)
            rev = revised.result() if revised is not None else None
        if options.dry_run:
            return dry_run(hosts, paths, remote, options.parallel, waves)
        sign(session, paths.values())
        release = Release.new("deploy", session.flake, rev)
        reporter.note(f"release {release.id}")
        names = [h.name for h in hosts]
        published = None
        if options.use_cache:
            published = publish(
                session, transport, reporter, paths.values(), substitute=options.substitute
            )
        with events.recording(session.config, release, names) as recorder:
            rollout = Rollout(
                hosts,
                options,
                release,
                transport,
                reporter,
                user,
                secrets=delivered,
                depends_on=session.inventory.depends_on,
                **balancing(session.inventory),
                events=recorder,
                **watching(session.inventory),
                published=published,
            )
            report = rollout.run(paths, names)
            report.extra["ssh"] = transport.figures()
            if published is not None:
                report.extra["cache"] = published.as_json()
            recorder.release_end(report)
        return report


# A build host the operator names that is not in the inventory: one ssh destination, a
# user and a host name or address (IPv6 bare), which no ssh or Nix can read as an option,
# a port, a URL or a second word.
_DESTINATION = re.compile(
    r"(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?"
    r"(?P<address>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f.]{0,15}){2,8})"
)


@dataclass(frozen=True)
class BuildHost:
    """Where --build-host builds, and how that host is reached and verified."""

    endpoint: Endpoint
    ssh: SshConfig
    in_inventory: bool

    def describe(self) -> str:
        e = self.endpoint
        return e.name if self.in_inventory else f"{e.user}@{e.address}"


def resolve_build_host(session: Session, text: str) -> BuildHost:
    """A host of the inventory (reached as a deploy reaches it: its pinned key, else the
    known_hosts of the config), or ``[user@]address`` (port 22; the user defaults to the
    config's sshUser, else root), verified against the operator's own knownHostsFile or
    ssh's default known_hosts, never a checkout's: the operator chose this host, and what
    it builds is what the fleet runs."""
    host = session.inventory.hosts.get(text)
    if host is not None:
        return BuildHost(endpoint(host, session.config.get("sshUser")), session.ssh_config(), True)
    m = _DESTINATION.fullmatch(text)
    if m is None:
        raise UsageError(
            f"--build-host {text!r}: expected a host of the inventory or one ssh destination, "
            "[user@]address (no spaces, options or ssh:// URL, not starting with '-')"
        )
    user = m["user"] or session.config.get("sshUser") or "root"
    own = config.load_user().get("knownHostsFile")
    ssh = dataclasses.replace(session.ssh_config(), known_hosts_file=Path(own) if own else None)
    return BuildHost(Endpoint(text, m["address"], 22, user), ssh, False)


def build(
    session: Session, names: Sequence[str], build_host: str | None, reporter: Reporter
) -> dict[str, str]:
    """Every host's system in one evaluation here, built here or on the build host (whose
    outputs come back here once, to be signed, published and copied as if built here)."""
    count = f"{len(names)} host{'s' if len(names) != 1 else ''}"
    if build_host is None:
        reporter.note(f"building {count} on this machine")
        return nix.build_systems(session.flake, names)
    builder = resolve_build_host(session, build_host)
    systems = nix.evaluate_systems(session.flake, names)
    reporter.note(f"building {count} on {builder.describe()}")
    # A build host whose ssh user Nix does not trust takes only signed derivations.
    sign(session, (s.drv for s in systems.values()))
    with Transport(builder.ssh, max_open=1) as transport:
        paths = nix.build_on(transport.remote(builder.endpoint), systems)
    reporter.note(f"built on {builder.describe()}; the systems are copied back to this machine")
    return paths


def publish(
    session: Session,
    transport: Transport,
    reporter: Reporter,
    paths: Iterable[str],
    *,
    substitute: bool = False,
) -> cache.Published | None:
    """Put the closures in the fleet's binary cache, once, before any host needs them."""
    declared = session.inventory.cache
    if declared is None:
        return None
    remote = cache_remote(session, transport)
    reporter.note(f"publishing to the binary cache {declared.url} on {declared.host}")
    published = cache.publish(declared, remote, list(paths), substitute=substitute)
    if published.error is not None:
        reporter.note(
            f"binary cache: nothing published ({published.error}); every host gets its "
            "closure from this machine"
        )
    return published


def cache_remote(session: Session, transport: Transport) -> Remote:
    """The declared cache host's connection, kept for the whole run."""
    assert session.inventory.cache is not None
    server = session.inventory.hosts[session.inventory.cache.host]
    return transport.remote(endpoint(server, session.config.get("sshUser")), pinned=True)


def sign(session: Session, paths: Iterable[str]) -> None:
    """Sign what will be copied, when the operator has a signing key (docs/security.md)."""
    key = session.config.get("signingKey")
    if key:
        nix.sign([p for p in paths if Path(p).exists()], key)


def history(
    session: Session, host: str | None, limit: int | None
) -> tuple[list[ReleaseEntry], list[str]]:
    """Releases newest first, and the hosts whose records could not be read."""
    read = session.each([host] if host else [], lambda _h, ops: ops.records())
    records = {n: r for n, r in read.items() if not isinstance(r, FleetError)}
    missing = sorted(n for n, r in read.items() if isinstance(r, FleetError))
    entries = merge(records)
    return (entries[:limit] if limit else entries), missing


@dataclass(frozen=True)
class RollbackPlan:
    targets: dict[str, Generation]  # host -> generation it goes back to
    running: dict[str, str | None]
    unreachable: dict[str, str]  # host -> why


def plan_rollback(
    session: Session,
    selectors: Sequence[str],
    transport: Transport,
    to: int | None,
    release: str | None,
) -> RollbackPlan:
    """Every host's target, resolved before anything is touched: a bad target is exit 2."""

    def read(_host: Host, ops: HostOps) -> tuple[HostState, list[dict[str, Any]]]:
        return ops.state(), (ops.records() if release else [])

    found = session.each(selectors, read, transport)
    targets: dict[str, Generation] = {}
    running: dict[str, str | None] = {}
    unreachable: dict[str, str] = {}
    for name, got in found.items():
        if isinstance(got, FleetError):
            unreachable[name] = str(got)
            continue
        state, records = got
        target = rollback_target(name, state, records, to=to, release=release)
        if target is not None:
            targets[name], running[name] = target, state.running
    if release and not targets and not unreachable:
        raise UsageError(f"release {release!r}: no selected host has a record of deploying it")
    return RollbackPlan(targets, running, unreachable)


def balancing(inventory: Inventory) -> dict[str, Any]:
    """What a rollout needs to drain the hosts' instances: the balancers in front of them."""
    if inventory.traffic is None:
        return {}
    return {
        "traffic": inventory.traffic,
        "balancers": [inventory.hosts[n] for n in inventory.traffic.balancers],
    }


def watching(inventory: Inventory) -> dict[str, Any]:
    """What a rollout needs for its canary analysis: the analyses and the monitoring hosts
    whose Prometheus it asks."""
    if inventory.monitoring is None or not inventory.deploy.analysis:
        return {}
    return {
        "analyses": inventory.deploy.analysis,
        "monitoring": inventory.monitoring,
        "monitors": [inventory.hosts[n] for n in inventory.monitoring.servers],
    }


def analyses_to_run(
    inventory: Inventory, options: DeployOptions, plans: Sequence[Plan]
) -> list[str]:
    """What a dry run names: the analyses a deploy of these hosts would run after its
    canaries (none without canaries, with --skip-analysis, or with --boot)."""
    canaries = any(p.why.startswith("canary") for p in plans)
    if not canaries or options.skip_analysis or options.mode == "boot":
        return []
    return [a.name for a in watching(inventory).get("analyses", ())]


def rollback(
    session: Session,
    plan: RollbackPlan,
    transport: Transport,
    options: DeployOptions,
    reporter: Reporter,
) -> Report:
    """Roll hosts back through the deploy protocol; unreachable hosts are reported as such."""
    order = [n for n in session.inventory.hosts if n in plan.targets]
    hosts = [session.inventory.hosts[n] for n in order]
    check_timeouts(options, hosts)
    release = Release.new("rollback", session.flake, None)
    reporter.note(f"release {release.id} (rollback)")
    with events.recording(session.config, release, [*order, *plan.unreachable]) as recorder:
        rollout = Rollout(hosts, options, release, transport, reporter,
                          session.config.get("sshUser"),
                          generations={n: g.number for n, g in plan.targets.items()
                                       if g.number is not None},
                          **balancing(session.inventory), events=recorder)  # fmt: skip
        sign(session, (g.path for g in plan.targets.values()))
        report = rollout.run({n: g.path for n, g in plan.targets.items()}, order)
        report.extra["ssh"] = transport.figures()
        for name, why in plan.unreachable.items():
            missed = HostReport(name)
            missed.fail(HostResult.UNREACHABLE, Phase.CONNECT, why)
            report.reports.append(missed)
            recorder.host_end(missed)
        recorder.release_end(report)
    return report
