"""Bad declarations fail evaluation with a message naming what is wrong and where."""

from __future__ import annotations

import pytest

from tests.nix.conftest import Nix

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
    "not declare (ports: 8080)",
    "portless-dep": 'service "api": depends on service "cache", which declares no ports',
    "nothing-to-run": 'service "idle": nothing to run: set package, command or nixosModule',
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inventory_names_the_problem(nix: Nix, case: str) -> None:
    error = nix.error(f"{nix.fleet(f'bad/{case}.nix')}.config.build.inventory")
    assert "fleet: the declaration has" in error
    assert CASES[case] in error


@pytest.mark.parametrize("case", ["unknown-host", "cycle", "port-twice"])
def test_host_configurations_fail_too(nix: Nix, case: str) -> None:
    error = nix.error(f'(h.hostConfig {nix.fleet(f"bad/{case}.nix")} "app1").systemd.services')
    assert CASES[case] in error


def test_every_problem_is_reported_at_once(nix: Nix) -> None:
    error = nix.error(f"{nix.fleet('bad/portless-dep.nix')}.config.build.placement")
    assert "the declaration has 2 problem(s)" in error
    assert 'service "cache": tcp health check has no port' in error
    assert CASES["portless-dep"] in error


def test_problems_are_listed_without_failing(nix: Nix) -> None:
    assert nix.eval(f"{nix.fleet('base.nix')}.config.build.problems") == []
    assert nix.eval(f"{nix.fleet('bad/replicas.nix')}.config.build.problems") == [CASES["replicas"]]


def test_option_types_reject_bad_values(nix: Nix) -> None:
    error = nix.error(
        """(h.evalFleet [ { hosts.a = { address = "10.0.0.1"; tags = [ "no spaces" ]; }; } ])
        .config.build.inventory"""
    )
    assert "hosts.a.tags" in error


def test_a_host_module_cannot_turn_tcp_forwarding_off(nix: Nix) -> None:
    failed = nix.eval(
        f'(h.hostConfig {nix.fleet("bad/forwarding-off.nix")} "app1").failedAssertions'
    )
    assert failed == [
        "fleet: services.openssh.settings.AllowTcpForwarding must stay on: the fleet tool "
        "tunnels HTTP and TCP health checks over ssh."
    ]
