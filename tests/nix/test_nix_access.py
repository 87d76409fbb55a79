"""Who may reach a service's ports: `allowFrom`, on both firewall backends of NixOS."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.nix.conftest import Nix

FIREWALL_VIEW = """
let c = h.hostConfig f {host}; in {{
  inherit (c.networking.firewall) allowedTCPPorts extraCommands extraStopCommands extraInputRules;
  inherit (c) warnings failedAssertions;
  allowFrom = builtins.mapAttrs (_: s: s.allowFrom) c.fleet.manifest.services;
}}
"""

HOSTS = ["app1", "db1", "edge1"]

# The fleet of tests/nix/fixtures/access.nix.
FLEET = ["10.0.0.11", "10.0.0.12", "10.0.0.21", "2001:db8::31"]


def view(nix: Nix, fleet: str) -> dict[str, Any]:
    hosts = " ".join(f"{n} = {FIREWALL_VIEW.format(host=json.dumps(n))};" for n in HOSTS)
    return nix.eval(f"let f = {fleet}; in {{ {hosts} }}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def iptables(nix: Nix) -> dict[str, Any]:
    return view(nix, nix.fleet("access.nix"))


@pytest.fixture(scope="module")
def nftables(nix: Nix) -> dict[str, Any]:
    return view(
        nix,
        """(h.evalFleet [ {
          imports = [ tests/nix/fixtures/access.nix ];
          hosts = h.lib.genAttrs [ "app1" "db1" "edge1" ] (_: {
            modules = [ { networking.nftables.enable = true; } ];
          });
        } ])""",
    )


def accept(source: str, port: int, action: str = "-A") -> str:
    program = "ip6tables" if ":" in source else "iptables"
    return f"{program} -w {action} nixos-fw -p tcp --dport {port} -s {source} -j nixos-fw-accept"


def test_by_default_a_port_is_open_to_the_fleets_hosts(iptables: dict[str, Any]) -> None:
    app1 = iptables["app1"]
    assert app1["allowFrom"] == {"api": FLEET}
    assert app1["extraCommands"].splitlines() == [
        "# fleet service api",
        *(accept(a, 8080) for a in FLEET),
    ]


def test_explicit_sources_of_both_families(iptables: dict[str, Any]) -> None:
    assert iptables["db1"]["extraCommands"].splitlines() == [
        "# fleet service cache",
        accept("10.0.0.0/24", 6379),
        accept("2001:db8:1::/48", 6379),
    ]


def test_everyone(iptables: dict[str, Any]) -> None:
    assert iptables["edge1"]["extraCommands"].splitlines() == [
        "# fleet service proxy",
        accept("0.0.0.0/0", 443),
        accept("0.0.0.0/0", 80),
        accept("::/0", 443),
        accept("::/0", 80),
    ]


def test_no_port_is_opened_to_every_source_behind_allow_from(iptables: dict[str, Any]) -> None:
    for host in iptables.values():
        assert host["allowedTCPPorts"] == []
        assert host["extraInputRules"] == ""
        assert host["warnings"] == [] and host["failedAssertions"] == []


def test_stopping_the_firewall_removes_the_rules(iptables: dict[str, Any]) -> None:
    assert iptables["db1"]["extraStopCommands"].splitlines() == [
        "# fleet service cache",
        accept("10.0.0.0/24", 6379, "-D") + " 2>/dev/null || true",
        accept("2001:db8:1::/48", 6379, "-D") + " 2>/dev/null || true",
    ]


def test_nftables_rules(nftables: dict[str, Any]) -> None:
    def rule(family: str, source: str, ports: str, service: str) -> str:
        return f'{family} saddr {source} tcp dport {ports} accept comment "fleet service {service}"'

    assert nftables["app1"]["extraInputRules"].splitlines() == [
        *(rule("ip", a, "8080", "api") for a in FLEET[:3]),
        rule("ip6", FLEET[3], "8080", "api"),
    ]
    assert nftables["db1"]["extraInputRules"].splitlines() == [
        rule("ip", "10.0.0.0/24", "6379", "cache"),
        rule("ip6", "2001:db8:1::/48", "6379", "cache"),
    ]
    assert nftables["edge1"]["extraInputRules"].splitlines() == [
        rule("ip", "0.0.0.0/0", "{ 443, 80 }", "proxy"),
        rule("ip6", "::/0", "{ 443, 80 }", "proxy"),
    ]


def test_nftables_gets_no_iptables_commands(nftables: dict[str, Any]) -> None:
    # The nftables firewall of NixOS asserts that extraCommands is empty.
    for host in nftables.values():
        assert host["extraCommands"] == "" and host["extraStopCommands"] == ""
        assert host["allowedTCPPorts"] == []


def test_without_ipv6_iptables_gets_no_ipv6_rule(nix: Nix) -> None:
    script = nix.eval(
        """(h.hostConfig (h.evalFleet [ {
          imports = [ tests/nix/fixtures/access.nix ];
          hosts.db1.modules = [ { networking.enableIPv6 = false; } ];
        } ]) "db1").networking.firewall.extraCommands"""
    )
    assert script.splitlines() == ["# fleet service cache", accept("10.0.0.0/24", 6379)]


def test_a_closed_service_gets_no_rule(nix: Nix) -> None:
    script = nix.eval(
        """(h.hostConfig (h.evalFleet [ {
          imports = [ tests/nix/fixtures/access.nix ];
          services.cache.openFirewall = false;
        } ]) "db1").networking.firewall.extraCommands"""
    )
    assert script == ""


def test_hosts_declared_by_name_are_left_out_with_a_warning(nix: Nix) -> None:
    host = nix.eval(
        """let c = h.hostConfig (h.evalFleet [ {
          imports = [ tests/nix/fixtures/base.nix ];
          hosts.app2.address = h.lib.mkForce "app2.example.org";
        } ]) "app1"; in {
          inherit (c) warnings;
          inherit (c.networking.firewall) extraCommands;
        }"""
    )
    assert host["extraCommands"].splitlines()[1:] == [
        accept("10.0.0.11", 8080),
        accept("10.0.0.21", 8080),
    ]
    assert host["warnings"] == [
        'fleet: host app1: service(s) "api" open their ports to the fleet\'s hosts, but the '
        "firewall cannot match DNS names (app2.example.org): those hosts are refused; list "
        "their IP addresses or prefixes in the services' allowFrom."
    ]


@pytest.mark.parametrize(
    "source",
    ["10.0.0.300", "10.0.0.0/33", "010.0.0.1", "db.example.org", "fe80::1%eth0", "1::2::3", ""],
)
def test_a_bad_source_is_refused(nix: Nix, source: str) -> None:
    # By the inventory (what the tool reads first) and by the host.
    fleet = f"""(h.evalFleet [ {{
      imports = [ tests/nix/fixtures/base.nix ];
      services.cache.allowFrom = [ "10.0.0.0/24" {json.dumps(source)} ];
    }} ])"""
    for expr in [f"{fleet}.config.build.inventory", f'(h.hostConfig {fleet} "db1").fleet.manifest']:
        error = nix.error(expr)
        assert "services.cache.allowFrom" in error
        assert (
            "is not of type `IPv4 or IPv6 address or CIDR prefix (such as 192.0.2.10, "
            "192.0.2.0/24, 2001:db8::/32)'"
        ) in error
        assert json.dumps(source) in error
