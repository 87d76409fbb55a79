"""The fleet-level module: the example fleet, placement, discovery and the inventory."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from fleet.inventory import parse
from tests.nix.conftest import REPO, Nix


@pytest.fixture(scope="module")
def example(nix: Nix) -> Any:
    return nix.eval(
        """
        let b = h.example.config.build; in {
          inherit (b) inventory placement services;
          plans = builtins.mapAttrs (_: host: host.plan // {
            services = builtins.mapAttrs (_: s: removeAttrs s [ "package" ]) host.plan.services;
          }) b.hosts;
          moduleCounts = builtins.mapAttrs (_: host: builtins.length host.modules) b.hosts;
          systems = builtins.mapAttrs (_: host: host.system) b.hosts;
        }
        """
    )


@pytest.fixture(scope="module")
def good(nix: Nix) -> Any:
    return nix.eval(
        f"""
        let b = {nix.fleet("good.nix")}.config.build; in {{
          inherit (b) inventory placement services;
        }}
        """
    )


def test_example_inventory_passes_the_schema(example: Any) -> None:
    inventory = parse(example["inventory"], "the example fleet")
    assert sorted(inventory.hosts) == ["app1", "app2", "db1", "lb1", "lb2", "mon1"]
    app1 = inventory.hosts["app1"]
    assert (app1.address, app1.ssh_port, app1.ssh_user) == ("192.0.2.11", 22, "root")
    assert app1.tags == ("app",)
    assert inventory.deploy.canary == 1
    assert inventory.deploy.batch_size == 1
    assert inventory.deploy.health_timeout == 90
    assert inventory.monitoring is not None and inventory.monitoring.servers == ("mon1",)


def test_example_places_the_api_on_app_hosts_and_redis_on_the_data_host(example: Any) -> None:
    assert example["placement"] == {"api": ["app1", "app2"], "redis": ["db1"]}
    hosts = example["inventory"]["hosts"]
    assert hosts["app1"]["services"] == ["api"]
    assert hosts["db1"]["services"] == ["redis"]
    # The balancers run HAProxy, the monitoring host Prometheus: no service of the fleet.
    assert hosts["lb1"]["services"] == hosts["lb2"]["services"] == hosts["mon1"]["services"] == []


def test_example_checks(example: Any) -> None:
    hosts = example["inventory"]["hosts"]
    assert hosts["app2"]["checks"] == [
        {
            "name": "api",
            "service": "api",
            "type": "http",
            "port": 8080,
            "path": "/health",
            "expectStatus": 200,
            "expectBody": "ok",
            "timeout": 5,
            "interval": 1,
            "retries": 30,
        }
    ]
    (check,) = hosts["db1"]["checks"]
    assert (check["type"], check["port"], check["service"]) == ("tcp", 6379, "redis")
    assert "path" not in check and "command" not in check


def test_example_api_finds_redis(example: Any) -> None:
    assert example["services"]["api"]["dependencies"] == {"redis": ["192.0.2.21:6379"]}
    assert example["plans"]["app1"]["services"]["api"]["dependencies"] == {
        "redis": ["192.0.2.21:6379"]
    }


def test_example_host_modules(example: Any) -> None:
    # host module, plan, host name, common.nix; db1 adds db1.nix and redis's module
    assert example["moduleCounts"] == {
        "app1": 4,
        "app2": 4,
        "db1": 6,
        "lb1": 4,
        "lb2": 4,
        "mon1": 4,
    }
    assert set(example["systems"].values()) == {"x86_64-linux"}
    plan = example["plans"]["db1"]
    assert plan["services"]["redis"]["createUnit"] is False
    assert plan["services"]["redis"]["unit"] == "redis-main"
    assert plan["address"] == "192.0.2.21"


def test_fixture_inventory_with_every_check_type_passes_the_schema(good: Any) -> None:
    inventory = parse(good["inventory"], "tests/nix/fixtures/good.nix")
    worker = inventory.hosts["db1"].checks
    assert [c.name for c in worker] == ["cache", "worker"]
    assert worker[1].command == ("systemctl", "is-active", "fleet-worker.service")
    assert worker[1].port is None
    assert inventory.hosts["app2"].ssh_user == "deploy"
    assert inventory.hosts["db1"].ssh_port == 2222
    # services without a health check have no check
    assert [c.name for c in inventory.hosts["app1"].checks] == ["api"]


def test_deploy_defaults_come_from_the_inventory_producer(nix: Nix, good: Any) -> None:
    producer = nix.eval('(import (h.repo + "/fleet/nix/inventory.nix") { hosts = { }; }).deploy')
    assert good["inventory"]["deploy"] == producer


def test_discovery_lists_every_instance(good: Any) -> None:
    assert good["services"]["edge"]["dependencies"] == {"api": ["10.0.0.11:8080", "10.0.0.12:8080"]}
    assert good["services"]["api"]["addresses"] == ["10.0.0.11:8080", "10.0.0.12:8080"]


def rendezvous(service: str, hosts: list[str], replicas: int) -> list[str]:
    def weight(host: str) -> str:
        return hashlib.sha256(f"{service}/{host}".encode()).hexdigest()

    return sorted(sorted(hosts, key=weight)[:replicas])


PLACEMENT = """
let
  fleet = hostNames: h.evalFleet [ {{
    hosts = h.lib.genAttrs hostNames (name: {{
      address = "${{name}}.example.org";
      tags = [ "pool" ] ++ h.lib.optional (name != "e") "ssd";
    }});
    services.api = {{
      command = [ "/bin/api" ];
      ports = [ 80 ];
      placement = {{ tags = [ "pool" ]; replicas = 2; }};
    }};
    services.db = {{
      command = [ "/bin/db" ];
      placement = {{ tags = [ "pool" "ssd" ]; hosts = [ "a" "b" "e" ]; }};
    }};
  }} ];
in {{
  five = (fleet [ "a" "b" "c" "d" "e" ]).config.build.placement;
  again = (fleet [ "e" "d" "c" "b" "a" ]).config.build.placement;
  six = (fleet [ "a" "b" "c" "d" "e" "f" ]).config.build.placement;
  {extra}
}}
"""


@pytest.fixture(scope="module")
def placements(nix: Nix) -> Any:
    return nix.eval(PLACEMENT.format(extra=""))


def test_placement_is_rendezvous_hashing_of_service_and_host(placements: Any) -> None:
    assert placements["five"]["api"] == rendezvous("api", list("abcde"), 2)
    assert placements["six"]["api"] == rendezvous("api", list("abcdef"), 2)


def test_placement_is_deterministic(placements: Any) -> None:
    assert placements["five"] == placements["again"]


def test_adding_a_host_moves_at_most_one_replica(placements: Any) -> None:
    assert len(set(placements["five"]["api"]) & set(placements["six"]["api"])) >= 1


def test_placement_needs_all_tags_and_a_listed_host(placements: Any) -> None:
    # e lacks "ssd"; c and d are not listed
    assert placements["five"]["db"] == ["a", "b"]


def test_ipv6_addresses_and_dashed_names_in_discovery(nix: Nix) -> None:
    result = nix.eval(
        """
        let
          f = h.evalFleet [ {
            hosts.v6 = { address = "2001:db8::1"; };
            services.user-db = { command = [ "/bin/db" ]; ports = [ 5432 ]; };
            services.api = { command = [ "/bin/api" ]; dependsOn = [ "user-db" ]; };
          } ];
        in (h.hostConfig f "v6").systemd.services.fleet-api.environment
        """
    )
    assert result["FLEET_USER_DB_ADDRS"] == "[2001:db8::1]:5432"


def test_example_hosts_match_their_interface_whatever_its_name(nix: Nix) -> None:
    """Real NixOS hosts have predictable interface names (enp1s0, ens3): a network that
    matches `eth0` would leave a real host unreachable (the VM tests hide it, their
    framework turns predictable names off)."""
    common = nix.eval(
        'let m = import (h.repo + "/hosts/common.nix") '
        '{ config.fleet.address = "192.0.2.11"; inherit (h) lib; }; in '
        "{ inherit (m.networking) useNetworkd useDHCP; "
        'network = m.systemd.network.networks."10-fleet".matchConfig; '
        "interfaces = m.networking.interfaces or { }; }"
    )
    assert common["network"] == {"Type": "ether"}
    assert common["interfaces"] == {}
    assert common["useNetworkd"] is True and common["useDHCP"] is False
    for folder in ("hosts", "templates"):
        for module in (REPO / folder).rglob("*.nix"):
            assert "eth0" not in module.read_text(), module
