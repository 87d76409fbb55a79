"""The flows behind each command: load what they need once, then drive the core."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet import config, inventory, nix
from fleet.errors import NixError, UsageError
from fleet.inventory import Inventory
from fleet.output import Reporter
from fleet.rollout import DeployOptions, Plan, Release, Report, Rollout, dry_run, endpoint
from fleet.ssh import SshConfig, Transport
from fleet.status import HostStatus, query

# Status must not stall on a dead host: it reports it unreachable instead.
STATUS_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Session:
    """A command's view of the fleet: the flake, the operator's config, the inventory."""

    flake: str
    config: config.Config
    inventory: Inventory

    def ssh_config(self) -> SshConfig:
        identity = self.config.get("identityFile")
        known_hosts = self.config.get("knownHostsFile")
        jump = self.config.get("jumpHost")
        return SshConfig(
            identity_file=Path(identity) if identity else None,
            known_hosts_file=Path(known_hosts) if known_hosts else None,
            connect_timeout=float(self.config.get("connectTimeout", 10)),
            extra_options=("-J", jump) if jump else (),
        )

    def transport(self) -> Transport:
        return Transport(self.ssh_config())


def open_session(flake: str | None) -> Session:
    user_config = config.load(None)
    ref = flake or user_config.get("flake") or "."
    cfg = config.load(ref)
    data = nix.eval_inventory(ref)
    return Session(ref, cfg, inventory.parse(data, f"{ref}#fleet"))


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
        break_lock=bool(overrides.get("break_lock", False)),
    )


def parse_batch_size(text: str) -> int | str:
    if re.fullmatch(r"([1-9][0-9]?|100)%", text):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UsageError(f"--batch-size {text!r}: expected a number of hosts or a share such as 25%")


def status(session: Session, selectors: Sequence[str]) -> list[HostStatus]:
    """Every selected host's state and health, queried in parallel with a short timeout."""
    hosts = session.inventory.select(selectors)
    config = dataclasses.replace(
        session.ssh_config(),
        connect_timeout=min(session.ssh_config().connect_timeout, STATUS_CONNECT_TIMEOUT),
    )
    user = session.config.get("sshUser")
    with Transport(config) as transport:
        return query(
            hosts,
            lambda n: transport.remote(endpoint(session.inventory.hosts[n], user)),
            parallel=len(hosts),
        )


def deploy(
    session: Session, selectors: Sequence[str], options: DeployOptions, reporter: Reporter
) -> Report | list[Plan]:
    """Build every selected host in one Nix call, then roll out (or only show, with dry_run)."""
    hosts = session.inventory.select(selectors)
    reporter.note(f"building {len(hosts)} host{'s' if len(hosts) != 1 else ''}")
    paths = nix.build_systems(session.flake, [h.name for h in hosts])
    user = session.config.get("sshUser")
    with session.transport() as transport:
        if options.dry_run:
            return dry_run(
                hosts,
                paths,
                lambda n: transport.remote(endpoint(session.inventory.hosts[n], user)),
                options.parallel,
            )
        release = Release.new("deploy", session.flake, revision(session.flake))
        reporter.note(f"release {release.id}")
        rollout = Rollout(hosts, options, release, transport, reporter, user)
        return rollout.run(paths, [h.name for h in hosts])
