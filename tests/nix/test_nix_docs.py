"""The example of docs/modules.md, exactly as written there, evaluates to a working fleet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fleet.inventory import parse
from tests.nix.conftest import FIXTURES, REPO, Nix, nix_path

DOC = REPO / "docs" / "modules.md"
HEADING = "## Example"


def example_text() -> str:
    """The first ```nix block under the heading."""
    text = DOC.read_text()
    start = text.index(f"\n{HEADING}\n")
    block = re.search(r"^```nix\n(.*?)^```$", text[start:], re.DOTALL | re.MULTILINE)
    assert block is not None, f"no nix block under {HEADING!r} in {DOC}"
    return block.group(1)


@pytest.fixture(scope="module")
def example(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Any:
    declaration = tmp_path_factory.mktemp("docs") / "fleet.nix"
    declaration.write_text(example_text())
    stub = nix_path(FIXTURES / "redis-stub.nix")
    return nix.eval(
        f"""
        let
          fleet = h.evalFleet [ {nix_path(declaration)} ];
          b = fleet.config.build;
          hostView = name:
            let c = h.servicesConfig fleet name [ {stub} ]; in {{
              inherit (c) failedAssertions warnings;
              units = builtins.mapAttrs (_: u: {{ inherit (u) environment serviceConfig; }})
                c.systemd.services;
              redis = c.services.redis.servers or {{ }};
            }};
        in {{
          inherit (b) problems inventory placement services;
          units = builtins.mapAttrs (_: s: s.unit) fleet.config.services;
          hosts = builtins.mapAttrs (name: _: hostView name) fleet.config.hosts;
        }}
        """
    )


def test_the_example_is_the_first_nix_block_under_its_heading() -> None:
    text = example_text()
    assert text.startswith("# fleet.nix\n")
    assert "services.redis" in text


def test_the_example_has_no_problems_and_its_inventory_passes_the_schema(example: Any) -> None:
    assert example["problems"] == []
    inventory = parse(example["inventory"], "the example of docs/modules.md")
    assert sorted(inventory.hosts) == ["app1", "app2", "app3", "db1"]
    assert inventory.hosts["db1"].host_key is not None
    assert inventory.deploy.health_timeout == 60


def test_the_example_places_two_api_replicas_and_redis(example: Any) -> None:
    api = example["placement"]["api"]
    assert len(api) == 2 and set(api) <= {"app1", "app2", "app3"}
    assert example["placement"]["redis"] == ["db1"]
    assert example["services"]["api"]["dependencies"] == {"redis": ["10.0.0.21:6379"]}


def test_every_host_configuration_of_the_example_evaluates(example: Any) -> None:
    for name, host in example["hosts"].items():
        assert host["failedAssertions"] == [], name
        assert host["warnings"] == [], name


def test_the_api_runs_where_it_is_placed_and_finds_redis(example: Any) -> None:
    for name in example["placement"]["api"]:
        unit = example["hosts"][name]["units"]["fleet-api"]
        assert unit["environment"]["FLEET_REDIS_ADDRS"] == "10.0.0.21:6379"
        assert unit["serviceConfig"]["ExecStart"].endswith('"--port" "8080"')
        assert unit["serviceConfig"]["MemoryMax"] == "256M"
        assert unit["serviceConfig"]["LoadCredential"] == [
            "redis-password:/var/lib/fleet/secrets/api/redis-password"
        ]


def test_redis_listens_where_the_fleet_says_with_the_password(example: Any) -> None:
    db1 = example["hosts"]["db1"]
    server = db1["redis"]["main"]
    # The port dependents are given, on the host's address as well as
    # loopback (the TCP check).
    assert server["port"] == 6379 == example["inventory"]["hosts"]["db1"]["checks"][0]["port"]
    assert server["bind"].split() == ["127.0.0.1", "10.0.0.21"]
    unit = example["units"]["redis"]
    assert unit in db1["units"]
    assert "fleet-redis" not in db1["units"]
    credential = db1["units"][unit]["serviceConfig"]["LoadCredential"]
    assert credential == ["redis-password:/var/lib/fleet/secrets/redis/redis-password"]
    assert server["requirePassFile"] == f"/run/credentials/{unit}.service/redis-password"


def test_redis_without_a_port_would_not_listen(nix: Nix, tmp_path: Path) -> None:
    """The stand-in keeps nixpkgs' default: a named server's port is 0 (no TCP)."""
    declaration = tmp_path / "fleet.nix"
    declaration.write_text(example_text().replace("port = 6379;", ""))
    port = nix.eval(
        f'(h.servicesConfig (h.evalFleet [ {nix_path(declaration)} ]) "db1" '
        f"[ {nix_path(FIXTURES / 'redis-stub.nix')} ]).services.redis.servers.main.port"
    )
    assert port == 0
