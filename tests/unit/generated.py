"""Large, valid inventories of the shape ``nix eval FLAKE#fleet`` yields, for scale tests
and benchmarks.

A real fleet of thousands of hosts is not at hand, and the inventory's cost must be known
before one is: this builds one as ``fleet/nix/inventory.nix`` would, deterministically
from a seed. Services have checks (HTTP, TCP, command), ports, secrets and dependencies on
one another; hosts have addresses (IPv4 mostly, some DNS names and IPv6), ed25519 host
keys and tags; the first hosts are the balancers and the monitoring server, so the
document also carries ``traffic``, ``monitoring`` and a canary analysis.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any

STEMS = (
    "api",
    "auth",
    "billing",
    "cache",
    "catalog",
    "checkout",
    "feed",
    "images",
    "mail",
    "queue",
    "search",
    "session",
    "store",
    "worker",
)
SECRETS_DIR = "/var/lib/fleet/secrets"


def host_name(index: int) -> str:
    """The name of the generated host ``index`` (counted from 0)."""
    return f"host-{index:05d}"


def service_name(index: int) -> str:
    """The name of the generated service ``index`` (counted from 0)."""
    return f"{STEMS[index % len(STEMS)]}-{index // len(STEMS):02d}"


@dataclass(frozen=True)
class _Service:
    name: str
    kind: str  # the type of its check: http, tcp or command
    port: int
    depends_on: tuple[str, ...]
    ingress: int | None  # the balancers' frontend port, when it has one
    metrics: bool
    secret: bool


def _services(count: int, rng: random.Random) -> list[_Service]:
    services = []
    for index in range(count):
        kind = rng.choices(("http", "tcp", "command"), weights=(6, 3, 1))[0]
        # Only on services declared before it: the dependencies are acyclic.
        depends_on = sorted(rng.sample(range(index), min(index, rng.randint(0, 2))))
        services.append(
            _Service(
                name=service_name(index),
                kind=kind,
                port=8000 + index,
                depends_on=tuple(service_name(d) for d in depends_on),
                ingress=20000 + index if kind != "command" and index % 4 == 0 else None,
                metrics=kind == "http" and index % 3 == 0,
                secret=index % 7 == 0,
            )
        )
    return services


def _check(service: _Service) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": service.name,
        "service": service.name,
        "type": service.kind,
        "timeout": 2,
        "interval": 1,
        "retries": 30,
    }
    if service.kind == "http":
        expect_body = "ok" if service.port % 2 else None
        return {
            **base,
            "port": service.port,
            "path": "/health",
            "expectStatus": 200,
            "expectBody": expect_body,
        }
    if service.kind == "tcp":
        return {**base, "port": service.port}
    return {**base, "command": ["systemctl", "is-active", f"{service.name}.service"]}


def _address(index: int) -> str:
    if index % 25 == 24:
        return f"2001:db8::{index + 1:x}"
    if index % 10 == 9:
        return f"{host_name(index)}.dc{index % 3 + 1}.example.org"
    n = index + 1
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def _host_key(rng: random.Random) -> str:
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + rng.randbytes(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} root@fleet"


def inventory_document(
    hosts: int, services: int = 100, per_host: int = 10, seed: int = 0
) -> dict[str, Any]:
    """A valid inventory of ``hosts`` hosts, each running ``per_host`` of ``services``.

    Hosts 0 and 1 are the balancers and host 2 the monitoring server (fewer hosts share
    those roles); every host runs services all the same.
    """
    if hosts < 1 or not 0 <= per_host <= services:
        raise ValueError("need at least one host and per_host <= services")
    rng = random.Random(seed)
    catalogue = _services(services, rng)
    balancers = sorted({host_name(i) for i in range(min(2, hosts))})
    monitor = host_name(min(2, hosts - 1))

    doc_hosts: dict[str, Any] = {}
    runs: dict[str, list[str]] = {s.name: [] for s in catalogue}
    for index in range(hosts):
        name = host_name(index)
        chosen = sorted(rng.sample(range(services), per_host))
        tags = [f"rack-{index % 40:02d}", f"zone-{'abc'[index % 3]}"]
        if index % 100 == 0:
            tags.append("canary")
        if name in balancers:
            tags.append("balancer")
        if name == monitor:
            tags.append("monitoring")
        checks = [_check(catalogue[i]) for i in chosen]
        checks.append(
            {
                "name": "sshd",
                "service": None,
                "type": "tcp",
                "port": 22,
                "timeout": 2,
                "interval": 1,
                "retries": 3,
            }
        )
        secrets = [
            {
                "service": s.name,
                "name": "db-password",
                "file": f"{s.name}-db-password",
                "path": f"{SECRETS_DIR}/{s.name}/db-password",
            }
            for s in (catalogue[i] for i in chosen)
            if s.secret
        ]
        doc_hosts[name] = {
            "address": _address(index),
            "sshPort": 22,
            "sshUser": "deploy" if index % 5 == 4 else "root",
            "tags": tags,
            "system": "aarch64-linux" if index % 8 == 7 else "x86_64-linux",
            "hostKey": None if index % 20 == 19 else _host_key(rng),
            "services": [catalogue[i].name for i in chosen],
            "checks": checks,
            "secrets": secrets,
        }
        for i in chosen:
            runs[catalogue[i].name].append(name)

    def instances(service: _Service) -> dict[str, Any]:
        return {
            h: {"address": doc_hosts[h]["address"], "port": service.port}
            for h in runs[service.name]
        }

    balanced = [s for s in catalogue if s.ingress is not None]
    traffic = {
        "agentPort": 9777,
        "drainTimeout": 30,
        "socket": "/run/haproxy/admin.sock",
        "balancers": balancers,
        "services": {
            s.name: {
                "mode": "http" if s.kind == "http" else "tcp",
                "port": s.ingress,
                "maxUnavailable": max(1, len(runs[s.name]) * 25 // 100),
                "instances": instances(s),
                "check": _check(s),
            }
            for s in balanced
        },
        "metricsPort": 8405,
    }
    watched = [s for s in catalogue if runs[s.name] and (s.metrics or s.kind != "command")]
    monitoring = {
        "servers": [monitor],
        "prometheusPort": 9090,
        "alertmanagerPort": 9093,
        "blackboxPort": 9115,
        "nodeExporterPort": 9100,
        "haproxyPort": 8405,
        "scrapeInterval": "15s",
        "webhook": "http://127.0.0.1:8000/hook",
        "textfileDirectory": "/var/lib/fleet-metrics",
        "nodes": {
            n: {"address": h["address"], "tags": list(h["tags"])} for n, h in doc_hosts.items()
        },
        "services": {
            s.name: {
                "metrics": {
                    h: {"address": doc_hosts[h]["address"], "port": s.port, "path": "/metrics"}
                    for h in runs[s.name]
                }
                if s.metrics
                else {},
                "probes": {
                    h: {"address": doc_hosts[h]["address"], "check": _check(s)}
                    for h in runs[s.name]
                }
                if s.kind != "command"
                else {},
            }
            for s in watched
        },
        "balancers": balancers,
    }
    analysis = []
    first = next((s for s in balanced if s.kind == "http"), None)
    if first is not None:
        responses = (
            'haproxy_server_http_responses_total{job="haproxy",proxy="{{service}}",'
            'server=~"{{hosts}}"%s}'
        )
        good, every = responses % ',code!="5xx"', responses % ""
        analysis.append(
            {
                "name": "success-rate",
                "query": f"sum(rate({good}[1m])) / sum(rate({every}[1m]))",
                "service": first.name,
                "interval": 10,
                "count": 3,
                "successCondition": "result >= 0.99",
                "failureLimit": 0,
                "inconclusiveLimit": 0,
            }
        )
    return {
        "schemaVersion": 1,
        "hosts": doc_hosts,
        "services": {s.name: {"dependsOn": list(s.depends_on)} for s in catalogue},
        "traffic": traffic if balanced else None,
        "monitoring": monitoring,
        "deploy": {
            "parallel": 8,
            "canary": 1,
            "canaryTag": "canary",
            "batchSize": "25%",
            "maxFailures": 0,
            "healthTimeout": 60,
            "confirmTimeout": 30,
            "analysis": analysis,
        },
    }
