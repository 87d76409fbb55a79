"""The order of a rollout: canaries by tag, a dependency's hosts first, batches per tier."""

from __future__ import annotations

import pytest

from fleet.errors import UsageError
from fleet.inventory import Host
from fleet.waves import Order, plan, service_tiers


def host(name: str, services: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> Host:
    return Host(name, "192.0.2.1", 22, "root", tags, "x86_64-linux", None, services, ())


DEPS = {"api": ("redis",), "web": ("api",), "redis": ()}
FLEET = [
    host("app1", ("api",)),
    host("app2", ("api",), tags=("canary",)),
    host("db1", ("redis",)),
    host("front1", ("web",)),
    host("spare", ()),
]


def names(waves) -> list[list[str]]:
    return [w.hosts for w in waves]


def test_tiers_follow_dependencies() -> None:
    assert service_tiers(DEPS) == {"redis": 0, "api": 1, "web": 2}


def test_a_dependencys_hosts_go_first_and_tiers_never_share_a_batch() -> None:
    waves = plan(FLEET, canary=0, batch_size=10, depends_on=DEPS)
    assert names(waves) == [["db1", "spare"], ["app1", "app2"], ["front1"]]
    assert waves[0].why["db1"] == "tier 0; redis needed by others"
    assert waves[1].why["app1"] == "tier 1; its services need redis; api needed by others"


def test_the_canary_is_the_tagged_host() -> None:
    waves = plan(FLEET, canary=1, batch_size=10, canary_tag="canary", depends_on=DEPS)
    assert names(waves)[0] == ["app2"]
    assert waves[0].why["app2"] == "canary: tagged canary"
    assert all("app2" not in wave for wave in names(waves)[1:])


def test_without_a_tagged_host_the_canary_is_the_first_in_order() -> None:
    waves = plan(FLEET, canary=1, batch_size=10, canary_tag="blue", depends_on=DEPS)
    assert names(waves)[0] == ["db1"]
    assert waves[0].why["db1"] == "canary: first in order (no selected host is tagged blue)"


def test_order_by_names_ignores_dependencies() -> None:
    waves = plan(FLEET, canary=0, batch_size=2, depends_on=DEPS, order=Order.NAMES)
    assert names(waves) == [["app1", "app2"], ["db1", "front1"], ["spare"]]


def test_a_share_counts_the_whole_selection() -> None:
    hosts = [host(f"h{i}") for i in range(8)]
    waves = plan(hosts, canary=1, batch_size="25%")
    assert [len(w) for w in names(waves)] == [1, 2, 2, 2, 1]


def test_a_dependency_cycle_is_bad_input() -> None:
    with pytest.raises(UsageError, match="cycle: a -> b -> a"):
        service_tiers({"a": ("b",), "b": ("a",)})


def chain(length: int) -> dict[str, tuple[str, ...]]:
    """s0 depends on s1, which depends on s2, ... up to s{length - 1}."""
    return {f"s{i}": (f"s{i + 1}",) if i < length - 1 else () for i in range(length)}


@pytest.mark.parametrize("length", [1, 2, 5000])
def test_a_chain_of_any_length_is_tiered(length: int) -> None:
    """However long a chain of dependencies the inventory declares: no recursion limit."""
    tiers = service_tiers(chain(length))
    assert tiers == {f"s{i}": length - 1 - i for i in range(length)}


@pytest.mark.parametrize(
    ("depends_on", "cycle"),
    [
        ({"a": ("a",)}, "a -> a"),
        ({"x": ("a",), "a": ("b",), "b": ("c",), "c": ("a",)}, "a -> b -> c -> a"),
        (chain(5000) | {"s4999": ("s0",)}, " -> s4999 -> s0"),
    ],
)
def test_a_cycle_of_any_length_is_named(depends_on: dict, cycle: str) -> None:
    with pytest.raises(UsageError, match=f"cycle: .*{cycle}$"):
        service_tiers(depends_on)


APPS = [host(f"app{i}", ("api", "web") if i % 2 else ("api",)) for i in range(1, 7)]


def test_max_unavailable_splits_any_batch_whatever_its_size() -> None:
    waves = plan(APPS, canary=0, batch_size="100%", max_unavailable={"api": 2})
    assert names(waves) == [["app1", "app2"], ["app3", "app4"], ["app5", "app6"]]
    assert waves[0].why["app1"] == "batch in inventory order"
    assert waves[1].why["app3"] == (
        "batch in inventory order; api allows 2 instances out of rotation at once (maxUnavailable)"
    )


def test_every_service_of_a_host_counts_and_the_canaries_too() -> None:
    waves = plan(APPS, canary=2, batch_size=10, max_unavailable={"api": 3, "web": 1})
    # web is on app1, app3, app5: one of them per wave, the canaries' included; the
    # inventory's order is kept.
    assert names(waves) == [["app1", "app2"], ["app3", "app4"], ["app5", "app6"]]
    assert "web allows 1 instance out of rotation at once" in waves[2].why["app5"]
    for wave in names(waves):
        assert sum(h in ("app1", "app3", "app5") for h in wave) <= 1
        assert sum(1 for h in wave) <= 3


def test_hosts_of_no_balanced_service_are_never_held_back() -> None:
    fleet = [host("db1", ("redis",)), host("db2", ("redis",)), *APPS[:2]]
    waves = plan(fleet, canary=0, batch_size=10, max_unavailable={"api": 1})
    assert names(waves) == [["db1", "db2", "app1"], ["app2"]]
