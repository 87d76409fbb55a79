"""Canary analysis in the declaration: deploy.analysis's options, their problems, the
inventory's rendered list, and the templates' queries as promtool reads them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet.inventory import parse
from tests.nix.conftest import FIXTURES, Nix, nix_path

SUCCESS_RATE = (
    'sum(rate(haproxy_server_http_responses_total{job="haproxy",proxy="api",'
    'server=~"{{hosts}}",code!="5xx"}[1m])) / sum(rate(haproxy_server_http_responses_total'
    '{job="haproxy",proxy="api",server=~"{{hosts}}"}[1m]))'
)
LATENCY = (
    "histogram_quantile(0.9, sum by (le) (rate(http_request_duration_seconds_bucket"
    '{job="fleet-service",host=~"{{hosts}}"}[30s])))'
)
OWN = 'sum(up{host=~"{{hosts}}",service="{{service}}"}) - sum(up{host=~"{{baseline}}"})'
DECLARED = """{
  deploy.analysis = {
    errors.successRate.service = "api";
    slow = {
      latency = { histogram = "http_request_duration_seconds"; quantile = 0.9;
                  maxSeconds = 0.25; window = "30s"; };
      interval = 5; count = 4; failureLimit = 1;
    };
    own = {
      query = OWN;
      service = "api"; successCondition = "result >= 0 and result < 1 or result == 2";
      inconclusiveLimit = 2;
    };
  };
}""".replace("OWN", json.dumps(OWN))


def fleet(*declarations: str) -> str:
    return f"(h.evalFleet [ {nix_path(FIXTURES / 'monitoring.nix')} {' '.join(declarations)} ])"


def problems(nix: Nix, declaration: str) -> list[str]:
    return nix.eval(f"{fleet(declaration)}.config.build.problems")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def inventory(nix: Nix) -> dict[str, Any]:
    return nix.eval(f"{fleet(DECLARED)}.config.build.inventory")  # type: ignore[no-any-return]


def test_the_inventory_carries_the_analyses_rendered(inventory: dict[str, Any]) -> None:
    assert inventory["deploy"]["analysis"] == [
        {
            "name": "errors",
            "query": SUCCESS_RATE,
            "service": "api",
            "interval": 10,
            "count": 3,
            "successCondition": "result >= 0.99",
            "failureLimit": 0,
            "inconclusiveLimit": 0,
        },
        {
            "name": "own",
            "query": OWN,
            "service": "api",
            "interval": 10,
            "count": 3,
            "successCondition": "result >= 0 and result < 1 or result == 2",
            "failureLimit": 0,
            "inconclusiveLimit": 2,
        },
        {
            "name": "slow",
            "query": LATENCY,
            "service": None,
            "interval": 5,
            "count": 4,
            "successCondition": "result <= 0.25",
            "failureLimit": 1,
            "inconclusiveLimit": 0,
        },
    ]
    parsed = parse(inventory, "test").deploy.analysis
    assert [a.name for a in parsed] == ["errors", "own", "slow"]
    assert parsed[1].condition.holds(0.5) and parsed[1].condition.holds(2)
    assert not parsed[1].condition.holds(1)


def test_no_analysis_by_default(nix: Nix) -> None:
    assert nix.eval(f"{fleet()}.config.build.inventory.deploy.analysis") == []


def test_a_template_sets_the_condition_unless_one_is_given(nix: Nix) -> None:
    declared = """{ deploy.analysis.errors = {
      successRate = { service = "api"; min = 0.95; window = "5m"; };
      successCondition = "result > 0.9"; }; }"""
    analysis = nix.eval(f"{fleet(declared)}.config.build.inventory.deploy.analysis")
    assert analysis[0]["successCondition"] == "result > 0.9"
    assert "[5m]" in analysis[0]["query"]
    declared = '{ deploy.analysis.errors.successRate = { service = "api"; min = 0.95; }; }'
    analysis = nix.eval(f"{fleet(declared)}.config.build.inventory.deploy.analysis")
    assert analysis[0]["successCondition"] == "result >= 0.95"


@pytest.mark.parametrize(
    ("declaration", "problem"),
    [
        (
            "{ deploy.analysis.a = { }; }",
            "deploy.analysis.a: nothing to measure: set query (PromQL), or a template: "
            "successRate or latency",
        ),
        (
            '{ deploy.analysis.a = { query = "up"; successRate.service = "api"; }; }',
            'deploy.analysis.a: sets "query" and "successRate", which exclude each other: keep one',
        ),
        (
            '{ deploy.analysis.a.successRate.service = "nope"; }',
            'deploy.analysis.a: successRate.service names unknown service "nope" (services: '
            '"api", "batch", "cache", "store", "worker")',
        ),
        (
            '{ deploy.analysis.a.successRate.service = "cache"; }',
            "deploy.analysis.a: successRate counts the HTTP responses the balancers pass, but "
            'service "cache" has no HTTP ingress: give it one, or measure it with a query',
        ),
        (
            '{ deploy.analysis.a.query = "up{service=\\"{{service}}\\"}"; }',
            "deploy.analysis.a: the query uses {{service}}, but service is not set: set service",
        ),
    ],
)
def test_problems_name_the_analysis(nix: Nix, declaration: str, problem: str) -> None:
    assert problems(nix, declaration) == [problem]


def test_an_analysis_without_a_monitoring_host(nix: Nix) -> None:
    declared = '{ deploy.analysis.a.query = "up"; monitoring.hostTag = "watcher"; }'
    assert problems(nix, declared) == [
        'deploy.analysis.a: no host carries the tag "watcher" (monitoring.hostTag) to run the '
        "Prometheus it asks: tag a monitoring host, or remove the analysis"
    ]


def test_bad_values_fail_evaluation_naming_the_option(nix: Nix) -> None:
    for declaration, option in [
        ('{ deploy.analysis.a.successRate = { service = "api"; min = 2; }; }', "min"),
        ('{ deploy.analysis.a = { query = "up"; count = 0; }; }', "count"),
        ('{ deploy.analysis.a.successRate = { service = "api"; window = "1 m"; }; }', "window"),
        ('{ deploy.analysis.a.latency = { histogram = "a-b"; maxSeconds = 1; }; }', "histogram"),
    ]:
        error = nix.error(f"{fleet(declaration)}.config.build.inventory")
        assert "deploy.analysis.a." in error and option in error, error


def test_the_lab_declares_its_analysis_through_the_same_producer(nix: Nix) -> None:
    from fleet.lab.flake import LAB_ANALYSIS

    analysis = nix.eval(
        '(import (h.repo + "/fleet/nix/inventory.nix") { hosts.a.address = "192.0.2.1"; '
        f"deploy.analysis = builtins.fromJSON {json.dumps(json.dumps(LAB_ANALYSIS))}; }})"
        ".deploy.analysis"
    )
    assert analysis[0]["name"] == "web-success"
    assert 'proxy="lab-web"' in analysis[0]["query"] and "[10s]" in analysis[0]["query"]
    assert (analysis[0]["interval"], analysis[0]["count"]) == (2, 5)


def test_promtool_reads_the_templates_queries(inventory: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    from fleet.analysis import fill

    rules = [
        {"record": f"analysis:{a['name']}", "expr": fill(a["query"], ["web1", "db.1"], [], "api")}
        for a in inventory["deploy"]["analysis"]
    ]
    path = tmp_path / "analysis.yml"
    path.write_text(json.dumps({"groups": [{"name": "analysis", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout
