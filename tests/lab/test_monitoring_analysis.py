"""Canary analysis in the lab: after the canary wave, the lab's declared analysis asks
Prometheus on the monitoring host (through its ssh connection) for the share of lab-web's
answers through the balancer that are not 5xx, under client load."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fleet.lab import flake
from fleet.lab.layout import Lab
from fleet.lab.load import Clients
from tests.lab.fleetrun import assert_safe, results, run_fleet, running_paths, set_release

pytestmark = [pytest.mark.lab]

CANARY = "lab1"  # the first host in order: the lab tags no canary
APPS = ["lab1", "lab2"]
BALANCER = "lab3"
MONITOR = "lab4"
RESTORE = ("deploy", "--skip-analysis")  # back to release 0 without load to measure


@pytest.fixture(scope="module")
def lab(monitoring_lab: Lab) -> Iterator[Lab]:
    """The monitoring tests' lab, with the lab's analysis declared for these tests alone."""
    flake.set_analysis(monitoring_lab, flake.LAB_ANALYSIS)
    try:
        yield monitoring_lab
    finally:
        flake.set_analysis(monitoring_lab, None)


@pytest.fixture()
def safe(lab: Lab) -> Iterator[None]:
    assert_safe(lab)
    yield
    set_release(lab, "0")
    code, _, err = run_fleet(lab, *RESTORE)
    assert code == 0, err
    assert_safe(lab)


def clients(lab: Lab) -> Clients:
    return Clients(lab, lab.hosts(4)[2].address, flake.INGRESS_PORT, threads=4, max_seconds=240)


def releases(lab: Lab) -> dict[str, str]:
    """The lab-web release each app host runs, as its system's name (lab-system-HOST-V)
    says."""
    paths = running_paths(lab)
    return {h: str(paths[h]).rsplit(f"-{h}-", 1)[-1] for h in APPS}


def the_run(report: dict[str, Any]) -> dict[str, Any]:
    runs = report["analysis"]
    assert [r["name"] for r in runs] == ["web-success"], runs
    run: dict[str, Any] = runs[0]
    assert f'server=~"{CANARY}"' in run["query"], run["query"]
    assert "{{" not in run["query"]
    return run


def test_a_healthy_release_passes_the_analysis_and_reaches_every_host(lab: Lab, safe: None) -> None:
    set_release(lab, "a2")
    with clients(lab):
        code, report, err = run_fleet(lab, "deploy", timeout=300)
    assert code == 0, err
    run = the_run(report)
    assert run["result"] == "successful", run
    assert len(run["measurements"]) == 5
    assert all(m["outcome"] != "failed" for m in run["measurements"]), run
    assert results(report)[CANARY] == "deployed"
    assert results(report)["lab2"] == "deployed"
    assert report["stopped"] is None
    assert "analysis web-success 5/5" in err


@pytest.mark.parametrize(
    "broken",
    [
        # Healthy through its checks and after: 500 to a fifth of its clients.
        {"broken": "errors:20"},
        # Healthy through its checks and commit; then 500 on /version, which the
        # balancer's counters see before its health check takes the canary out.
        {"sick_after": 6},
    ],
    ids=["errors", "sick"],
)
def test_a_release_that_fails_its_clients_fails_the_analysis_and_is_rolled_back(
    lab: Lab, safe: None, broken: dict[str, Any]
) -> None:
    before = running_paths(lab)
    set_release(lab, "a1", **broken)
    with clients(lab) as load:
        code, report, err = run_fleet(lab, "deploy", timeout=300)
    assert code == 3, err
    run = the_run(report)
    assert run["result"] == "failed", run
    assert run["measurements"][-1]["outcome"] == "failed"
    assert "web-success" in report["stopped"] and "failed" in report["stopped"]
    assert results(report) == {
        CANARY: "rolled-back",
        "lab2": "skipped",
        BALANCER: "skipped",
        MONITOR: "skipped",
    }
    assert "analysis 'web-success' failed" in report["hosts"][CANARY]["message"]
    assert load.load.failures, "the clients never saw the sick canary"
    assert running_paths(lab) == before
    assert_safe(lab)


def test_without_prometheus_the_analysis_is_inconclusive_and_the_canary_kept(
    lab: Lab, safe: None
) -> None:
    stop = ["systemctl", "stop", "fleet-prometheus.service"]
    code, _, err = run_fleet(lab, "exec", MONITOR, "--", *stop)
    assert code == 0, err
    try:
        set_release(lab, "a3")
        with clients(lab):
            code, report, err = run_fleet(lab, "deploy", timeout=300)
        assert code == 4, err
        run = the_run(report)
        assert run["result"] == "inconclusive", run
        assert {m["outcome"] for m in run["measurements"]} == {"inconclusive"}
        assert "query failed" in run["message"]
        assert report["result"] == "attention"
        assert "inconclusive" in report["stopped"] and "keep the new release" in report["stopped"]
        assert results(report) == {
            CANARY: "deployed",
            "lab2": "skipped",
            BALANCER: "skipped",
            MONITOR: "skipped",
        }
        assert releases(lab) == {CANARY: "a3", "lab2": "0"}
    finally:
        start = ["systemctl", "start", "fleet-prometheus.service"]
        code, _, err = run_fleet(lab, "exec", MONITOR, "--", *start)
        assert code == 0, err
