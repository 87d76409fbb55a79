"""The starter template (`nix flake init -t`): its fleet evaluates, and its inventory is one
the tool reads."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fleet.inventory import parse
from tests.nix.conftest import REPO, Nix, nix_path

TEMPLATE = REPO / "templates" / "default"


@pytest.fixture(scope="module")
def inventory(nix: Nix) -> Any:
    return nix.eval(f"(h.evalFleet [ {nix_path(TEMPLATE / 'fleet.nix')} ]).config.build.inventory")


def test_the_templates_fleet_is_an_inventory_the_tool_reads(inventory: Any) -> None:
    parsed = parse(inventory, "the template")
    assert set(parsed.hosts) == {"web1", "web2"}
    assert all(h.services == ("hello",) for h in parsed.hosts.values())
    assert [c.name for c in parsed.hosts["web1"].checks] == ["hello"]
    assert parsed.deploy.canary_tag == "canary" and "canary" in parsed.hosts["web1"].tags


def test_the_templates_hosts_configure(nix: Nix) -> None:
    """The host module and the services on the stubs; the hosts' own hardware modules
    need all of NixOS, and stay out."""
    no_hardware = (
        "{ hosts.web1.modules = h.lib.mkForce [ ]; hosts.web2.modules = h.lib.mkForce [ ]; }"
    )
    fleet = f"(h.evalFleet [ {nix_path(TEMPLATE / 'fleet.nix')} {no_hardware} ])"
    for host in ("web1", "web2"):
        config = nix.eval(
            f'let c = h.hostConfig {fleet} "{host}"; in '
            "{ failed = c.failedAssertions; unit = c.systemd.services ? fleet-hello; }"
        )
        assert config == {"failed": [], "unit": True}, host


def test_the_flake_offers_the_template_and_the_template_uses_mk_fleet() -> None:
    flake = (REPO / "flake.nix").read_text()
    assert re.search(r"templates\.default = \{\s*path = \./templates/default;", flake)
    text = (TEMPLATE / "flake.nix").read_text()
    assert "fleet.lib.mkFleet" in text and "./fleet.nix" in text
    assert (TEMPLATE / "fleet.yaml").is_file()


def test_the_templates_fleet_yaml_is_a_valid_checkout_config() -> None:
    from fleet import config

    loaded = config.load(str(TEMPLATE), user=config.Config({}, ()))
    assert loaded.get("parallel") == 4 and loaded.sources == (TEMPLATE / "fleet.yaml",)
