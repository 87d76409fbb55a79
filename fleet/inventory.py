"""The fleet inventory: validated against the one written-down schema, then typed.

The schema lives in ``inventory.schema.json`` (explained in docs/inventory.md) and is
produced on the Nix side by ``nix/inventory.nix`` for both the lab and real fleets.
"""

from __future__ import annotations

import fnmatch
import gc
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

from fleet import schemacheck
from fleet.analysis import Analysis, ConditionError, parse_condition
from fleet.errors import InventoryError, UsageError

if TYPE_CHECKING:
    import jsonschema.exceptions


class CheckType(StrEnum):
    HTTP = "http"
    TCP = "tcp"
    COMMAND = "command"


@dataclass(frozen=True)
class Check:
    """One health check; HTTP and TCP are made from the host itself (127.0.0.1:port)."""

    name: str
    service: str | None
    type: CheckType
    timeout: float
    interval: float
    retries: int
    port: int | None = None
    path: str | None = None
    expect_status: int | None = None
    expect_body: str | None = None
    command: tuple[str, ...] = ()


# Where the host module loads an uploaded credential from: the tool writes nowhere else.
SECRETS_DIR = "/var/lib/fleet/secrets"


@dataclass(frozen=True)
class Secret:
    """A credential the tool uploads before activating.

    ``file`` names a file of the operator's secrets folder; it goes to ``path`` on the
    host (always ``SECRETS_DIR/<service>/<name>``), where the service's unit loads it as
    the credential ``name``.
    """

    service: str
    name: str
    file: str
    path: str


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    ssh_port: int
    ssh_user: str
    tags: tuple[str, ...]
    system: str
    host_key: str | None
    services: tuple[str, ...]
    checks: tuple[Check, ...]
    secrets: tuple[Secret, ...] = ()


@dataclass(frozen=True)
class DeployPolicy:
    parallel: int
    canary: int
    batch_size: int | str  # a count, or a share of the fleet such as "25%"
    max_failures: int
    health_timeout: float
    confirm_timeout: float
    canary_tag: str | None = None  # hosts with this tag are the canaries, when any is
    # Measured after the canary wave, before the next (fleet/analysis.py).
    analysis: tuple[Analysis, ...] = ()


@dataclass(frozen=True)
class Instance:
    """Where the balancers send a service's traffic on one host: its first port."""

    host: str
    address: str
    port: int


@dataclass(frozen=True)
class Balanced:
    """A service the balancers serve, as their HAProxy configuration says."""

    name: str
    mode: str  # "http" or "tcp"
    port: int  # the frontend's, on every balancer
    max_unavailable: int  # instances a deploy may take out of rotation at once, >= 1
    instances: tuple[Instance, ...]  # sorted by host
    check: Check | None  # the service's declared check, which HAProxy's own follows


@dataclass(frozen=True)
class Traffic:
    """The fleet's balancers (HAProxy) and the services they serve."""

    agent_port: int  # each balanced host's agent, which the balancers ask
    drain_timeout: float
    socket: str  # HAProxy's runtime API on every balancer: a root-only unix socket
    balancers: tuple[str, ...]  # host names, sorted
    services: Mapping[str, Balanced]
    metrics_port: int | None = None  # HAProxy's Prometheus exporter, with monitoring


@dataclass(frozen=True)
class NodeTarget:
    """A host's node exporter: every host of a monitored fleet runs one."""

    host: str
    address: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where one instance of a service serves its Prometheus metrics."""

    host: str
    address: str
    port: int
    path: str


@dataclass(frozen=True)
class Probe:
    """One instance's declared HTTP or TCP check, probed from the monitoring hosts."""

    host: str
    address: str
    check: Check


@dataclass(frozen=True)
class Watched:
    """What the monitoring hosts scrape and probe of one service."""

    name: str
    metrics: tuple[MetricsEndpoint, ...]  # sorted by host
    probes: tuple[Probe, ...]  # sorted by host


@dataclass(frozen=True)
class Monitoring:
    """The fleet's monitoring hosts and what they watch.

    Prometheus and Alertmanager listen on 127.0.0.1 of each server only: the tool
    reaches them through its ssh connection to the server.
    """

    servers: tuple[str, ...]  # host names, sorted
    prometheus_port: int
    alertmanager_port: int
    blackbox_port: int
    node_exporter_port: int
    haproxy_port: int  # HAProxy's exporter on every balancer
    scrape_interval: str  # a Prometheus duration such as "15s"
    webhook: str | None  # where Alertmanager posts the alerts
    textfile_directory: str  # where each host's fleet-host writes its deploy state
    nodes: tuple[NodeTarget, ...]  # every host, sorted
    services: Mapping[str, Watched]
    balancers: tuple[str, ...]  # host names, sorted


@dataclass(frozen=True)
class Cache:
    """The fleet's binary cache: a host serving ``directory`` over HTTP at ``url``, whose
    key (``public_key``) every host trusts. A deploy pushes each new closure to it once
    and the hosts fetch from it, so the operator's uplink carries one copy, not N."""

    host: str
    url: str
    public_key: str
    directory: str


@dataclass(frozen=True)
class Inventory:
    hosts: Mapping[str, Host]
    deploy: DeployPolicy
    # service -> the services it depends on: a dependency's hosts are deployed first
    depends_on: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # None when no service has an ingress
    traffic: Traffic | None = None
    # None when no host carries the monitoring tag
    monitoring: Monitoring | None = None
    cache: Cache | None = None

    def select(self, selectors: Sequence[str]) -> list[Host]:
        """Hosts matching any selector, in inventory order; no selector means all."""
        names = select_names(
            list(self.hosts), {h.name: h.tags for h in self.hosts.values()}, selectors
        )
        return [self.hosts[n] for n in names]


@cache
def schema() -> dict[str, Any]:
    from importlib import resources  # only a command that reads an inventory needs it

    text = resources.files("fleet").joinpath("inventory.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _where(error: jsonschema.exceptions.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


@cache
def _compiled(ref: str | None = None) -> schemacheck.Schema:
    """The schema (or one of its definitions) compiled once per process."""
    root = schema() if ref is None else {"$ref": ref, "$defs": schema()["$defs"]}
    return schemacheck.Schema(root)


def validate(data: Any, source: str) -> None:
    """Raise InventoryError naming the first offending field, or return."""
    error = _compiled().best_error(data)
    if error is not None:
        raise InventoryError(f"inventory from {source}: {_where(error)}: {error.message}")


# A lookup, not CheckType(...): the enum's call costs a quarter of a check's parse.
_CHECK_TYPES = {t.value: t for t in CheckType}


def _whole(value: Any) -> Any:
    """An integer field as an int: JSON Schema takes 8080.0 for an integer (as Nix may
    write a float), which ssh's ``-p``, a slice or a range would not."""
    return None if value is None else int(value)


def _check(raw: Mapping[str, Any]) -> Check:
    return Check(
        name=raw["name"],
        service=raw["service"],
        type=_CHECK_TYPES[raw["type"]],
        timeout=float(raw["timeout"]),
        interval=float(raw["interval"]),
        retries=int(raw["retries"]),
        port=_whole(raw.get("port")),
        path=raw.get("path"),
        expect_status=_whole(raw.get("expectStatus")),
        expect_body=raw.get("expectBody"),
        command=tuple(raw.get("command", ())),
    )


def parse_checks(raw: Any, source: str) -> tuple[Check, ...]:
    """Checks as a system's own manifest declares them, held to the inventory's schema."""
    if not isinstance(raw, list):
        raise InventoryError(f"checks from {source}: expected a list")
    names: set[str] = set()
    for index, entry in enumerate(raw):
        error = _compiled("#/$defs/check").best_error(entry)
        if error is not None:
            where = ".".join(str(p) for p in (index, *error.absolute_path))
            raise InventoryError(f"checks from {source}: {where}: {error.message}")
        if entry["name"] in names:
            raise InventoryError(f"checks from {source}: check name {entry['name']!r} twice")
        names.add(entry["name"])
    return tuple(_check(entry) for entry in raw)


def _secret(raw: Mapping[str, Any]) -> Secret:
    return Secret(service=raw["service"], name=raw["name"], file=raw["file"], path=raw["path"])


def _check_secrets(host: Host, source: str) -> None:
    where = f"inventory from {source}: hosts.{host.name}.secrets"
    seen: set[tuple[str, str]] = set()
    for secret in host.secrets:
        expected = f"{SECRETS_DIR}/{secret.service}/{secret.name}"
        if secret.path != expected:
            raise InventoryError(
                f"{where}: secret {secret.name!r} of service {secret.service!r} "
                f"goes to {secret.path!r}, not {expected!r}"
            )
        if (secret.service, secret.name) in seen:
            raise InventoryError(
                f"{where}: secret {secret.name!r} of service {secret.service!r} is listed twice"
            )
        seen.add((secret.service, secret.name))


def _traffic(raw: Mapping[str, Any], hosts: Mapping[str, Host], source: str) -> Traffic:
    where = f"inventory from {source}: traffic"
    for name in raw["balancers"]:
        if name not in hosts:
            raise InventoryError(f"{where}.balancers: {name!r} is not a host of the inventory")
    services = {}
    for name, service in raw["services"].items():
        for host in service["instances"]:
            if host not in hosts:
                raise InventoryError(
                    f"{where}.services.{name}.instances: {host!r} is not a host of the inventory"
                )
        check = service["check"]
        services[name] = Balanced(
            name=name,
            mode=service["mode"],
            port=int(service["port"]),
            max_unavailable=int(service["maxUnavailable"]),
            instances=tuple(
                Instance(host=host, address=i["address"], port=int(i["port"]))
                for host, i in sorted(service["instances"].items())
            ),
            check=None if check is None else _check(check),
        )
    return Traffic(
        agent_port=int(raw["agentPort"]),
        drain_timeout=float(raw["drainTimeout"]),
        socket=raw["socket"],
        balancers=tuple(sorted(raw["balancers"])),
        services=services,
        metrics_port=_whole(raw.get("metricsPort")),
    )


def _known(names: Iterable[str], hosts: Mapping[str, Host], where: str) -> None:
    for name in names:
        if name not in hosts:
            raise InventoryError(f"{where}: {name!r} is not a host of the inventory")


def _watched(name: str, raw: Mapping[str, Any], hosts: Mapping[str, Host], where: str) -> Watched:
    _known(raw["metrics"], hosts, f"{where}.services.{name}.metrics")
    _known(raw["probes"], hosts, f"{where}.services.{name}.probes")
    probes = []
    for host, probe in sorted(raw["probes"].items()):
        check = _check(probe["check"])
        if check.service != name:
            raise InventoryError(
                f"{where}.services.{name}.probes.{host}: the check is of service "
                f"{check.service!r}, not {name!r}"
            )
        probes.append(Probe(host=host, address=probe["address"], check=check))
    return Watched(
        name=name,
        metrics=tuple(
            MetricsEndpoint(host=host, address=e["address"], port=int(e["port"]), path=e["path"])
            for host, e in sorted(raw["metrics"].items())
        ),
        probes=tuple(probes),
    )


def _monitoring(raw: Mapping[str, Any], hosts: Mapping[str, Host], source: str) -> Monitoring:
    where = f"inventory from {source}: monitoring"
    _known(raw["servers"], hosts, f"{where}.servers")
    _known(raw["nodes"], hosts, f"{where}.nodes")
    _known(raw["balancers"], hosts, f"{where}.balancers")
    return Monitoring(
        servers=tuple(sorted(raw["servers"])),
        prometheus_port=int(raw["prometheusPort"]),
        alertmanager_port=int(raw["alertmanagerPort"]),
        blackbox_port=int(raw["blackboxPort"]),
        node_exporter_port=int(raw["nodeExporterPort"]),
        haproxy_port=int(raw["haproxyPort"]),
        scrape_interval=raw["scrapeInterval"],
        webhook=raw["webhook"],
        textfile_directory=raw["textfileDirectory"],
        nodes=tuple(
            NodeTarget(host=host, address=n["address"], tags=tuple(n["tags"]))
            for host, n in sorted(raw["nodes"].items())
        ),
        services={
            name: _watched(name, service, hosts, where)
            for name, service in sorted(raw["services"].items())
        },
        balancers=tuple(sorted(raw["balancers"])),
    )


def _cache(raw: Mapping[str, Any], hosts: Mapping[str, Host], source: str) -> Cache:
    """The cache as its host serves it: the tool publishes to that host, and every host
    fetches from the URL (which is shown on the terminal and handed to each host's
    fleet-host), so the URL is the host's own address and the cache's port, nothing else."""
    where = f"inventory from {source}: cache"
    host = hosts.get(raw["host"])
    if host is None:
        raise InventoryError(f"{where}.host {raw['host']!r} is no host")
    if raw["address"] != host.address:
        raise InventoryError(
            f"{where}.address {raw['address']!r} is not the address of host {host.name} "
            f"({host.address!r})"
        )
    address = f"[{host.address}]" if ":" in host.address else host.address
    url = f"http://{address}:{int(raw['port'])}"
    if raw["url"] != url:
        raise InventoryError(f"{where}.url {raw['url']!r} is not {url!r} (address and port)")
    return Cache(host.name, url, raw["publicKey"], raw["directory"])


def _distinct_ignoring_case(names: Iterable[str], source: str) -> None:
    """ssh matches a host key's name regardless of case: hosts ``web1`` and ``WEB1`` would
    share one name in the run's known_hosts, and the key pinned for one would pass for
    the other (DNS and host names ignore case too)."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise InventoryError(
                f"inventory from {source}: hosts: {other!r} and {name!r} differ only in case"
            )


def _analysis(raw: Mapping[str, Any], source: str) -> Analysis:
    """A bad condition is bad input, named here rather than at the canary wave."""
    where = f"inventory from {source}: deploy.analysis {raw['name']!r}"
    try:
        condition = parse_condition(raw["successCondition"])
    except ConditionError as exc:
        raise InventoryError(
            f"{where}: successCondition {raw['successCondition']!r}: {exc}"
        ) from exc
    if "{{service}}" in raw["query"] and raw["service"] is None:
        raise InventoryError(f"{where}: the query uses {{{{service}}}} but names no service")
    return Analysis(
        name=raw["name"],
        query=raw["query"],
        condition=condition,
        interval=float(raw["interval"]),
        count=int(raw["count"]),
        failure_limit=int(raw["failureLimit"]),
        inconclusive_limit=int(raw["inconclusiveLimit"]),
        service=raw["service"],
    )


@contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while parsing.

    Parsing makes hundreds of thousands of records that hold no cycles; the collector's
    full passes they set off walk the whole heap (the document included) for nothing,
    and made loading a large fleet grow faster than the fleet.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse(data: Any, source: str) -> Inventory:
    """Validate raw inventory JSON and turn it into typed records."""
    validate(data, source)
    with _collection_paused():
        return _records(data, source)


def _records(data: Any, source: str) -> Inventory:
    hosts = {
        name: Host(
            name=name,
            address=h["address"],
            ssh_port=int(h["sshPort"]),
            ssh_user=h["sshUser"],
            tags=tuple(h["tags"]),
            system=h["system"],
            host_key=h["hostKey"],
            services=tuple(h["services"]),
            checks=tuple(_check(c) for c in h["checks"]),
            secrets=tuple(_secret(s) for s in h.get("secrets", ())),
        )
        for name, h in data["hosts"].items()
    }
    _distinct_ignoring_case(hosts, source)
    for host in hosts.values():
        seen: set[str] = set()
        for check in host.checks:
            if check.name in seen:
                raise InventoryError(
                    f"inventory from {source}: hosts.{host.name}.checks: "
                    f"check name {check.name!r} is used twice"
                )
            seen.add(check.name)
        _check_secrets(host, source)
    d = data["deploy"]
    batch = d["batchSize"]
    policy = DeployPolicy(
        parallel=int(d["parallel"]),
        canary=int(d["canary"]),
        batch_size=batch if isinstance(batch, str) else int(batch),
        max_failures=int(d["maxFailures"]),
        health_timeout=float(d["healthTimeout"]),
        confirm_timeout=float(d["confirmTimeout"]),
        canary_tag=d.get("canaryTag"),
        analysis=tuple(_analysis(a, source) for a in d.get("analysis", ())),
    )
    names = [a.name for a in policy.analysis]
    counts = Counter(names)
    for name in names:
        if counts[name] > 1:
            raise InventoryError(f"inventory from {source}: deploy.analysis {name!r} twice")
    depends_on = {
        name: tuple(service["dependsOn"]) for name, service in data.get("services", {}).items()
    }
    raw_traffic = data.get("traffic")
    traffic = None if raw_traffic is None else _traffic(raw_traffic, hosts, source)
    raw_monitoring = data.get("monitoring")
    monitoring = None if raw_monitoring is None else _monitoring(raw_monitoring, hosts, source)
    if policy.analysis and monitoring is None:
        raise InventoryError(
            f"inventory from {source}: deploy.analysis: no monitoring host to ask Prometheus"
        )
    raw_cache = data.get("cache")
    cache = None if raw_cache is None else _cache(raw_cache, hosts, source)
    return Inventory(
        hosts=hosts,
        deploy=policy,
        depends_on=depends_on,
        traffic=traffic,
        monitoring=monitoring,
        cache=cache,
    )


def select_names(
    names: Sequence[str], tags: Mapping[str, Iterable[str]], selectors: Sequence[str]
) -> list[str]:
    """Resolve selectors (names, shell globs, @tag) to names in their given order.

    A selector that matches nothing is an error: a typo must never shrink a rollout
    silently.
    """
    if not selectors:
        return list(names)
    chosen: set[str] = set()
    for selector in selectors:
        if selector.startswith("@"):
            tag = selector[1:]
            matched = {n for n in names if tag in tags.get(n, ())}
            what = f"tag {tag!r}"
        elif any(ch in selector for ch in "*?["):
            matched = set(fnmatch.filter(names, selector))
            what = f"pattern {selector!r}"
        else:
            matched = {selector} if selector in names else set()
            what = f"host {selector!r}"
        if not matched:
            raise UsageError(f"selector {selector!r}: no {what} in the inventory")
        chosen |= matched
    return [n for n in names if n in chosen]
