"""The host module (nixosModules.default) on stubs of the NixOS options it sets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.nix.conftest import Nix

HOST_VIEW = """
let c = {config}; in {{
  units = c.systemd.services;
  ports = c.networking.firewall.allowedTCPPorts;
  etc = c.environment.etc;
  users = c.users.users;
  groups = builtins.attrNames c.users.groups;
  openssh = c.services.openssh;
  trusted = c.nix.settings.trusted-users;
  sudo = c.security.sudo.extraRules;
  switch = c.system.switch.enable;
  hostName = c.networking.hostName;
  platform = c.nixpkgs.hostPlatform;
  failed = c.failedAssertions;
}}
"""


@pytest.fixture(scope="module")
def hosts(nix: Nix) -> dict[str, Any]:
    fleet = nix.fleet("good.nix")
    names = ["app1", "app2", "db1"]
    views = " ".join(
        f"{n} = {HOST_VIEW.format(config=f'(h.hostConfig f {json.dumps(n)})')};" for n in names
    )
    return nix.eval(f"let f = {fleet}; in {{ {views} }}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def example(nix: Nix) -> dict[str, Any]:
    views = " ".join(
        f"{n} = {HOST_VIEW.format(config=f'(h.planConfig h.example {json.dumps(n)})')};"
        for n in ["app1", "db1"]
    )
    return nix.eval(f"{{ {views} }}")  # type: ignore[no-any-return]


def fleet_units(host: dict[str, Any]) -> list[str]:
    return sorted(u for u in host["units"] if u.startswith("fleet-"))


def test_each_placed_service_gets_a_unit(hosts: dict[str, Any]) -> None:
    assert fleet_units(hosts["app1"]) == ["fleet-api", "fleet-legacy"]
    assert fleet_units(hosts["app2"]) == ["fleet-api", "fleet-edge"]
    assert fleet_units(hosts["db1"]) == ["fleet-worker"]
    assert "cache" in hosts["db1"]["units"] and "cache" not in hosts["app1"]["units"]


def test_units_are_hardened(hosts: dict[str, Any]) -> None:
    api = hosts["app1"]["units"]["fleet-api"]
    config = api["serviceConfig"]
    assert api["wantedBy"] == ["multi-user.target"]
    assert (
        config["ExecStart"]
        == '"/nix/store/00000000000000000000000000000000-hello-api/bin/hello-api"'
    )
    expected = {
        "DynamicUser": True,
        "StateDirectory": "fleet-api",
        "ProtectSystem": "strict",
        "ProtectHome": True,
        "PrivateTmp": True,
        "NoNewPrivileges": True,
        "RestrictAddressFamilies": ["AF_INET", "AF_INET6", "AF_UNIX"],
        "SystemCallFilter": ["@system-service"],
        "CapabilityBoundingSet": "",
        "MemoryMax": "256M",
        "CPUQuota": "50%",
        "Restart": "on-failure",
        "RestartSec": 2,
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "AmbientCapabilities" not in config


def test_a_privileged_port_gets_only_the_bind_capability(hosts: dict[str, Any]) -> None:
    config = hosts["app2"]["units"]["fleet-edge"]["serviceConfig"]
    assert config["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert config["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_hardening_can_be_turned_off(hosts: dict[str, Any]) -> None:
    config = hosts["app1"]["units"]["fleet-legacy"]["serviceConfig"]
    assert "DynamicUser" not in config and "ProtectSystem" not in config
    assert config["StateDirectory"] == "fleet-legacy"


def test_arguments_are_quoted_for_systemd(hosts: dict[str, Any]) -> None:
    config = hosts["db1"]["units"]["fleet-worker"]["serviceConfig"]
    assert config["ExecStart"] == (
        '"/run/current-system/sw/bin/worker" "--greeting" "100%% $$HOME \\"quoted\\""'
    )
    assert (config["Restart"], config["RestartSec"]) == ("always", 5)


def test_local_dependencies_are_ordered_and_remote_ones_discovered(hosts: dict[str, Any]) -> None:
    worker = hosts["db1"]["units"]["fleet-worker"]
    assert worker["after"] == ["network.target", "cache.service"]
    assert worker["wants"] == ["cache.service"]
    assert worker["environment"]["FLEET_CACHE_ADDRS"] == "10.0.0.21:6379"
    api = hosts["app1"]["units"]["fleet-api"]
    assert api["after"] == ["network.target"] and api["wants"] == []
    assert api["environment"] == {
        "FLEET_CACHE_ADDRS": "10.0.0.21:6379",
        "FLEET_HOST": "app1",
        "FLEET_SERVICE": "api",
    }
    edge = hosts["app2"]["units"]["fleet-edge"]
    assert edge["after"] == ["network.target", "fleet-api.service"]


def test_a_module_run_service_keeps_its_unit_and_gets_limits(hosts: dict[str, Any]) -> None:
    cache = hosts["db1"]["units"]["cache"]
    assert cache["description"] == "cache from its own module"
    assert cache["serviceConfig"] == {
        "ExecStart": "/run/current-system/sw/bin/cache",
        "MemoryMax": "1G",
    }
    assert cache["environment"]["FLEET_SERVICE"] == "cache"


def test_ports_are_opened(hosts: dict[str, Any]) -> None:
    assert sorted(hosts["app1"]["ports"]) == [8080]
    assert sorted(hosts["app2"]["ports"]) == [443, 8080]
    # worker keeps 9000 closed
    assert sorted(hosts["db1"]["ports"]) == [6379]


def test_manifest(hosts: dict[str, Any]) -> None:
    manifest = json.loads(hosts["db1"]["etc"]["fleet/manifest.json"]["text"])
    assert manifest["host"] == "db1"
    assert manifest["address"] == "10.0.0.21"
    assert manifest["services"]["cache"] == {
        "unit": "cache.service",
        "managedBy": "nixos-module",
        "ports": [6379],
        "dependsOn": [],
        "dependencies": {},
    }
    assert manifest["services"]["worker"]["managedBy"] == "fleet"
    assert manifest["services"]["worker"]["dependencies"] == {"cache": ["10.0.0.21:6379"]}
    assert [c["name"] for c in manifest["checks"]] == ["cache", "worker"]


def test_manifest_checks_match_the_inventory(nix: Nix, hosts: dict[str, Any]) -> None:
    inventory = nix.eval(f"{nix.fleet('good.nix')}.config.build.inventory")
    for name, host in hosts.items():
        manifest = json.loads(host["etc"]["fleet/manifest.json"]["text"])
        assert manifest["checks"] == inventory["hosts"][name]["checks"]


def test_ssh_access_for_root(hosts: dict[str, Any]) -> None:
    app1 = hosts["app1"]
    assert app1["openssh"]["enable"] is True
    assert app1["openssh"]["ports"] == [22]
    assert app1["openssh"]["settings"]["AllowTcpForwarding"] is True
    assert app1["openssh"]["settings"]["PasswordAuthentication"] is False
    assert app1["users"]["root"]["openssh"]["authorizedKeys"]["keys"][0].startswith("ssh-ed25519 ")
    assert app1["trusted"] == ["root"]
    assert app1["sudo"] == []
    assert hosts["db1"]["openssh"]["ports"] == [2222]


def test_ssh_access_for_a_deploy_user(hosts: dict[str, Any]) -> None:
    app2 = hosts["app2"]
    deploy = app2["users"]["deploy"]
    assert deploy["isSystemUser"] is True and deploy["group"] == "deploy"
    assert deploy["useDefaultShell"] is True
    assert len(deploy["openssh"]["authorizedKeys"]["keys"]) == 1
    assert "deploy" in app2["groups"]
    assert app2["trusted"] == ["root", "deploy"]
    assert app2["sudo"] == [
        {"users": ["deploy"], "commands": [{"command": "ALL", "options": ["NOPASSWD"]}]}
    ]


def test_system_settings(hosts: dict[str, Any]) -> None:
    for name, host in hosts.items():
        assert host["switch"] is True
        assert host["hostName"] == name
        assert host["platform"] == "x86_64-linux"
        assert host["failed"] == []


def test_example_hosts(example: dict[str, Any]) -> None:
    api = example["app1"]["units"]["fleet-api"]
    assert api["environment"]["FLEET_REDIS_ADDRS"] == "192.0.2.21:6379"
    assert api["environment"]["API_VERSION"] == "1"
    assert api["serviceConfig"]["ExecStart"].endswith('/bin/callPackage-api" "--port" "8080"')
    assert example["app1"]["ports"] == [8080]
    redis = example["db1"]["units"]["redis-main"]
    assert redis["serviceConfig"] == {"MemoryMax": "512M"}
    assert example["db1"]["ports"] == [6379]
    assert fleet_units(example["db1"]) == []
