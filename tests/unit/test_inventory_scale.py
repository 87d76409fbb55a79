"""A thousand generated hosts: all of them parsed, and an error deep inside still named.

How fast is bench/inventory.py's business; these tests hold what the fast path must not
change.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fleet.errors import InventoryError
from fleet.inventory import CheckType, parse
from tests.unit.generated import host_name, inventory_document, service_name

HOSTS = 1000
SERVICES = 100


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return inventory_document(HOSTS, services=SERVICES, per_host=10)


def test_every_generated_host_and_service_is_parsed(document: dict[str, Any]) -> None:
    inventory = parse(document, "generated")
    assert list(inventory.hosts) == [host_name(i) for i in range(HOSTS)]
    for name, raw in document["hosts"].items():
        host = inventory.hosts[name]
        assert (host.address, host.host_key) == (raw["address"], raw["hostKey"])
        assert list(host.services) == raw["services"] and len(host.services) == 10
        assert [c.name for c in host.checks] == [c["name"] for c in raw["checks"]]
        assert [s.service for s in host.secrets] == [s["service"] for s in raw["secrets"]]
    every = {service_name(i) for i in range(SERVICES)}
    assert set(inventory.depends_on) == every
    assert {s for h in inventory.hosts.values() for s in h.services} == every
    assert {c.type for h in inventory.hosts.values() for c in h.checks} == set(CheckType)
    assert inventory.traffic is not None and inventory.monitoring is not None
    assert set(inventory.traffic.services) == set(document["traffic"]["services"])
    assert len(inventory.monitoring.nodes) == HOSTS
    assert set(inventory.monitoring.services) == set(document["monitoring"]["services"])


def test_the_generator_is_deterministic() -> None:
    assert inventory_document(20, seed=3) == inventory_document(20, seed=3)
    assert inventory_document(20, seed=3) != inventory_document(20, seed=4)


def _first_port(host: dict[str, Any]) -> int:
    return next(i for i, c in enumerate(host["checks"]) if c.get("port") and c["service"])


def test_an_error_deep_inside_host_777_is_named(document: dict[str, Any]) -> None:
    data = copy.deepcopy(document)
    name = host_name(777)
    index = _first_port(data["hosts"][name])
    data["hosts"][name]["checks"][index]["port"] = 70000
    with pytest.raises(InventoryError) as error:
        parse(data, "generated")
    assert str(error.value) == (
        f"inventory from generated: hosts.{name}.checks.{index}.port: "
        "70000 is greater than the maximum of 65535"
    )


def test_a_bad_address_of_host_777_in_the_monitoring_is_named(
    document: dict[str, Any],
) -> None:
    data = copy.deepcopy(document)
    name = host_name(777)
    data["monitoring"]["nodes"][name]["address"] = "192.0.2.7:22"
    with pytest.raises(InventoryError) as error:
        parse(data, "generated")
    message = str(error.value)
    assert message.startswith(
        f"inventory from generated: monitoring.nodes.{name}.address: '192.0.2.7:22' "
    )
    assert "\n" not in message
