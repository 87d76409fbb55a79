"""Inventory validation and selectors: pure logic, no hosts."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from fleet.errors import InventoryError, UsageError
from fleet.inventory import (
    Balanced,
    CheckType,
    Instance,
    MetricsEndpoint,
    Monitoring,
    NodeTarget,
    Probe,
    Secret,
    Traffic,
    parse,
    select_names,
)

EXAMPLE = {
    "schemaVersion": 1,
    "hosts": {
        "web1": {
            "address": "192.0.2.11",
            "sshPort": 22,
            "sshUser": "root",
            "tags": ["web", "canary"],
            "system": "x86_64-linux",
            "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==",
            "services": ["api"],
            "secrets": [
                {
                    "service": "api",
                    "name": "db-password",
                    "file": "db-password",
                    "path": "/var/lib/fleet/secrets/api/db-password",
                },
                {
                    "service": "api",
                    "name": "tls.key",
                    "file": "api-tls.key",
                    "path": "/var/lib/fleet/secrets/api/tls.key",
                },
            ],
            "checks": [
                {
                    "name": "api",
                    "service": "api",
                    "type": "http",
                    "port": 8080,
                    "path": "/health",
                    "expectStatus": 200,
                    "expectBody": None,
                    "timeout": 2,
                    "interval": 1,
                    "retries": 3,
                }
            ],
        },
        "db1": {
            "address": "db1.example.org",
            "sshPort": 2222,
            "sshUser": "deploy",
            "tags": ["db"],
            "system": "aarch64-linux",
            "hostKey": None,
            "services": [],
            "checks": [
                {
                    "name": "redis",
                    "service": None,
                    "type": "command",
                    "command": ["redis-cli", "ping"],
                    "timeout": 2,
                    "interval": 1,
                    "retries": 3,
                }
            ],
        },
    },
    "deploy": {
        "parallel": 4,
        "canary": 1,
        "batchSize": "50%",
        "maxFailures": 0,
        "healthTimeout": 60,
        "confirmTimeout": 30,
    },
}


def test_example_parses():
    inv = parse(EXAMPLE, "example")
    assert inv.hosts["web1"].checks[0].type is CheckType.HTTP
    assert inv.hosts["db1"].checks[0].command == ("redis-cli", "ping")
    assert inv.deploy.batch_size == "50%"


def test_secrets_the_tool_uploads():
    inv = parse(EXAMPLE, "example")
    assert inv.hosts["web1"].secrets == (
        Secret("api", "db-password", "db-password", "/var/lib/fleet/secrets/api/db-password"),
        Secret("api", "tls.key", "api-tls.key", "/var/lib/fleet/secrets/api/tls.key"),
    )
    # A host without the field (an older producer) uploads nothing.
    assert "secrets" not in EXAMPLE["hosts"]["db1"]
    assert inv.hosts["db1"].secrets == ()


def _secret(data, **changes):
    data["hosts"]["web1"]["secrets"][0].update(changes)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _secret(d, name="../x"), "hosts.web1.secrets.0.name"),
        (lambda d: _secret(d, name="a:b"), "hosts.web1.secrets.0.name"),
        (lambda d: _secret(d, name="x\n"), "hosts.web1.secrets.0.name"),
        (lambda d: _secret(d, file="../../.ssh/id_ed25519"), "hosts.web1.secrets.0.file"),
        (lambda d: _secret(d, file="sub/file"), "hosts.web1.secrets.0.file"),
        (lambda d: _secret(d, file=".hidden"), "hosts.web1.secrets.0.file"),
        (lambda d: _secret(d, file=None), "hosts.web1.secrets.0.file"),
        (lambda d: _secret(d, service="-x"), "hosts.web1.secrets.0.service"),
        (lambda d: _secret(d, path="/etc/shadow"), "hosts.web1.secrets.0.path"),
        (
            lambda d: _secret(d, path="/var/lib/fleet/secrets/api/../../txn.json"),
            "hosts.web1.secrets.0.path",
        ),
        (
            lambda d: _secret(d, path="/var/lib/fleet/secrets/api/db-password\n"),
            "hosts.web1.secrets.0.path",
        ),
        (lambda d: _secret(d, upload=True), "upload"),
        (lambda d: d["hosts"]["web1"]["secrets"][0].pop("file"), "'file' is a required property"),
        # Valid on its own, but not where the host's unit loads the credential from.
        (
            lambda d: _secret(d, path="/var/lib/fleet/secrets/web/db-password"),
            "secret 'db-password' of service 'api' goes to "
            "'/var/lib/fleet/secrets/web/db-password', not "
            "'/var/lib/fleet/secrets/api/db-password'",
        ),
        (
            lambda d: d["hosts"]["web1"]["secrets"].append(d["hosts"]["web1"]["secrets"][0]),
            "hosts.web1.secrets: secret 'db-password' of service 'api' is listed twice",
        ),
    ],
)
def test_bad_secrets_name_the_field(mutate, message):
    assert_refused(mutate, message)


def assert_refused(mutate, message: str) -> None:
    """The example, changed by ``mutate``, is refused with one line holding ``message``."""
    data = copy.deepcopy(EXAMPLE)
    mutate(data)
    with pytest.raises(InventoryError) as error:
        parse(data, "example")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["hosts"]["web1"].update(sshPort=0), "hosts.web1.sshPort"),
        (lambda d: d["hosts"]["web1"].pop("address"), "'address' is a required property"),
        (lambda d: d["hosts"]["web1"].update(colour="red"), "colour"),
        (lambda d: d["hosts"]["web1"]["checks"][0].update(type="udp"), "hosts.web1.checks.0.type"),
        (lambda d: d["hosts"]["web1"]["checks"][0].pop("port"), "'port' is a required property"),
        (lambda d: d["deploy"].update(batchSize="150%"), "deploy.batchSize"),
        (lambda d: d.update(schemaVersion=2), "schemaVersion"),
        # What reaches a command line or a request: no trailing newline, no option, no CRLF.
        (lambda d: d["deploy"].update(batchSize="5%\n"), "deploy.batchSize"),
        (lambda d: d["hosts"]["web1"].update(address="-oProxyCommand=x"), "hosts.web1.address"),
        (lambda d: d["hosts"]["web1"].update(address="web1\n"), "hosts.web1.address"),
        # A bare address: the port is sshPort, IPv6 has no brackets.
        (lambda d: d["hosts"]["web1"].update(address="web1:22"), "hosts.web1.address"),
        (lambda d: d["hosts"]["web1"].update(address="192.0.2.11:22"), "hosts.web1.address"),
        (lambda d: d["hosts"]["web1"].update(address="[2001:db8::11]"), "hosts.web1.address"),
        (lambda d: d["hosts"]["web1"].update(address="root@web1"), "hosts.web1.address"),
        (lambda d: d["hosts"]["db1"].update(sshUser="deploy\n"), "hosts.db1.sshUser"),
        (
            lambda d: d["hosts"]["web1"]["checks"][0].update(path="/h HTTP/1.0\r\nX: y"),
            "hosts.web1.checks.0.path",
        ),
        (
            lambda d: d["hosts"]["db1"]["checks"].append(d["hosts"]["db1"]["checks"][0]),
            "check name 'redis' is used twice",
        ),
    ],
)
def test_bad_inventory_names_the_field(mutate, message):
    assert_refused(mutate, message)


@pytest.mark.parametrize(
    "address", ["192.0.2.11", "2001:db8::11", "::ffff:192.0.2.11", "web1", "web-1.example.org"]
)
def test_addresses_are_dns_names_or_bare_ip_addresses(address):
    data = copy.deepcopy(EXAMPLE)
    data["hosts"]["web1"]["address"] = address
    assert parse(data, "example").hosts["web1"].address == address


# The example with a balancer in front of web1's api.
TRAFFIC = {
    "agentPort": 9777,
    "drainTimeout": 30,
    "socket": "/run/haproxy/admin.sock",
    "balancers": ["lb1"],
    "services": {
        "api": {
            "mode": "http",
            "port": 80,
            "maxUnavailable": 1,
            "instances": {"web1": {"address": "192.0.2.11", "port": 8080}},
            "check": EXAMPLE["hosts"]["web1"]["checks"][0],
        },
        "redis": {
            "mode": "tcp",
            "port": 6379,
            "maxUnavailable": 2,
            "instances": {
                "web1": {"address": "192.0.2.11", "port": 6379},
                "db1": {"address": "db1.example.org", "port": 6379},
            },
            "check": None,
        },
    },
}


def balanced() -> dict:
    data = copy.deepcopy(EXAMPLE)
    data["hosts"]["lb1"] = {
        **copy.deepcopy(EXAMPLE["hosts"]["web1"]),
        "address": "192.0.2.31",
        "services": [],
        "checks": [],
        "secrets": [],
    }
    data["traffic"] = copy.deepcopy(TRAFFIC)
    return data


def test_traffic_parses():
    traffic = parse(balanced(), "example").traffic
    assert isinstance(traffic, Traffic)
    assert (traffic.agent_port, traffic.drain_timeout) == (9777, 30.0)
    assert traffic.socket == "/run/haproxy/admin.sock"
    assert traffic.balancers == ("lb1",)
    api = traffic.services["api"]
    assert api == Balanced(
        name="api",
        mode="http",
        port=80,
        max_unavailable=1,
        instances=(Instance("web1", "192.0.2.11", 8080),),
        check=parse(EXAMPLE, "example").hosts["web1"].checks[0],
    )
    redis = traffic.services["redis"]
    # Sorted by host, whatever the order of the inventory.
    assert [i.host for i in redis.instances] == ["db1", "web1"]
    assert (redis.mode, redis.max_unavailable, redis.check) == ("tcp", 2, None)


@pytest.mark.parametrize("value", ["absent", None])
def test_no_traffic(value):
    data = copy.deepcopy(EXAMPLE)
    if value is None:
        data["traffic"] = None
    assert parse(data, "example").traffic is None


def _refused_traffic(mutate, message: str) -> None:
    data = balanced()
    mutate(data["traffic"])
    with pytest.raises(InventoryError) as error:
        parse(data, "example")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def _api(traffic):
    return traffic["services"]["api"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t["balancers"].append("lb9"),
            "inventory from example: traffic.balancers: 'lb9' is not a host of the inventory",
        ),
        (
            lambda t: _api(t)["instances"].update(web9={"address": "192.0.2.19", "port": 8080}),
            "traffic.services.api.instances: 'web9' is not a host of the inventory",
        ),
        (lambda t: _api(t).update(mode="udp"), "traffic.services.api.mode"),
        (lambda t: _api(t).update(maxUnavailable=0), "traffic.services.api.maxUnavailable"),
        # A share is resolved by the producer: the tool reads a count.
        (lambda t: _api(t).update(maxUnavailable="25%"), "traffic.services.api.maxUnavailable"),
        (lambda t: _api(t).update(port=0), "traffic.services.api.port"),
        (lambda t: _api(t).pop("check"), "'check' is a required property"),
        (lambda t: _api(t)["check"].update(type="udp"), "traffic.services.api.check"),
        (
            lambda t: _api(t)["instances"]["web1"].update(address="192.0.2.11:8080"),
            "traffic.services.api.instances.web1.address",
        ),
        (
            lambda t: _api(t)["instances"]["web1"].update(address="[2001:db8::1]"),
            "traffic.services.api.instances.web1.address",
        ),
        (lambda t: t.update(socket="admin.sock"), "traffic.socket"),
        (lambda t: t.update(socket="/run/../etc/admin.sock"), "traffic.socket"),
        (lambda t: t.update(socket="/run/haproxy/admin.sock\n"), "traffic.socket"),
        (lambda t: t.update(agentPort=70000), "traffic.agentPort"),
        (lambda t: t.update(drainTimeout=0), "traffic.drainTimeout"),
        (lambda t: t["balancers"].append("lb1"), "traffic.balancers"),
        (lambda t: t.update(colour="red"), "colour"),
        (lambda t: t["services"].update({"-x": t["services"].pop("api")}), "traffic.services"),
    ],
)
def test_bad_traffic_names_the_field(mutate, message):
    _refused_traffic(mutate, message)


# The balanced example watched from lb1: web1's api serves metrics and is probed.
MONITORING = {
    "servers": ["lb1"],
    "prometheusPort": 9090,
    "alertmanagerPort": 9093,
    "blackboxPort": 9115,
    "nodeExporterPort": 9100,
    "haproxyPort": 8405,
    "scrapeInterval": "15s",
    "webhook": "http://127.0.0.1:8000/hook",
    "textfileDirectory": "/var/lib/fleet-metrics",
    "nodes": {
        "web1": {"address": "192.0.2.11", "tags": ["web", "canary"]},
        "lb1": {"address": "192.0.2.31", "tags": ["web", "canary"]},
    },
    "services": {
        "api": {
            "metrics": {"web1": {"address": "192.0.2.11", "port": 8080, "path": "/metrics"}},
            "probes": {
                "web1": {"address": "192.0.2.11", "check": EXAMPLE["hosts"]["web1"]["checks"][0]}
            },
        }
    },
    "balancers": ["lb1"],
}


def watched() -> dict:
    data = balanced()
    data["traffic"]["metricsPort"] = 8405
    data["monitoring"] = copy.deepcopy(MONITORING)
    return data


def test_monitoring_parses():
    inventory = parse(watched(), "example")
    assert inventory.traffic is not None and inventory.traffic.metrics_port == 8405
    monitoring = inventory.monitoring
    assert isinstance(monitoring, Monitoring)
    assert (monitoring.servers, monitoring.prometheus_port) == (("lb1",), 9090)
    assert monitoring.scrape_interval == "15s"
    # Sorted by host.
    assert monitoring.nodes == (
        NodeTarget("lb1", "192.0.2.31", ("web", "canary")),
        NodeTarget("web1", "192.0.2.11", ("web", "canary")),
    )
    api = monitoring.services["api"]
    assert api.metrics == (MetricsEndpoint("web1", "192.0.2.11", 8080, "/metrics"),)
    check = parse(EXAMPLE, "example").hosts["web1"].checks[0]
    assert api.probes == (Probe("web1", "192.0.2.11", check),)
    assert monitoring.balancers == ("lb1",)


@pytest.mark.parametrize("value", ["absent", None])
def test_no_monitoring(value):
    data = balanced()
    if value is None:
        data["monitoring"] = None
        data["traffic"]["metricsPort"] = None
    inventory = parse(data, "example")
    assert inventory.monitoring is None
    assert inventory.traffic is not None and inventory.traffic.metrics_port is None


def _watched_api(monitoring):
    return monitoring["services"]["api"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda m: m.update(servers=["mon9"]),
            "inventory from example: monitoring.servers: 'mon9' is not a host of the inventory",
        ),
        (lambda m: m.update(servers=[]), "monitoring.servers"),
        (lambda m: m["nodes"].update(web9=m["nodes"]["web1"]), "monitoring.nodes: 'web9'"),
        (lambda m: m.update(balancers=["lb9"]), "monitoring.balancers: 'lb9'"),
        (
            lambda m: _watched_api(m)["metrics"].update(web9=_watched_api(m)["metrics"]["web1"]),
            "monitoring.services.api.metrics: 'web9' is not a host of the inventory",
        ),
        (
            lambda m: _watched_api(m)["probes"]["web1"]["check"].update(service="worker"),
            "monitoring.services.api.probes.web1: the check is of service 'worker', not 'api'",
        ),
        (
            lambda m: _watched_api(m)["probes"]["web1"].update(
                check=EXAMPLE["hosts"]["db1"]["checks"][0]
            ),
            "monitoring.services.api.probes.web1.check",
        ),
        (
            lambda m: _watched_api(m)["metrics"]["web1"].update(path="/metrics#x"),
            "monitoring.services.api.metrics.web1.path",
        ),
        (lambda m: m.update(webhook="https://chat.example/$TOKEN"), "monitoring.webhook"),
        (lambda m: m.update(webhook="relay:8000"), "monitoring.webhook"),
        (lambda m: m.update(scrapeInterval="0s"), "monitoring.scrapeInterval"),
        (lambda m: m.update(textfileDirectory="/tmp"), "monitoring.textfileDirectory"),
        (lambda m: m.update(nodeExporterPort=0), "monitoring.nodeExporterPort"),
        (lambda m: m.pop("balancers"), "'balancers' is a required property"),
    ],
)
def test_bad_monitoring_names_the_field(mutate, message):
    data = watched()
    mutate(data["monitoring"])
    with pytest.raises(InventoryError) as error:
        parse(data, "example")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


NAMES = ["web1", "web2", "db1"]
TAGS = {"web1": ["web", "canary"], "web2": ["web"], "db1": ["db"]}


@pytest.mark.parametrize(
    ("selectors", "expected"),
    [
        ([], NAMES),
        (["db1"], ["db1"]),
        (["web*"], ["web1", "web2"]),
        (["@web"], ["web1", "web2"]),
        (["db1", "@canary"], ["web1", "db1"]),  # inventory order, not selector order
        (["web?", "web1"], ["web1", "web2"]),
    ],
)
def test_selectors(selectors, expected):
    assert select_names(NAMES, TAGS, selectors) == expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("web3", "no host 'web3'"),
        ("@cache", "no tag 'cache'"),
        ("x*", "no pattern 'x*'"),
    ],
)
def test_selector_matching_nothing_is_an_error(selector, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        select_names(NAMES, TAGS, ["web1", selector])


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="needs nix-instantiate")
def test_inventory_nix_fills_defaults_to_the_schema():
    """The Nix producer's defaults make a valid inventory from the least a fleet can say."""
    path = resources.files("fleet").joinpath("nix/inventory.nix")
    expr = (
        f'import {path} {{ hosts.a = {{ address = "192.0.2.1"; checks = [ '
        '{ name = "h"; type = "http"; port = 80; } '
        '{ name = "t"; type = "tcp"; port = 22; } ]; }; }'
    )
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inv = parse(json.loads(out), "inventory.nix")
    assert inv.hosts["a"].ssh_user == "root"
    assert inv.hosts["a"].checks[0].path == "/"
    assert inv.hosts["a"].secrets == ()


def test_the_documented_example_is_a_valid_inventory():
    """docs/inventory.md's example parses, and its services order the waves."""
    text = (Path(__file__).parents[2] / "docs" / "inventory.md").read_text()
    [block] = re.findall(r"## Example\n\n```json\n(.*?)```", text, re.S)
    inventory = parse(json.loads(block), "docs/inventory.md")
    assert inventory.depends_on == {"api": ("worker",), "worker": ()}
    assert inventory.deploy.canary_tag == "canary"
    assert inventory.traffic is not None
    assert inventory.traffic.balancers == ("lb1",)
    assert [i.host for i in inventory.traffic.services["api"].instances] == ["web1"]
    assert inventory.monitoring is not None
    assert inventory.monitoring.servers == inventory.monitoring.balancers == ("lb1",)


@pytest.mark.parametrize(("first", "second"), [("web1", "WEB1"), ("web1", "Web1"), ("a.b", "A.b")])
def test_host_names_differing_only_in_case_are_refused(first, second):
    """ssh matches a known_hosts name regardless of case: the key pinned for one host
    would pass for the other."""

    def twin(data):
        data["hosts"] = {first: data["hosts"]["web1"], second: data["hosts"]["db1"]}

    assert_refused(twin, f"hosts: {first!r} and {second!r} differ only in case")


def cached(at: str = "192.0.2.11", **changes) -> dict:
    """The example with web1, at address ``at``, as its binary cache host."""
    data = copy.deepcopy(EXAMPLE)
    address = data["hosts"]["web1"]["address"] = at
    bracketed = f"[{address}]" if ":" in address else address
    data["cache"] = {
        "host": "web1",
        "address": address,
        "port": 5080,
        "url": f"http://{bracketed}:5080",
        "publicKey": "fleet-cache-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs=",
        "directory": "/var/lib/fleet-cache",
    } | changes
    return data


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("192.0.2.11", "http://192.0.2.11:5080"),
        ("2001:db8::11", "http://[2001:db8::11]:5080"),
        ("cache.example.org", "http://cache.example.org:5080"),
    ],
)
def test_the_cache_url_is_its_hosts_address_and_port(address, url):
    cache = parse(cached(address), "example").cache
    assert cache is not None and (cache.host, cache.url) == ("web1", url)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # Shown on the terminal and handed to every host's fleet-host: no escape, no quote.
        ({"url": "http://\x1b[2J:5080"}, "cache.url"),
        ({"url": "http://a'b:5080"}, "cache.url"),
        ({"url": "http://a%b:5080"}, "cache.url"),
        ({"url": "http://a@b:5080"}, "cache.url"),
        ({"url": "http://c\u0430che.example.org:5080"}, "cache.url"),  # a Cyrillic a
        ({"url": "http://192.0.2.11:5080\n"}, "cache.url"),
        # Well formed, but not the cache host's own address and port.
        ({"url": "http://192.0.2.99:5080"}, "cache.url 'http://192.0.2.99:5080' is not"),
        ({"url": "http://192.0.2.11:5081"}, "is not 'http://192.0.2.11:5080'"),
        ({"url": "http://192.0.2.11:0"}, "is not 'http://192.0.2.11:5080'"),
        ({"url": "http://web1:5080"}, "is not 'http://192.0.2.11:5080'"),
        ({"address": "192.0.2.99"}, "cache.address '192.0.2.99' is not the address of host web1"),
        ({"host": "web9"}, "cache.host 'web9' is no host"),
    ],
)
def test_a_cache_url_other_than_its_hosts_is_refused(changes, message):
    data = cached(**changes)
    with pytest.raises(InventoryError) as error:
        parse(data, "example")
    assert message in str(error.value)
    assert "\n" not in str(error.value) and "\x1b" not in str(error.value)


def _every_duration(data: dict) -> list[tuple[str, dict, str]]:
    """Each duration field of the watched example: (where, its object, its key)."""
    web1 = data["hosts"]["web1"]
    api = data["traffic"]["services"]["api"]
    probe = data["monitoring"]["services"]["api"]["probes"]["web1"]
    return [
        ("hosts.web1.checks.0", web1["checks"][0], "timeout"),
        ("hosts.web1.checks.0", web1["checks"][0], "interval"),
        ("deploy", data["deploy"], "healthTimeout"),
        ("deploy", data["deploy"], "confirmTimeout"),
        ("traffic", data["traffic"], "drainTimeout"),
        ("traffic.services.api.check", api["check"], "timeout"),
        ("monitoring.services.api.probes.web1.check", probe["check"], "interval"),
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("seconds", [86400, 1e10, 1e300])
def test_durations_are_under_a_day(index, seconds):
    """Far longer would overflow the tool's timers in the middle of a deploy."""
    data = watched()
    where, holder, key = _every_duration(data)[index]
    holder[key] = seconds
    with pytest.raises(InventoryError, match=re.escape(f"{where}.{key}: ")):
        parse(data, "example")


@pytest.mark.parametrize(
    ("mutate", "read"),
    [
        (lambda d: d["hosts"]["web1"].update(sshPort=22.0), lambda i: i.hosts["web1"].ssh_port),
        (
            lambda d: d["hosts"]["web1"]["checks"][0].update(port=8080.0, expectStatus=200.0),
            lambda i: (i.hosts["web1"].checks[0].port, i.hosts["web1"].checks[0].expect_status),
        ),
        (
            lambda d: d["deploy"].update(parallel=4.0, canary=1.0, batchSize=2.0, maxFailures=0.0),
            lambda i: (
                i.deploy.parallel,
                i.deploy.canary,
                i.deploy.batch_size,
                i.deploy.max_failures,
            ),
        ),
        (
            lambda d: d["traffic"].update(agentPort=9777.0, metricsPort=8405.0),
            lambda i: (i.traffic.agent_port, i.traffic.metrics_port),
        ),
        (
            lambda d: d["traffic"]["services"]["api"].update(port=80.0, maxUnavailable=1.0),
            lambda i: (i.traffic.services["api"].port, i.traffic.services["api"].max_unavailable),
        ),
        (
            lambda d: d["traffic"]["services"]["api"]["instances"]["web1"].update(port=8080.0),
            lambda i: i.traffic.services["api"].instances[0].port,
        ),
        (
            lambda d: d["monitoring"].update(prometheusPort=9090.0, haproxyPort=8405.0),
            lambda i: (i.monitoring.prometheus_port, i.monitoring.haproxy_port),
        ),
        (
            lambda d: d["monitoring"]["services"]["api"]["metrics"]["web1"].update(port=8080.0),
            lambda i: i.monitoring.services["api"].metrics[0].port,
        ),
    ],
)
def test_a_whole_float_is_read_as_an_integer(mutate, read):
    """JSON Schema takes 22.0 for an integer; ssh's -p 22.0, a slice or a range would not."""
    data = watched()
    mutate(data)
    values = read(parse(data, "example"))
    for value in values if isinstance(values, tuple) else (values,):
        assert type(value) is int
