"""Bad declarations fail evaluation with a message naming what is wrong and where."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fleet.inventory import schema
from tests.nix.conftest import FIXTURES, Nix, nix_path

CASES = {
    "unknown-host": 'service "api": placement.hosts names unknown host "app9" '
    '(hosts: "app1", "app2", "db1")',
    "unknown-tag": 'service "api": placement.tags names unknown tag "gpu", which no host '
    'carries (tags: "app", "data")',
    "port-twice": 'host "app1": port 8080 is claimed twice, by service "api" and service "web"',
    "ssh-port": 'host "app1": port 8080 is claimed twice, by sshd (sshPort) and service "api"',
    "no-match": 'service "api": placement matches no host (hosts: any; tags: "data", "app")',
    "replicas": 'service "api": wants 3 replicas but only 2 hosts match its placement '
    '("app1", "app2")',
    "cycle": 'service "api": dependency cycle: "api" -> "cache" -> "api"',
    "unknown-dep": 'service "api": dependsOn names unknown service "queue" '
    '(services: "api", "cache")',
    "check-port": 'service "api": http health check on port 9090, which the service does '
    "not declare (ports: 8080): add 9090 to `ports`, or set healthCheck.port to one of them",
    "check-no-ports": 'service "batch": http health check has no port to probe, as the service '
    "declares no ports: declare the port it listens on in `ports`, or use a command check "
    '(healthCheck.type = "command")',
    "portless-dep": 'service "api": depends on service "cache", which declares no ports',
    "nothing-to-run": 'service "idle": nothing to run: set package, command or nixosModule',
    "module-without-unit": 'service "queue": it is run by its nixosModule, so set `unit` to the '
    'systemd service that module creates (e.g. unit = "redis-main" for '
    "services.redis.servers.main)",
    "shared-unit": 'host "app1": services "api" and "web" both run as unit "fleet-api": give '
    "each its own `unit`, or place them on different hosts",
    "host-name": 'host "web.example": the name is not a valid host name (networking.hostName): '
    "use letters, digits and '-' only, at most 63 characters, not starting or ending with "
    "'-'; rename the host (its address may still be a longer DNS name)",
    "confirm-timeout": "deploy: confirmTimeout is 1.5 s: set it to at least 2 s, the time a host "
    "gives the fleet tool to confirm a healthy generation before its dead-man switch reverts it",
    "check-timeout": 'service "api": healthCheck.timeout is 20 s, not below '
    "deploy.healthTimeout (20 s): one attempt could outlast the whole health timeout and never "
    "pass; lower healthCheck.timeout or raise deploy.healthTimeout",
    "check-path": 'service "api": healthCheck.path "/health check" must be printable ASCII '
    "without spaces: percent-encode anything else (a space is %20)",
    # Traffic behind the balancers.
    "ingress-no-balancer": 'traffic: service "api" has an ingress, but no host carries the tag '
    '"balancer" (traffic.balancerTag) to run HAProxy: tag the hosts that should balance (two, '
    "for redundancy), or set traffic.balancerTag to their tag",
    "ingress-port-twice": 'traffic: services "api" and "cache" both take ingress.port 80, but '
    "each balancer listens on one port per service: give each its own ingress.port",
    "ingress-clash": 'host "lb1": port 8080 is claimed twice, by service "api" and the '
    'balancers\' frontend of service "api" (ingress.port): give the frontend another '
    "ingress.port, or move the other off that port",
    "ingress-ssh-port": 'host "lb1": port 80 is claimed twice, by sshd (sshPort) and the '
    'balancers\' frontend of service "api" (ingress.port): give the frontend another '
    "ingress.port, or move the other off that port",
    "ingress-agent-port": 'service "api": ingress.port 9777 is traffic.agentPort, where the fleet '
    "agent of every host with a balanced instance listens: choose another ingress.port, or move "
    "traffic.agentPort",
    "agent-port": 'host "app1": port 8080 is claimed twice, by service "api" and the fleet agent '
    "(traffic.agentPort): set traffic.agentPort to a port no host uses",
    "ingress-no-ports": 'service "batch": ingress needs a port to send traffic to, but the '
    "service declares no ports: declare the port it listens on in `ports`",
}

# Each of these fixtures has exactly its one problem (two hosts, for the agent's port).
ONE_PROBLEM = [c for c in CASES if c.startswith("ingress-") or c == "check-path"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_inventory_names_the_problem(nix: Nix, case: str) -> None:
    error = nix.error(f"{nix.fleet(f'bad/{case}.nix')}.config.build.inventory")
    assert "fleet: the declaration has" in error
    assert CASES[case] in error


@pytest.mark.parametrize(
    "case", ["unknown-host", "cycle", "port-twice", "shared-unit", "module-without-unit"]
)
def test_host_configurations_fail_too(nix: Nix, case: str) -> None:
    error = nix.error(f'(h.hostConfig {nix.fleet(f"bad/{case}.nix")} "app1").systemd.services')
    assert CASES[case] in error


@pytest.mark.parametrize("case", ONE_PROBLEM)
def test_a_traffic_problem_is_one_line_and_the_only_one(nix: Nix, case: str) -> None:
    assert nix.eval(f"{nix.fleet(f'bad/{case}.nix')}.config.build.problems") == [CASES[case]]


def test_the_agents_port_is_named_on_every_host_that_runs_it(nix: Nix) -> None:
    problems = nix.eval(f"{nix.fleet('bad/agent-port.nix')}.config.build.problems")
    assert problems == [CASES["agent-port"], CASES["agent-port"].replace("app1", "app2")]


def test_every_problem_is_reported_at_once(nix: Nix) -> None:
    error = nix.error(f"{nix.fleet('bad/portless-dep.nix')}.config.build.placement")
    assert "the declaration has 2 problem(s)" in error
    assert 'service "cache": tcp health check has no port to probe' in error
    assert CASES["portless-dep"] in error


def test_a_check_port_of_a_portless_service_says_to_declare_it(nix: Nix) -> None:
    problems = nix.eval(f"{nix.fleet('bad/check-no-ports.nix')}.config.build.problems")
    assert problems == [
        'service "batch": http health check has no port to probe, as the service declares no '
        "ports: declare the port it listens on in `ports`, or use a command check "
        '(healthCheck.type = "command")',
        'service "worker": tcp health check on port 9000, which the service does not declare '
        "(ports: none): add 9000 to `ports`",
    ]


def test_every_bad_host_name_is_named(nix: Nix) -> None:
    problems = nix.eval(f"{nix.fleet('bad/host-name.nix')}.config.build.problems")
    assert [p.split(":")[0] for p in problems] == ['host "web.example"', 'host "web_2"']


@pytest.mark.parametrize("name", ["a", "app1", "App-1", "x" * 63, "1host"])
def test_valid_host_names_pass(nix: Nix, name: str) -> None:
    fleet = f'h.evalFleet [ {{ hosts."{name}".address = "10.0.0.1"; }} ]'
    assert nix.eval(f"({fleet}).config.build.problems") == []
    hostname = nix.eval(f'(h.planConfig ({fleet}) "{name}").fleet.hostName')
    assert hostname == name


@pytest.mark.parametrize("name", ["-a", "a-", "a.b", "a_b", "x" * 64])
def test_invalid_host_names_are_problems(nix: Nix, name: str) -> None:
    fleet = f'h.evalFleet [ {{ hosts."{name}".address = "10.0.0.1"; }} ]'
    [problem] = nix.eval(f"({fleet}).config.build.problems")
    assert problem.startswith(f'host "{name}": the name is not a valid host name')


def test_a_module_run_service_may_name_any_unit(nix: Nix) -> None:
    for unit in ['"fleet-queue"', '"rabbitmq"', 'h.lib.mkDefault "rabbitmq"']:
        fleet = f"h.evalFleet [ {nix_path(FIXTURES / 'bad/module-without-unit.nix')} "
        fleet += f"{{ services.queue.unit = {unit}; }} ]"
        assert nix.eval(f"({fleet}).config.build.problems") == []


def test_a_module_run_service_gets_no_generated_unit(nix: Nix) -> None:
    fleet = f"h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} ]"
    units = nix.eval(f'builtins.attrNames (h.hostConfig ({fleet}) "db1").systemd.services')
    assert "cache" in units and "fleet-cache" not in units


def test_a_confirm_timeout_below_the_health_timeout_is_fine(nix: Nix) -> None:
    fleet = f"h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} "
    fleet += "{ deploy = { healthTimeout = 120; confirmTimeout = 2; }; } ]"
    assert nix.eval(f"({fleet}).config.build.problems") == []
    deploy = nix.eval(f"({fleet}).config.build.inventory.deploy")
    assert (deploy["healthTimeout"], deploy["confirmTimeout"]) == (120, 2)


def test_a_check_timeout_just_below_the_health_timeout_is_fine(nix: Nix) -> None:
    fleet = f"h.evalFleet [ {nix_path(FIXTURES / 'bad/check-timeout.nix')} "
    fleet += "{ services.api.healthCheck.timeout = h.lib.mkForce 19.5; } ]"
    assert nix.eval(f"({fleet}).config.build.problems") == []


def test_problems_are_listed_without_failing(nix: Nix) -> None:
    assert nix.eval(f"{nix.fleet('base.nix')}.config.build.problems") == []
    assert nix.eval(f"{nix.fleet('bad/replicas.nix')}.config.build.problems") == [CASES["replicas"]]


def test_option_types_reject_bad_values(nix: Nix) -> None:
    error = nix.error(
        """(h.evalFleet [ { hosts.a = { address = "10.0.0.1"; tags = [ "no spaces" ]; }; } ])
        .config.build.inventory"""
    )
    assert "hosts.a.tags" in error


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("memory", "256MB"),
        ("memory", "0.5G"),
        ("memory", "0"),
        ("memory", "150%"),
        ("memory", "unlimited"),
        ("cpu", "0.5"),
        ("cpu", "50"),
        ("cpu", "0%"),
        ("cpu", "-50%"),
    ],
)
def test_bad_limits_fail_evaluation_naming_the_option(nix: Nix, option: str, value: str) -> None:
    error = nix.error(
        f"(h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} "
        f"{{ services.api.limits.{option} = h.lib.mkForce {json.dumps(value)}; }} ])"
        ".config.build.inventory"
    )
    assert f"services.api.limits.{option}" in error
    assert "systemd's " + ("MemoryMax=" if option == "memory" else "CPUQuota=") in error


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("memory", "1073741824"),
        ("memory", "512K"),
        ("memory", "256M"),
        ("memory", "2G"),
        ("memory", "1T"),
        ("memory", "25%"),
        ("memory", "12.5%"),
        ("memory", "100%"),
        ("memory", "infinity"),
        ("cpu", "50%"),
        ("cpu", "250%"),
        ("cpu", "0.5%"),
    ],
)
def test_limits_systemd_takes_pass(nix: Nix, option: str, value: str) -> None:
    limits = nix.eval(
        f"(h.hostConfig (h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} "
        f"{{ services.api.limits.{option} = h.lib.mkForce {json.dumps(value)}; }} ]) "
        '"app1").systemd.services.fleet-api.serviceConfig'
    )
    assert limits["MemoryMax" if option == "memory" else "CPUQuota"] == value


ADDRESSES = {
    "192.0.2.10": True,
    "10.0.0.1": True,
    "app1": True,
    "app1.example.org": True,
    "App-1.Example.ORG": True,
    "2001:db8::10": True,
    "::1": True,
    "fe80::1:2:3:4": True,
    "::ffff:192.0.2.1": True,
    "1:2:3:4:5:6:7:8": True,
    "host:22": False,
    "192.0.2.10:22": False,
    "[2001:db8::10]": False,
    "[2001:db8::10]:22": False,
    "root@host": False,
    "-oProxyCommand=x": False,
    "host name": False,
    "host/path": False,
    "host.": False,
    ".host": False,
    "a..b": False,
    "-host": False,
    "host-": False,
    "under_score": False,
    "256.0.0.1": False,
    "10.0.0": False,
    "01.2.3.4": False,
    "1:2:3:4:5:6:7:8:9": False,
    "1::2::3": False,
    "fe80::1%eth0": False,
    "x" * 64: False,
    ".".join(["a" * 63] * 4): False,
    ".".join(["a" * 63] * 3 + ["a" * 61]): True,
    "": False,
}


def test_host_addresses_are_names_or_bare_ip_addresses(nix: Nix) -> None:
    expr = (
        'map (import (h.repo + "/modules/lib.nix") { inherit (h) lib; }).isHostAddress '
        + "(builtins.fromJSON "
        + json.dumps(json.dumps(list(ADDRESSES))).replace("${", "\\${")
        + ")"
    )
    assert dict(zip(ADDRESSES, nix.eval(expr), strict=True)) == ADDRESSES


def test_the_inventory_schema_takes_the_same_addresses() -> None:
    defs = schema()["$defs"]
    validator = jsonschema.Draft202012Validator(
        {"$defs": defs, **defs["host"]["properties"]["address"]}
    )
    taken = {address: validator.is_valid(address) for address in ADDRESSES}
    assert taken == ADDRESSES


def test_an_address_with_a_port_fails_naming_the_host_and_sshport(nix: Nix) -> None:
    error = nix.error(
        f"(h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} "
        '{ hosts.app1.address = h.lib.mkForce "app1.example.org:2222"; } ]).config.build.inventory'
    )
    assert "hosts.app1.address" in error
    assert "without a port (the port is `sshPort`)" in error


def test_a_host_module_cannot_turn_tcp_forwarding_off(nix: Nix) -> None:
    failed = nix.eval(
        f'(h.hostConfig {nix.fleet("bad/forwarding-off.nix")} "app1").failedAssertions'
    )
    assert failed == [
        "fleet: services.openssh.settings.AllowTcpForwarding must stay on: the fleet tool "
        "tunnels HTTP and TCP health checks over ssh."
    ]


def test_three_services_sharing_a_unit_are_named_together(nix: Nix) -> None:
    fleet = f"h.evalFleet [ {nix_path(FIXTURES / 'bad/shared-unit.nix')} "
    fleet += '{ services.admin = { package = h.pkgs.fake "admin"; placement.hosts = [ "app1" ]; '
    fleet += 'unit = "fleet-api"; }; } ]'
    assert nix.eval(f"({fleet}).config.build.problems") == [
        'host "app1": services "admin", "api" and "web" all run as unit "fleet-api": give each '
        "its own `unit`, or place them on different hosts"
    ]


def test_restart_policies_are_those_nixos_accepts(nix: Nix) -> None:
    """NixOS's unit check refuses Restart=on-watchdog: the option must refuse it first."""
    error = nix.error(
        f"(h.hostConfig (h.evalFleet [ {nix_path(FIXTURES / 'base.nix')} "
        '{ services.api.restart.policy = "on-watchdog"; } ]) "app1")'
        ".systemd.services.fleet-api.serviceConfig.Restart"
    )
    assert "restart.policy" in error and "on-watchdog" in error
