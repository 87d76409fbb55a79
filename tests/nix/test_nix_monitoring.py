"""Monitoring: the inventory's `monitoring`, the one generator of the monitoring hosts'
files (fleet/nix/prometheus.nix), checked by Prometheus's, Alertmanager's and the blackbox
exporter's own checkers and run against local targets, the problems of a declaration, and
the hosts' configurations (the node exporter, the metrics timer, the firewall)."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import InventoryError
from fleet.inventory import CheckType, MetricsEndpoint, NodeTarget, parse
from tests.nix.conftest import FIXTURES, Nix, nix_path

HOSTS = ["mon1", "app1", "db1", "lb1", "v6"]
MONITOR = "10.0.0.41"

HOST_VIEW = """
let
  c = h.hostConfig f {host};
  p = c.services.prometheus;
  bb = p.exporters.blackbox;
in {{
  prometheus = {{ inherit (p) enable listenAddress port configText checkConfig; }};
  alertmanager = {{ inherit (p.alertmanager) enable listenAddress port configText extraFlags; }};
  node = {{ inherit (p.exporters.node) enable port listenAddress enabledCollectors extraFlags; }};
  blackbox = {{ inherit (bb) enable listenAddress port; }}
    // (if bb.enable then {{ config = bb.configFile.text; }} else {{ }});
  metricsUnit = c.systemd.services.fleet-metrics or null;
  timers = c.systemd.timers;
  tmpfiles = c.systemd.tmpfiles.rules;
  iptables = c.networking.firewall.extraCommands;
  nftables = c.networking.firewall.extraInputRules;
  ports = c.networking.firewall.allowedTCPPorts;
  haproxy = c.services.haproxy.config;
  manifest = builtins.fromJSON c.environment.etc."fleet/manifest.json".text;
  inherit (c) warnings failedAssertions;
}}
"""

GENERATOR = 'import (h.repo + "/fleet/nix/prometheus.nix")'


def views(nix: Nix, fleet: str) -> dict[str, Any]:
    body = " ".join(f"{n} = {HOST_VIEW.format(host=json.dumps(n))};" for n in HOSTS)
    return nix.eval(  # type: ignore[no-any-return]
        f"let f = {fleet}; b = f.config.build; in {{ hosts = {{ {body} }}; "
        "inherit (b) inventory problems; "
        f'generated = {GENERATOR} {{ monitoring = b.inventory.monitoring; server = "mon1"; }}; }}'
    )


@pytest.fixture(scope="module")
def fixture(nix: Nix) -> dict[str, Any]:
    return views(nix, nix.fleet("monitoring.nix"))


@pytest.fixture(scope="module")
def files(fixture: dict[str, Any]) -> dict[str, Any]:
    """The generated files of the fixture's monitoring host, parsed."""
    generated = fixture["generated"]
    return {
        k: json.loads(generated[k]) for k in ("prometheus", "rules", "alertmanager", "blackbox")
    }


@pytest.fixture(scope="module")
def example(nix: Nix) -> dict[str, Any]:
    return nix.eval(  # type: ignore[no-any-return]
        "let b = h.example.config.build; in { inherit (b) inventory; "
        f'generated = {GENERATOR} {{ monitoring = b.inventory.monitoring; server = "mon1"; }}; }}'
    )


def generate(nix: Nix, monitoring: dict[str, Any], tmp_path: Path, server: str) -> dict[str, Any]:
    source = tmp_path / "monitoring.json"
    source.write_text(json.dumps(monitoring))
    return nix.eval(  # type: ignore[no-any-return]
        f"{GENERATOR} {{ monitoring = builtins.fromJSON (builtins.readFile {nix_path(source)}); "
        f"server = {json.dumps(server)}; }}"
    )


def job(prometheus: dict[str, Any], name: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = prometheus["scrape_configs"]
    [found] = [j for j in jobs if j["job_name"] == name]
    return found


def groups(prometheus: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """A job's target groups by their `host` (and `service`) label."""
    return {
        "/".join(filter(None, [g["labels"]["host"], g["labels"].get("service")])): g
        for g in job(prometheus, name)["static_configs"]
    }


# The inventory.


def test_the_inventory_says_what_the_monitoring_hosts_watch(fixture: dict[str, Any]) -> None:
    assert fixture["problems"] == []
    inventory = fixture["inventory"]
    monitoring = inventory["monitoring"]
    assert {k: v for k, v in monitoring.items() if k not in ("nodes", "services")} == {
        "servers": ["mon1"],
        "prometheusPort": 9090,
        "alertmanagerPort": 9093,
        "blackboxPort": 9115,
        "nodeExporterPort": 9100,
        "haproxyPort": 8405,
        "scrapeInterval": "15s",
        "webhook": "http://127.0.0.1:9095/alerts",
        "textfileDirectory": "/var/lib/fleet-metrics",
        "balancers": ["lb1", "lb2"],
    }
    hosts = inventory["hosts"]
    assert monitoring["nodes"] == {
        name: {"address": h["address"], "tags": h["tags"]} for name, h in hosts.items()
    }
    services = monitoring["services"]
    # batch has neither metrics nor a check; worker's check is a command.
    assert sorted(services) == ["api", "cache", "store", "worker"]
    assert services["api"]["metrics"] == {
        "app1": {"address": "10.0.0.11", "port": 8080, "path": "/metrics"},
        "app2": {"address": "10.0.0.12", "port": 8080, "path": "/metrics"},
    }
    assert services["store"]["metrics"] == {
        "v6": {"address": "2001:db8::41", "port": 9300, "path": "/_prometheus/metrics"}
    }
    assert services["cache"]["metrics"] == {}
    assert services["worker"] == {
        "metrics": {"db1": {"address": "10.0.0.21", "port": 9400, "path": "/metrics"}},
        "probes": {},
    }
    # Each probe is the host's own check, exactly as in its `checks`.
    for service in ("api", "cache", "store"):
        for host, probe in services[service]["probes"].items():
            assert probe["address"] == hosts[host]["address"]
            assert probe["check"] in hosts[host]["checks"]
    assert sorted(services["api"]["probes"]) == ["app1", "app2"]
    assert services["cache"]["probes"]["db1"]["check"]["type"] == "tcp"
    # The balancers serve HAProxy's exporter.
    assert inventory["traffic"]["metricsPort"] == 8405


def test_the_inventory_parses_into_monitoring(fixture: dict[str, Any]) -> None:
    monitoring = parse(fixture["inventory"], "tests/nix/fixtures/monitoring.nix").monitoring
    assert monitoring is not None
    assert (monitoring.servers, monitoring.prometheus_port) == (("mon1",), 9090)
    assert monitoring.textfile_directory == "/var/lib/fleet-metrics"
    assert monitoring.webhook == "http://127.0.0.1:9095/alerts"
    assert NodeTarget("v6", "2001:db8::41", ("v6",)) in monitoring.nodes
    assert [n.host for n in monitoring.nodes] == sorted(n.host for n in monitoring.nodes)
    store = monitoring.services["store"]
    assert store.metrics == (MetricsEndpoint("v6", "2001:db8::41", 9300, "/_prometheus/metrics"),)
    api = monitoring.services["api"]
    assert [p.host for p in api.probes] == ["app1", "app2"]
    assert api.probes[0].check.type is CheckType.HTTP
    assert api.probes[0].check.expect_body == 'say "ok" # $HOME \\ done'
    assert monitoring.services["worker"].probes == ()
    assert monitoring.balancers == ("lb1", "lb2")


def test_the_inventory_is_checked_against_its_hosts(fixture: dict[str, Any]) -> None:
    def broken(change: Callable[[dict[str, Any]], object]) -> str:
        inventory = json.loads(json.dumps(fixture["inventory"]))
        change(inventory["monitoring"])
        with pytest.raises(InventoryError) as error:
            parse(inventory, "test")
        return str(error.value)

    assert "monitoring.servers: 'mon9' is not a host" in broken(
        lambda m: m.update(servers=["mon9"])
    )
    assert "is not a host of the inventory" in broken(
        lambda m: m["services"]["api"]["metrics"].update(
            x={"address": "10.0.0.9", "port": 1, "path": "/"}
        )
    )
    assert "the check is of service 'api', not 'cache'" in broken(
        lambda m: m["services"]["cache"]["probes"]["db1"].update(
            check=m["services"]["api"]["probes"]["app1"]["check"]
        )
    )
    # The schema: a command check is never probed, `$` never reaches Alertmanager.
    assert "monitoring.services.worker.probes.db1.check" in broken(
        lambda m: m["services"]["worker"]["probes"].update(
            db1={
                "address": "10.0.0.21",
                "check": {"name": "worker", "service": "worker", "type": "command",
                          "command": ["true"], "timeout": 1, "interval": 1, "retries": 1},
            }
        )
    )  # fmt: skip
    assert "monitoring.webhook" in broken(lambda m: m.update(webhook="https://relay/$TOKEN"))
    assert "monitoring.scrapeInterval" in broken(lambda m: m.update(scrapeInterval="15"))
    assert "metrics.app1.path" in broken(
        lambda m: m["services"]["api"]["metrics"]["app1"].update(path="/metrics?x=1")
    )


def test_without_a_monitoring_host_there_is_no_monitoring(nix: Nix) -> None:
    body = " ".join(f"{n} = {HOST_VIEW.format(host=json.dumps(n))};" for n in ["app1", "lb1"])
    result = nix.eval(
        f"let f = {nix.fleet('traffic.nix')}; in "
        f"{{ inventory = f.config.build.inventory; hosts = {{ {body} }}; }}"
    )
    assert result["inventory"]["monitoring"] is None
    assert result["inventory"]["traffic"]["metricsPort"] is None
    for host in result["hosts"].values():
        assert host["node"]["enable"] is False and host["prometheus"]["enable"] is False
        assert host["metricsUnit"] is None and host["timers"] == {}
        assert "fleet-metrics" not in " ".join(host["tmpfiles"])
        assert "fleet node exporter" not in host["iptables"]
    assert "_prometheus" not in result["hosts"]["lb1"]["haproxy"]


def test_the_producer_derives_the_targets_from_the_hosts(nix: Nix) -> None:
    monitoring = nix.eval(
        """(import (h.repo + "/fleet/nix/inventory.nix") {
          hosts = {
            a = { address = "192.0.2.1"; tags = [ "web" "canary" ]; services = [ "web" "job" ];
                  checks = [
                    { name = "web"; service = "web"; type = "http"; port = 80; }
                    { name = "job"; service = "job"; type = "command"; command = [ "true" ]; }
                    { name = "disk"; service = null; type = "tcp"; port = 22; }
                  ]; };
            m = { address = "192.0.2.9"; };
          };
          monitoring = { servers = [ "m" ]; metrics.job = { port = 9000; }; };
        }).monitoring"""
    )
    assert monitoring["servers"] == ["m"]
    assert monitoring["nodes"] == {
        "a": {"address": "192.0.2.1", "tags": ["web", "canary"]},
        "m": {"address": "192.0.2.9", "tags": []},
    }
    assert monitoring["balancers"] == []
    # A command check and a check of no service are not probed.
    assert monitoring["services"] == {
        "job": {
            "metrics": {"a": {"address": "192.0.2.1", "port": 9000, "path": "/metrics"}},
            "probes": {},
        },
        "web": {
            "metrics": {},
            "probes": {
                "a": {
                    "address": "192.0.2.1",
                    "check": {
                        "name": "web",
                        "service": "web",
                        "type": "http",
                        "port": 80,
                        "path": "/",
                        "expectStatus": 200,
                        "expectBody": None,
                        "timeout": 5,
                        "interval": 1,
                        "retries": 30,
                    },
                }
            },
        },
    }
    none = nix.eval(
        """(import (h.repo + "/fleet/nix/inventory.nix") {
          hosts.a.address = "192.0.2.1"; monitoring = { servers = [ ]; };
        }).monitoring"""
    )
    assert none is None


# Problems of a declaration.


def problems(nix: Nix, declaration: str) -> list[str]:
    fleet = f"(h.evalFleet [ {nix_path(FIXTURES / 'monitoring.nix')} {declaration} ])"
    return nix.eval(f"{fleet}.config.build.problems")  # type: ignore[no-any-return]


def test_a_metrics_port_the_service_does_not_declare(nix: Nix) -> None:
    assert problems(nix, "{ services.api.metrics.port = h.lib.mkForce 9102; }") == [
        'service "api": metrics on port 9102, which the service does not declare (ports: 8080): '
        "add 9102 to `ports`, or set metrics.port to one of them"
    ]


def test_metrics_of_a_service_without_ports(nix: Nix) -> None:
    declaration = """{ services.exporter = {
        package = h.pkgs.fake "exporter"; placement.tags = [ "app" ]; metrics.port = 9102; }; }"""
    assert problems(nix, declaration) == [
        'service "exporter": metrics on port 9102, but the service declares no ports: '
        "add 9102 to `ports`"
    ]


def test_a_monitoring_port_claimed_by_a_service(nix: Nix) -> None:
    assert problems(nix, "{ monitoring.nodeExporterPort = 8080; }") == [
        f'host "{h}": port 8080 is claimed twice, by service "api" and the node exporter '
        "(monitoring.nodeExporterPort): set monitoring.nodeExporterPort to a port no host uses"
        for h in ("app1", "app2")
    ]
    assert problems(nix, "{ monitoring.alertmanagerPort = 22; }") == [
        'host "mon1": port 22 is claimed twice, by sshd (sshPort) and Alertmanager '
        "(monitoring.alertmanagerPort): set monitoring.alertmanagerPort to a port no host uses"
    ]
    assert problems(nix, "{ monitoring.prometheusPort = 9115; }") == [
        'host "mon1": port 9115 is claimed twice, by Prometheus (monitoring.prometheusPort) and '
        "the blackbox exporter (monitoring.blackboxPort): set monitoring.prometheusPort to a "
        "port no host uses"
    ]


def test_haproxys_exporter_and_a_frontend_on_one_port(nix: Nix) -> None:
    assert problems(nix, "{ monitoring.haproxyPort = 80; }") == [
        f'host "{h}": port 80 is claimed twice, by the balancers\' frontend of service "api" '
        "(ingress.port) and HAProxy's metrics exporter (monitoring.haproxyPort): give the "
        "frontend another ingress.port, or move the other off that port"
        for h in ("lb1", "lb2")
    ]


@pytest.mark.parametrize(
    ("declaration", "option"),
    [
        ('{ monitoring.webhook = h.lib.mkForce "https://a/$T"; }', "monitoring.webhook"),
        ('{ monitoring.webhook = h.lib.mkForce "relay:9095"; }', "monitoring.webhook"),
        ('{ monitoring.scrapeInterval = "15"; }', "monitoring.scrapeInterval"),
        ('{ services.api.metrics.path = "/metrics?all"; }', "services.api.metrics.path"),
        ('{ services.api.metrics.path = "metrics"; }', "services.api.metrics.path"),
    ],
)  # fmt: skip
def test_bad_values_fail_evaluation_naming_the_option(
    nix: Nix, declaration: str, option: str
) -> None:
    error = nix.error(
        f"(h.evalFleet [ {nix_path(FIXTURES / 'monitoring.nix')} {declaration} ])"
        ".config.build.inventory"
    )
    assert option in error


# The generator: prometheus.yml.


def test_prometheus_is_configured_for_its_host(
    files: dict[str, Any], fixture: dict[str, Any]
) -> None:
    prometheus = files["prometheus"]
    assert prometheus["global"] == {
        "scrape_interval": "15s",
        "evaluation_interval": "15s",
        "external_labels": {"monitor": "mon1"},
    }
    assert prometheus["rule_files"] == [fixture["generated"]["rulesFile"]]
    assert fixture["generated"]["rulesFile"].endswith("-fleet-rules.yml")
    assert prometheus["alerting"] == {
        "alertmanagers": [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]
    }
    assert [j["job_name"] for j in prometheus["scrape_configs"]] == [
        "node",
        "fleet-service",
        "fleet-health",
        "haproxy",
        "prometheus",
        "alertmanager",
    ]


def test_every_host_node_exporter_is_scraped(files: dict[str, Any]) -> None:
    node = groups(files["prometheus"], "node")
    assert sorted(node) == ["app1", "app2", "db1", "lb1", "lb2", "mon1", "v6"]
    assert node["app1"] == {
        "targets": ["10.0.0.11:9100"],
        "labels": {"host": "app1", "tags": ",app,"},
    }
    assert node["v6"]["targets"] == ["[2001:db8::41]:9100"]
    # No release label: each host says its own (fleet_release_info).
    assert all(set(g["labels"]) == {"host", "tags"} for g in node.values())


def test_each_instance_metrics_are_scraped(files: dict[str, Any]) -> None:
    service = groups(files["prometheus"], "fleet-service")
    assert sorted(service) == ["app1/api", "app2/api", "db1/worker", "v6/store"]
    assert service["app1/api"] == {
        "targets": ["10.0.0.11:8080"],
        "labels": {
            "host": "app1",
            "tags": ",app,",
            "service": "api",
            "__metrics_path__": "/metrics",
        },
    }
    assert service["v6/store"]["targets"] == ["[2001:db8::41]:9300"]
    assert service["v6/store"]["labels"]["__metrics_path__"] == "/_prometheus/metrics"


def test_each_instance_check_is_probed_through_the_blackbox_exporter(files: dict[str, Any]) -> None:
    health = job(files["prometheus"], "fleet-health")
    assert health["metrics_path"] == "/probe"
    probes = groups(files["prometheus"], "fleet-health")
    assert sorted(probes) == ["app1/api", "app2/api", "db1/cache", "v6/store"]
    assert probes["app1/api"] == {
        "targets": ["127.0.0.1:9115"],
        "labels": {
            "host": "app1",
            "tags": ",app,",
            "service": "api",
            "instance": "10.0.0.11:8080",
            "__param_module": "api",
            # The path as declared: quotes, `\`, `$` and `#` reach the exporter as they are.
            "__param_target": 'http://10.0.0.11:8080/health?q="a\\b"$HOME#top',
        },
    }
    assert probes["db1/cache"]["labels"]["__param_target"] == "10.0.0.21:6379"
    assert probes["v6/store"]["labels"]["__param_target"] == "http://[2001:db8::41]:9300/_ping"
    assert probes["v6/store"]["labels"]["instance"] == "[2001:db8::41]:9300"


def test_the_balancers_and_the_monitoring_programs_are_scraped(files: dict[str, Any]) -> None:
    prometheus = files["prometheus"]
    haproxy = groups(prometheus, "haproxy")
    assert haproxy["lb1"] == {
        "targets": ["10.0.0.31:8405"],
        "labels": {"host": "lb1", "tags": ",balancer,"},
    }
    assert sorted(haproxy) == ["lb1", "lb2"]
    own = {"host": "mon1", "tags": ",monitoring,"}
    assert job(prometheus, "prometheus")["static_configs"] == [
        {"targets": ["127.0.0.1:9090"], "labels": own}
    ]
    assert job(prometheus, "alertmanager")["static_configs"] == [
        {"targets": ["127.0.0.1:9093"], "labels": own}
    ]


def test_tags_are_written_between_commas(nix: Nix, tmp_path: Path) -> None:
    monitoring = monitoring_for(nodes={"a": ["web", "canary"], "b": []})
    prometheus = json.loads(generate(nix, monitoring, tmp_path, "a")["prometheus"])
    node = groups(prometheus, "node")
    assert node["a"]["labels"]["tags"] == ",web,canary,"
    assert node["b"]["labels"]["tags"] == ","
    assert re.fullmatch(".*,web,.*", node["a"]["labels"]["tags"])
    assert not re.fullmatch(".*,web,.*", ",webserver,")
    # Without services or balancers, their jobs are left out.
    assert [j["job_name"] for j in prometheus["scrape_configs"]] == [
        "node",
        "prometheus",
        "alertmanager",
    ]


# The generator: blackbox.yml, alertmanager.yml, the rules.


def test_one_blackbox_module_per_probed_service(files: dict[str, Any]) -> None:
    modules = files["blackbox"]["modules"]
    assert sorted(modules) == ["api", "cache", "store"]
    assert modules["api"] == {
        "prober": "http",
        "timeout": "5000ms",
        "http": {
            "method": "GET",
            "valid_status_codes": [200],
            "follow_redirects": False,
            # The expected text, its metacharacters escaped: the body contains it.
            "fail_if_body_not_matches_regexp": ['say "ok" # \\$HOME \\\\ done'],
        },
    }
    assert modules["cache"] == {"prober": "tcp", "timeout": "5000ms"}
    assert modules["store"]["timeout"] == "500ms"
    assert "fail_if_body_not_matches_regexp" not in modules["store"]["http"]


HOSTILE = 'a.b*c+d?e(f)g|h[i]j{k}l^m$n\\o "p" #q\nr\ts\x7fu\u0085v\u00e9w\ufffex'


def test_an_expected_body_becomes_a_literal_regular_expression(nix: Nix, tmp_path: Path) -> None:
    monitoring = monitoring_for(
        nodes={"a": []}, probes={"web": ("a", http_check("web", "/", HOSTILE))}
    )
    [regexp] = json.loads(generate(nix, monitoring, tmp_path, "a")["blackbox"])["modules"]["web"][
        "http"
    ]["fail_if_body_not_matches_regexp"]
    assert regexp == (
        'a\\.b\\*c\\+d\\?e\\(f\\)g\\|h\\[i\\]j\\{k\\}l\\^m\\$n\\\\o "p" #q\\x{000a}r'
        "\\x{0009}s\\x{007f}u\\x{0085}v\u00e9w\\x{fffe}x"
    )
    # Python's re reads these escapes as RE2 does, but for \x{..}.
    python = re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", regexp)
    assert re.search(python, f"<html>{HOSTILE}</html>")
    assert not re.search(python, HOSTILE.replace("*", "x"))


def test_alertmanager_sends_everything_to_the_webhook(files: dict[str, Any]) -> None:
    alertmanager = files["alertmanager"]
    assert alertmanager["route"] == {
        "receiver": "fleet-webhook",
        "group_by": ["alertname", "host"],
        "group_wait": "30s",
        "group_interval": "5m",
        "repeat_interval": "4h",
    }
    assert alertmanager["receivers"] == [
        {
            "name": "fleet-webhook",
            "webhook_configs": [{"url": "http://127.0.0.1:9095/alerts", "send_resolved": True}],
        }
    ]
    assert alertmanager["inhibit_rules"] == [
        {
            "source_matchers": ['alertname="FleetHostDown"'],
            "target_matchers": ['alertname="FleetHealthCheckFailing"'],
            "equal": ["host"],
        }
    ]


def test_without_a_webhook_alerts_go_nowhere(nix: Nix, tmp_path: Path) -> None:
    alertmanager = json.loads(
        generate(nix, monitoring_for(nodes={"a": []}), tmp_path, "a")["alertmanager"]
    )
    assert alertmanager["route"]["receiver"] == "fleet-null"
    assert alertmanager["receivers"] == [{"name": "fleet-null"}]


ALERTS = {
    "FleetHostDown": ("critical", "2m"),
    "FleetUnitFailed": ("warning", "2m"),
    "FleetHealthCheckFailing": ("critical", "2m"),
    "FleetGenerationDrift": ("warning", "10m"),
    "FleetReleaseBehind": ("warning", "30m"),
    "FleetLockHeldTooLong": ("warning", None),
    "FleetRecentRollback": ("warning", None),
    "FleetMetricsStale": ("warning", None),
    "FleetMetricsMissing": ("warning", "10m"),
    "FleetInstanceOutOfRotation": ("warning", "10m"),
}


def test_the_rules_that_ship_with_the_fleet(files: dict[str, Any]) -> None:
    recording, alerting = files["rules"]["groups"]
    assert recording["name"] == "fleet-release"
    records = {r["record"]: r["expr"] for r in recording["rules"]}
    assert records["fleet:up:release"] == "up * on(host) group_left(release) fleet_release_info"
    assert set(records) == {
        "fleet:up:release",
        "fleet:probe_success:release",
        "fleet:release:hosts",
        "fleet:release:latest",
    }
    alerts = {a["alert"]: a for a in alerting["rules"]}
    assert {name: (a["labels"]["severity"], a.get("for")) for name, a in alerts.items()} == ALERTS
    for alert in alerts.values():
        assert set(alert["annotations"]) == {"summary", "description"}
        for text in alert["annotations"].values():
            assert "{{ $labels.host }}" in text, alert["alert"]
    assert alerts["FleetHostDown"]["expr"] == 'up{job="node"} == 0'
    assert alerts["FleetHealthCheckFailing"]["expr"] == 'probe_success{job="fleet-health"} == 0'


def test_the_example_is_watched(example: dict[str, Any]) -> None:
    monitoring = example["inventory"]["monitoring"]
    assert monitoring["servers"] == ["mon1"]
    assert sorted(monitoring["services"]) == ["api", "redis"]
    assert monitoring["services"]["api"]["metrics"] == {}  # the example API serves none
    modules = json.loads(example["generated"]["blackbox"])["modules"]
    assert modules["api"]["http"]["fail_if_body_not_matches_regexp"] == ["ok"]
    assert modules["redis"] == {"prober": "tcp", "timeout": "5000ms"}


def monitoring_for(
    *,
    nodes: dict[str, list[str]],
    address: str = "127.0.0.1",
    metrics: dict[str, tuple[str, int, str]] | None = None,
    probes: dict[str, tuple[str, dict[str, Any]]] | None = None,
    balancers: list[str] | None = None,
    ports: dict[str, int] | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """A normalised `monitoring`: hosts (their tags) all at `address`; per service one
    metrics endpoint (host, port, path) and one probed check (host, check)."""
    return {
        "servers": [next(iter(nodes))],
        "prometheusPort": 9090,
        "alertmanagerPort": 9093,
        "blackboxPort": 9115,
        "nodeExporterPort": 9100,
        "haproxyPort": 8405,
        "scrapeInterval": "15s",
        "webhook": webhook,
        "textfileDirectory": "/var/lib/fleet-metrics",
        **(ports or {}),
        "nodes": {h: {"address": address, "tags": tags} for h, tags in nodes.items()},
        "services": {
            s: {
                "metrics": {
                    host: {"address": address, "port": port, "path": path}
                    for host, port, path in ([(metrics or {})[s]] if s in (metrics or {}) else [])
                },
                "probes": {
                    host: {"address": address, "check": check}
                    for host, check in ([(probes or {})[s]] if s in (probes or {}) else [])
                },
            }
            for s in sorted({*(metrics or {}), *(probes or {})})
        },
        "balancers": balancers or [],
    }


def http_check(service: str, path: str, body: str | None, port: int = 8080) -> dict[str, Any]:
    return {
        "name": service,
        "service": service,
        "type": "http",
        "port": port,
        "path": path,
        "expectStatus": 200,
        "expectBody": body,
        "timeout": 2,
        "interval": 1,
        "retries": 3,
    }


def _refused(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    monitoring = monitoring_for(
        nodes={"a": ["web"]},
        metrics={"web": ("a", 8080, "/metrics")},
        probes={"web": ("a", http_check("web", "/health", "ok"))},
        balancers=["a"],
    )
    change(monitoring)
    return monitoring


REFUSED: dict[str, Callable[[dict[str, Any]], object]] = {
    "server": lambda m: m.update(servers=["b"]),
    "host name": lambda m: m["nodes"].update({"a b": {"address": "192.0.2.2", "tags": []}}),
    "tag": lambda m: m["nodes"]["a"].update(tags=["a,b"]),
    "address": lambda m: m["nodes"]["a"].update(address="192.0.2.1 x"),
    "port": lambda m: m.update(nodeExporterPort=0),
    "scrape interval": lambda m: m.update(scrapeInterval="1 m"),
    "webhook": lambda m: m.update(webhook="https://chat.example/hook?token=$TOKEN"),
    "metrics path": lambda m: m["services"]["web"]["metrics"]["a"].update(path="/m?x=1"),
    "unknown host": lambda m: m["services"]["web"]["metrics"].update(
        {"z": {"address": "192.0.2.3", "port": 1, "path": "/"}}
    ),
    "health check path": lambda m: m["services"]["web"]["probes"]["a"]["check"].update(path="/a b"),
    "expected status": lambda m: m["services"]["web"]["probes"]["a"]["check"].update(
        expectStatus="200"
    ),
    "check timeout": lambda m: m["services"]["web"]["probes"]["a"]["check"].update(timeout=0),
    "command check": lambda m: m["services"]["web"]["probes"]["a"]["check"].update(type="command"),
    "differing checks": lambda m: m["services"]["web"]["probes"].update(
        {"b": {"address": "127.0.0.1", "check": http_check("web", "/other", None)}}
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_written_safely_is_refused(nix: Nix, tmp_path: Path, case: str) -> None:
    monitoring = _refused(REFUSED[case])
    if case == "differing checks":
        monitoring["nodes"]["b"] = {"address": "127.0.0.1", "tags": []}
    source = tmp_path / "monitoring.json"
    source.write_text(json.dumps(monitoring))
    error = nix.error(
        f"builtins.toJSON ({GENERATOR} {{ monitoring = builtins.fromJSON "
        f'(builtins.readFile {nix_path(source)}); server = "a"; }})'
    )
    assert "fleet/nix/prometheus.nix:" in error and "cannot be written" in error, error


# The hosts.


def test_the_monitoring_host_runs_prometheus_on_loopback(fixture: dict[str, Any]) -> None:
    mon1 = fixture["hosts"]["mon1"]
    generated = fixture["generated"]
    assert mon1["prometheus"] == {
        "enable": True,
        "listenAddress": "127.0.0.1",
        "port": 9090,
        "configText": generated["prometheus"],
        "checkConfig": True,
    }
    assert mon1["alertmanager"] == {
        "enable": True,
        "listenAddress": "127.0.0.1",
        "port": 9093,
        "configText": generated["alertmanager"],
        "extraFlags": ["--cluster.listen-address="],
    }
    assert mon1["blackbox"] == {
        "enable": True,
        "listenAddress": "127.0.0.1",
        "port": 9115,
        "config": generated["blackbox"],
    }
    # Nothing of it is open: the tool reaches Prometheus through ssh.
    assert mon1["ports"] == []
    for port in (9090, 9093, 9115):
        assert f"--dport {port} " not in mon1["iptables"]
    assert mon1["failedAssertions"] == [] and mon1["warnings"] == []
    for host in ("app1", "lb1"):
        other = fixture["hosts"][host]
        assert other["prometheus"]["enable"] is other["alertmanager"]["enable"] is False
        assert other["blackbox"]["enable"] is False


def test_every_host_runs_the_node_exporter_and_writes_its_metrics(fixture: dict[str, Any]) -> None:
    for name, host in fixture["hosts"].items():
        assert host["node"] == {
            "enable": True,
            "port": 9100,
            "listenAddress": "0.0.0.0",
            "enabledCollectors": ["systemd"],
            "extraFlags": ["--collector.textfile.directory=/var/lib/fleet-metrics"],
        }, name
        assert "d /var/lib/fleet-metrics 0755 root root - -" in host["tmpfiles"]
        assert host["timers"] == {
            "fleet-metrics": {
                "description": "Write the host's deploy state for the node exporter every minute",
                "wantedBy": ["timers.target"],
                "timerConfig": {"OnCalendar": "minutely", "AccuracySec": "5s"},
            }
        }
    unit = fixture["hosts"]["app1"]["metricsUnit"]
    assert unit["wantedBy"] == []  # the timer starts it
    config = unit["serviceConfig"]
    expected = {
        "Type": "oneshot",
        # A run that fails leaves no failed unit (a deploy's health check would fail).
        "ExecStart": "-/run/current-system/sw/bin/fleet-host metrics",
        "StateDirectory": "fleet-metrics",
        "StateDirectoryMode": "0755",
        "ProtectSystem": "strict",
        "PrivateNetwork": True,
        "RestrictAddressFamilies": "none",
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": True,
    }
    assert {k: config.get(k) for k in expected} == expected
    # Root, for the root-only deploy state under /var/lib/fleet.
    assert "User" not in config and "DynamicUser" not in config


def iptables(port: int, sources: list[str]) -> list[str]:
    return [
        f"{'ip6tables' if ':' in s else 'iptables'} -w -A nixos-fw -p tcp --dport {port} "
        f"-s {s} -j nixos-fw-accept"
        for s in sources
    ]


def section(script: str, what: str) -> list[str]:
    """The rules under one `# what` comment of an iptables script."""
    lines = script.splitlines()
    start = lines.index(f"# {what}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start:end]


def test_the_monitoring_host_alone_reaches_the_exporters(fixture: dict[str, Any]) -> None:
    hosts = fixture["hosts"]
    for host in hosts.values():
        assert section(host["iptables"], "fleet node exporter") == iptables(9100, [MONITOR])
    # HAProxy's exporter on the balancers, never to everyone.
    lb1 = hosts["lb1"]
    assert section(lb1["iptables"], "fleet haproxy metrics") == iptables(8405, [MONITOR])
    assert 8405 not in lb1["ports"]
    assert "fleet haproxy metrics" not in hosts["app1"]["iptables"]


def test_a_watched_service_is_open_to_the_monitoring_host(fixture: dict[str, Any]) -> None:
    hosts = fixture["hosts"]
    # batch is open to no one but the balancers (allowFrom = [ ]) and is not watched.
    assert section(hosts["app1"]["iptables"], "fleet service batch") == iptables(
        7000, ["10.0.0.31", "10.0.0.32"]
    )
    # worker keeps its ports to the fleet, the monitoring host among it; its metrics.
    assert MONITOR in hosts["db1"]["manifest"]["services"]["worker"]["allowFrom"]


def test_a_watched_service_with_allow_from_is_opened_to_the_monitoring_host(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "monitoring.nix")} {{
      services.api.allowFrom = [ "198.51.100.0/24" ];
    }} ])"""
    rules = nix.eval(f'(h.hostConfig {fleet} "app1").networking.firewall.extraCommands')
    assert section(rules, "fleet service api") == iptables(
        8080, ["198.51.100.0/24", "10.0.0.31", "10.0.0.32", MONITOR]
    )


def test_the_monitoring_rules_with_nftables(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {{
      imports = [ {nix_path(FIXTURES / "monitoring.nix")} ];
      hosts.lb1.modules = [ {{ networking.nftables.enable = true; }} ];
    }} ])"""
    rules = nix.eval(f'(h.hostConfig {fleet} "lb1").networking.firewall.extraInputRules')
    assert f'ip saddr {MONITOR} tcp dport 9100 accept comment "fleet node exporter"' in rules
    assert f'ip saddr {MONITOR} tcp dport 8405 accept comment "fleet haproxy metrics"' in rules


def test_monitoring_hosts_known_by_name_get_a_warning(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "monitoring.nix")} {{
      hosts.mon1.address = h.lib.mkForce "mon1.example.org";
    }} ])"""
    app1 = nix.eval(f'let c = h.hostConfig {fleet} "app1"; in {{ inherit (c) warnings; '
                    "rules = c.networking.firewall.extraCommands; }")  # fmt: skip
    assert section(app1["rules"], "fleet node exporter") == []
    assert [w for w in app1["warnings"] if "node exporter" in w] == [
        "fleet: host app1: the node exporter's port is open to the monitoring hosts, but the "
        "firewall cannot match DNS names (mon1.example.org): those monitoring hosts cannot "
        "scrape this host nor probe its services; declare the monitoring hosts by IP address."
    ]


def test_an_ipv6_monitoring_host_reaches_the_exporter_over_ipv6(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "monitoring.nix")} {{
      hosts.mon1.address = h.lib.mkForce "2001:db8::99";
    }} ])"""
    app1 = nix.eval(
        f'let c = h.hostConfig {fleet} "app1"; in {{ '
        "listen = c.services.prometheus.exporters.node.listenAddress; "
        "rules = c.networking.firewall.extraCommands; }"
    )
    assert app1["listen"] == "[::]"
    assert section(app1["rules"], "fleet node exporter") == iptables(9100, ["2001:db8::99"])


def test_the_metrics_unit_is_reserved(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "monitoring.nix")} {{
      services.batch.unit = "fleet-metrics";
    }} ])"""
    failed = nix.eval(f'(h.hostConfig {fleet} "app1").failedAssertions')
    assert len(failed) == 1 and "fleet-metrics" in failed[0]


def test_a_balancer_serves_haproxys_exporter(fixture: dict[str, Any]) -> None:
    config = fixture["hosts"]["lb1"]["haproxy"]
    block = config.split("\n\nfrontend _prometheus\n", 1)[1].splitlines()
    assert block == [
        "  mode http",
        "  bind :8405",
        "  http-request use-service prometheus-exporter if { path /metrics }",
        "  no log",
    ]


# The programs' own checkers.


def program(name: str, debian: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {debian})")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return program("promtool", "prometheus")


@pytest.fixture(scope="module")
def amtool() -> str:
    return program("amtool", "prometheus-alertmanager")


@pytest.fixture(scope="module")
def blackbox_exporter() -> str:
    return program("prometheus-blackbox-exporter", "prometheus-blackbox-exporter")


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def written(generated: dict[str, Any], folder: Path) -> Path:
    """prometheus.yml and its rules in `folder`, the rules named as they are there."""
    (folder / "rules.yml").write_text(generated["rules"])
    prometheus = json.loads(generated["prometheus"])
    prometheus["rule_files"] = [str(folder / "rules.yml")]
    (folder / "prometheus.yml").write_text(json.dumps(prometheus))
    return folder / "prometheus.yml"


def test_promtool_takes_the_configuration_and_its_rules(
    promtool: str, fixture: dict[str, Any], example: dict[str, Any], tmp_path: Path
) -> None:
    for name, generated in (("fixture", fixture["generated"]), ("example", example["generated"])):
        folder = tmp_path / name
        folder.mkdir()
        config = written(generated, folder)
        assert "SUCCESS: 1 rule files found" in run(promtool, "check", "config", str(config))
        assert "SUCCESS: 14 rules found" in run(
            promtool, "check", "rules", str(folder / "rules.yml")
        )


def test_amtool_takes_the_alertmanager_configuration(
    amtool: str, fixture: dict[str, Any], nix: Nix, tmp_path: Path
) -> None:
    with_webhook = tmp_path / "with.yml"
    with_webhook.write_text(fixture["generated"]["alertmanager"])
    assert "SUCCESS" in run(amtool, "check-config", str(with_webhook))
    without = tmp_path / "without.yml"
    without.write_text(
        generate(nix, monitoring_for(nodes={"a": []}), tmp_path, "a")["alertmanager"]
    )
    assert "SUCCESS" in run(amtool, "check-config", str(without))


def test_the_blackbox_exporter_takes_its_configuration(
    blackbox_exporter: str, fixture: dict[str, Any], nix: Nix, tmp_path: Path
) -> None:
    config = tmp_path / "blackbox.yml"
    config.write_text(fixture["generated"]["blackbox"])
    assert "Config file is ok" in run(
        blackbox_exporter, "--config.check", f"--config.file={config}"
    )
    monitoring = monitoring_for(
        nodes={"a": []}, probes={"web": ("a", http_check("web", "/", HOSTILE))}
    )
    config.write_text(generate(nix, monitoring, tmp_path, "a")["blackbox"])
    assert "Config file is ok" in run(
        blackbox_exporter, "--config.check", f"--config.file={config}"
    )
    config.write_text(generate(nix, monitoring_for(nodes={"a": []}), tmp_path, "a")["blackbox"])
    assert "Config file is ok" in run(
        blackbox_exporter, "--config.check", f"--config.file={config}"
    )


def test_haproxy_takes_the_balancers_configuration_with_its_exporter(
    fixture: dict[str, Any], tmp_path: Path
) -> None:
    haproxy = program("haproxy", "haproxy")
    config = tmp_path / "haproxy.cfg"
    config.write_text(fixture["hosts"]["lb1"]["haproxy"])
    run(haproxy, "-c", "-dW", "-f", str(config))


# promtool test rules: each alert fires in its case, and not otherwise.


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def on(host: str, **labels: str) -> dict[str, str]:
    """The labels of a series the node job scrapes from `host`."""
    return {"host": host, "job": "node", "instance": f"{host}:9100", "tags": ",web,", **labels}


def release(host: str, name: str, result: str) -> dict[str, str]:
    return on(host, release=name, action="deploy", result=result)


def releases(records: list[tuple[str, str, str, int]]) -> list[dict[str, str]]:
    """Each host's newest release record: (host, release, result, time)."""
    return [
        series("fleet_release_info", release(h, r, res), "1x40") for h, r, res, _ in records
    ] + [series("fleet_release_timestamp_seconds", on(h), f"{t}x40") for h, _, _, t in records]


def probe(host: str, job: str = "fleet-health") -> dict[str, str]:
    return {"job": job, "host": host, "service": "api", "instance": f"{host}:8080", "tags": ","}


def server(name: str, state: str) -> dict[str, str]:
    """An instance's state on balancer lb1, as HAProxy's exporter labels it."""
    labels = {"host": "lb1", "job": "haproxy", "instance": "lb1:8405", "tags": ",balancer,"}
    return {**labels, "proxy": "api", "server": name, "state": state}


def render(template: str, labels: dict[str, str], value: str) -> str:
    """What Prometheus makes of an annotation, for the few forms the rules use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return text.replace("{{ $value | humanizeDuration }}", value)


# alert -> (input series, evaluation time, the labels of each alert expected then, $value)
CASES: dict[str, tuple[list[dict[str, str]], str, list[dict[str, str]], str]] = {
    "FleetHostDown": (
        [series("up", on("a"), "1 0x5"), series("up", on("b"), "1x5")],
        "4m",
        [on("a")],
        "",
    ),
    "FleetUnitFailed": (
        [
            series("node_systemd_unit_state", on("a", name="x.service", state="failed"), "1x5"),
            series("node_systemd_unit_state", on("a", name="y.service", state="failed"), "0x5"),
            series("node_systemd_unit_state", on("a", name="y.service", state="active"), "1x5"),
        ],
        "3m",
        [on("a", name="x.service", state="failed")],
        "",
    ),
    "FleetHealthCheckFailing": (
        [
            series("probe_success", probe("a"), "0x5"),
            series("probe_success", probe("b"), "1x5"),
            series("probe_success", probe("c", job="other"), "0x5"),
        ],
        "3m",
        [probe("a")],
        "",
    ),
    "FleetGenerationDrift": (
        [
            series("fleet_generation_drift", on("a"), "1x15"),
            series("fleet_generation_drift", on("b"), "0x15"),
        ],
        "11m",
        [on("a")],
        "",
    ),
    # a and b run r2, the newest successful deploy (d's newer record rolled back): c is behind.
    "FleetReleaseBehind": (
        releases(
            [
                ("a", "r2", "deployed", 2000),
                ("b", "r2", "deployed", 1900),
                ("c", "r1", "deployed", 1000),
                ("d", "r2", "rolled-back", 2100),
            ]
        ),
        "31m",
        [release("c", "r1", "deployed")],
        "",
    ),
    "FleetLockHeldTooLong": (
        [
            series("fleet_lock_held_seconds", on("a"), "1000x3"),
            series("fleet_lock_held_seconds", on("b"), "100x3"),
        ],
        "1m",
        [on("a")],
        "16m 40s",
    ),
    "FleetRecentRollback": (
        [
            series("fleet_last_rollback_timestamp_seconds", on("a"), "6000x130"),
            series("fleet_last_rollback_timestamp_seconds", on("b"), "100x130"),
        ],
        "2h",
        [on("a")],
        "",
    ),
    "FleetMetricsStale": (
        [
            series("fleet_metrics_timestamp_seconds", on("a"), "100x30"),
            series("fleet_metrics_timestamp_seconds", on("b"), "0+60x30"),
        ],
        "20m",
        [on("a")],
        "",
    ),
    "FleetMetricsMissing": (
        [
            series("up", on("a"), "1x15"),
            series("up", on("b"), "1x15"),
            series("fleet_metrics_timestamp_seconds", on("b"), "0+60x15"),
        ],
        "11m",
        [on("a")],
        "",
    ),
    "FleetInstanceOutOfRotation": (
        [
            series("haproxy_server_status", server("app1", "UP"), "0x15"),
            series("haproxy_server_status", server("app1", "DRAIN"), "1x15"),
            series("haproxy_server_status", server("app2", "UP"), "1x15"),
            series("haproxy_server_status", server("app2", "DRAIN"), "0x15"),
        ],
        "11m",
        [server("app1", "UP")],
        "",
    ),
}

# Cases in which no alert may fire: a failed rollout every host reverted (the fleet's last
# release stays the one before), an alert still pending before its `for`.
QUIET: dict[str, tuple[list[dict[str, str]], str]] = {
    "FleetReleaseBehind": (
        releases(
            [
                ("a", "r1", "deployed", 1000),
                ("b", "r1", "deployed", 900),
                ("c", "r2", "rolled-back", 2000),
            ]
        ),
        "31m",
    ),
    "FleetHostDown": ([series("up", on("a"), "1 0x5")], "2m"),
    "FleetGenerationDrift": ([series("fleet_generation_drift", on("a"), "1x15")], "9m"),
}


def sample(record: str, labels: dict[str, str], value: float) -> dict[str, Any]:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"labels": f"{record}{{{inner}}}", "value": value}


def rule_tests(alerts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    tests = []
    for name, (inputs, at, expected, value) in CASES.items():
        annotations = alerts[name]["annotations"]
        severity = alerts[name]["labels"]["severity"]
        exp_alerts = [
            {
                "exp_labels": {**labels, "severity": severity},
                "exp_annotations": {k: render(v, labels, value) for k, v in annotations.items()},
            }
            for labels in expected
        ]
        tests.append(
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp_alerts}],
            }
        )
    for name, (inputs, at) in QUIET.items():
        tests.append(
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
            }
        )
    # The recording rules: the release joined to what is scraped.
    api = {"host": "a", "job": "fleet-service", "instance": "a:8080", "tags": ",web,"}
    tests.append(
        {
            "interval": "1m",
            "input_series": [
                series("up", on("a"), "1x3"),
                series("up", {**api, "service": "api"}, "0x3"),
                *releases([("a", "r2", "deployed", 2000)]),
            ],
            "promql_expr_test": [
                {
                    "expr": "fleet:up:release",
                    "eval_time": "2m",
                    "exp_samples": [
                        sample("fleet:up:release", on("a", release="r2"), 1),
                        sample("fleet:up:release", {**api, "service": "api", "release": "r2"}, 0),
                    ],
                },
                {
                    "expr": "fleet:release:hosts",
                    "eval_time": "2m",
                    "exp_samples": [sample("fleet:release:hosts", {"release": "r2"}, 1)],
                },
                {
                    "expr": "fleet:release:latest",
                    "eval_time": "2m",
                    "exp_samples": [
                        sample("fleet:release:latest", release("a", "r2", "deployed"), 1)
                    ],
                },
            ],
        }
    )
    return tests


def test_each_alert_fires_in_its_case_and_not_otherwise(
    promtool: str, fixture: dict[str, Any], files: dict[str, Any], tmp_path: Path
) -> None:
    alerts = {a["alert"]: a for a in files["rules"]["groups"][1]["rules"]}
    assert set(CASES) == set(alerts)
    (tmp_path / "rules.yml").write_text(fixture["generated"]["rules"])
    unit = tmp_path / "tests.yml"
    unit.write_text(
        json.dumps(
            {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": rule_tests(alerts)}
        )
    )
    assert "SUCCESS" in run(promtool, "test", "rules", str(unit), cwd=tmp_path)


# The programs, run: Prometheus scrapes a node exporter's textfile and an instance, and
# probes its check through the blackbox exporter; HAProxy's exporter says what the alert
# reads.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BODY = f"<p>{HOSTILE}</p>"


class Instance(http.server.BaseHTTPRequestHandler):
    """An instance: its health on /health, its metrics on /m/metrics."""

    def do_GET(self) -> None:
        if self.path == "/health":
            status, body = 200, BODY.encode()
        elif self.path == "/m/metrics":
            status, body = 200, b"# TYPE instance_up gauge\ninstance_up 1\n"
        else:
            status, body = 404, b"not here"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{Path(argv[0]).name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(10)


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as answer:
        result: list[dict[str, Any]] = json.load(answer)["data"]["result"]
        return result


def test_prometheus_scrapes_and_probes_as_configured(
    nix: Nix, promtool: str, blackbox_exporter: str, tmp_path: Path
) -> None:
    prometheus = program("prometheus", "prometheus")
    node_exporter = program("prometheus-node-exporter", "prometheus-node-exporter")
    ports = {k: free_port() for k in ("prometheusPort", "alertmanagerPort", "blackboxPort",
                                      "nodeExporterPort")}  # fmt: skip
    textfiles = tmp_path / "fleet-metrics"
    textfiles.mkdir()
    (textfiles / "fleet.prom").write_text(
        'fleet_release_info{release="r7",action="deploy",result="deployed"} 1\n'
        f"fleet_metrics_timestamp_seconds {time.time():.0f}\n"
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Instance)
    web = server.server_address[1]
    monitoring = monitoring_for(
        nodes={"a": ["web", "canary"]},
        metrics={"api": ("a", web, "/m/metrics")},
        probes={
            "api": ("a", http_check("api", "/health", HOSTILE, port=web)),
            # The same answer, without the text this one expects.
            "other": ("a", http_check("other", "/health", HOSTILE + "!", port=web)),
        },
        ports=ports,
    )
    generated = generate(nix, monitoring, tmp_path, "a")
    config = json.loads(generated["prometheus"])
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "rules.yml").write_text(generated["rules"])
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    (tmp_path / "blackbox.yml").write_text(generated["blackbox"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with processes(tmp_path) as start:
            start(node_exporter, f"--web.listen-address=127.0.0.1:{ports['nodeExporterPort']}",
                  "--collector.disable-defaults", "--collector.textfile",
                  f"--collector.textfile.directory={textfiles}")  # fmt: skip
            start(blackbox_exporter, f"--web.listen-address=127.0.0.1:{ports['blackboxPort']}",
                  f"--config.file={tmp_path / 'blackbox.yml'}")  # fmt: skip
            start(prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                  f"--storage.tsdb.path={tmp_path / 'data'}",
                  f"--web.listen-address=127.0.0.1:{ports['prometheusPort']}")  # fmt: skip
            instance = f'service="api",instance="127.0.0.1:{web}"'
            wanted = {
                'up{job="node",host="a",tags=",web,canary,"}': 1.0,
                'fleet:up:release{job="node",host="a",release="r7"}': 1.0,
                f'up{{job="fleet-service",{instance}}}': 1.0,
                'instance_up{service="api",host="a"}': 1.0,
                f'probe_success{{job="fleet-health",{instance}}}': 1.0,
                'fleet:probe_success:release{service="api",release="r7"}': 1.0,
                'probe_success{job="fleet-health",service="other"}': 0.0,
            }
            found: dict[str, float] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and found != wanted:
                time.sleep(0.5)
                with contextlib.suppress(OSError, KeyError, ValueError):
                    found = {
                        e: float(r[0]["value"][1])
                        for e in wanted
                        if (r := query(ports["prometheusPort"], e))
                    }
            logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
            assert found == wanted, logs
    finally:
        server.shutdown()
        server.server_close()


def test_haproxys_exporter_reports_each_servers_state(
    fixture: dict[str, Any], tmp_path: Path
) -> None:
    """The series FleetInstanceOutOfRotation reads, from the generated frontend."""
    haproxy = program("haproxy", "haproxy")
    port = free_port()
    config = fixture["hosts"]["lb1"]["haproxy"]
    sock = tmp_path / "admin.sock"
    if len(str(sock)) > 100:
        pytest.skip(f"{sock}: too long a path for a unix socket")
    # Its own ports and socket; the instances are not there, so they are down.
    config = config.replace("bind :8405", f"bind 127.0.0.1:{port}")
    config = re.sub(r"bind :(\d+)", lambda _: f"bind 127.0.0.1:{free_port()}", config)
    config = config.replace("/run/haproxy/admin.sock", str(sock))
    (tmp_path / "haproxy.cfg").write_text(config)
    with processes(tmp_path) as start:
        proc = start(haproxy, "-f", str(tmp_path / "haproxy.cfg"))
        text = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "haproxy_server_status" not in text:
            time.sleep(0.3)
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            url = f"http://127.0.0.1:{port}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
    states = re.findall(r'haproxy_server_status\{proxy="api",server="app1",state="(\w+)"\}', text)
    assert "UP" in states and "DRAIN" in states and "MAINT" in states, text[:2000]
