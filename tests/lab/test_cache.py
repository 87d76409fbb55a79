"""The fleet's binary cache on real lab hosts: nginx serving what the deploy published,
each closure sent from the operator's machine once, and direct copies whenever the cache
fails, said in the report."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.fleetrun import faulted, own_lab, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]

APPS = ["lab1", "lab2", "lab3"]
CACHE = "lab4"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Four hosts beside the session's lab: three run lab-web, the last serves the cache."""
    with own_lab(54, 4, cache=True) as instance:
        yield instance


def signers(lab: Lab, host: str, path: str) -> set[str]:
    """The names of the keys that signed a store path on a host."""
    endpoint = next(e for e in ops.endpoints(lab) if e.name == host)
    with ops.transport(lab) as transport:
        out = (
            transport.remote(endpoint)
            .run(
                ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", path]
            )
            .stdout
        )
    info = json.loads(out)
    entry = info[0] if isinstance(info, list) else info[path]
    return {sig.split(":", 1)[0] for sig in entry.get("signatures", [])}


def cache_key_name(lab: Lab) -> str:
    return (lab.state / "cache-key.pub").read_text().split(":", 1)[0]


def test_a_deploy_publishes_once_and_every_host_fetches_from_the_cache(
    lab: Lab,
) -> None:
    set_release(lab, "cached1")
    code, report, err = run_fleet(lab, "deploy")
    assert code == 0, err
    assert report["cache"]["error"] is None
    assert report["cache"]["published"] == 4  # each system once, whatever the host count
    for name in APPS:
        host = report["hosts"][name]
        assert host["copy"]["source"] == "cache", host
        assert host["copy"]["paths"] >= 1
        # Substituted from the cache: the cache's signature came with it; a direct copy
        # would carry the operator's alone.
        assert cache_key_name(lab) in signers(lab, name, host["new"]["path"])
    # The cache host got its closure once, from the operator, and holds the others'.
    assert report["ssh"]["handshakes"][CACHE] == 1


def test_hosts_copy_directly_when_the_cache_does_not_answer_and_say_so(
    lab: Lab,
) -> None:
    set_release(lab, "cached2")
    with ops.transport(lab) as transport:
        cache = transport.remote(next(e for e in ops.endpoints(lab) if e.name == CACHE))
        cache.run(["systemctl", "stop", "fleet-cache.service"])
        try:
            code, report, err = run_fleet(lab, "deploy", *APPS)
        finally:
            cache.run(["systemctl", "start", "fleet-cache.service"])
    assert code == 0, err
    for name in APPS:
        copy = report["hosts"][name]["copy"]
        assert copy["source"] == "operator" and "Couldn't connect" in copy["cacheError"], copy
        assert cache_key_name(lab) not in signers(lab, name, report["hosts"][name]["new"]["path"])
    assert "the binary cache failed" in err and "copied directly" in err


def test_an_unreachable_cache_host_publishes_nothing_and_the_deploy_goes_on(
    lab: Lab,
) -> None:
    set_release(lab, "cached3")
    with faulted(lab, CACHE, ops.Fault.PARTITION):
        code, report, err = run_fleet(lab, "deploy", *APPS)
    assert code == 0, err
    assert report["cache"]["published"] == 0 and report["cache"]["error"]
    assert {report["hosts"][n]["copy"]["source"] for n in APPS} == {"operator"}
    assert "nothing published" in err
