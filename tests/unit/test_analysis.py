"""Canary analysis: the condition grammar, placeholders, judging Prometheus' answers, the
outcome rules, and what the rollout and the inventory make of them."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from fleet import analysis
from fleet.analysis import Analysis, ConditionError, Outcome, fill, judge, parse_condition
from fleet.errors import ExitCode, FleetError, InventoryError
from fleet.inventory import parse
from fleet.models import HostReport, HostResult
from fleet.rollout import Release, Report


def vector(*values: str) -> dict[str, Any]:
    samples = [{"metric": {}, "value": [1.0, v]} for v in values]
    return {"status": "success", "data": {"resultType": "vector", "result": samples}}


# The grammar.


@pytest.mark.parametrize(
    ("text", "true", "false"),
    [
        ("result >= 0.99", [0.99, 1], [0.98]),
        ("result<0.5", [0.4], [0.5]),
        ("result == 1", [1.0], [0.999]),
        ("result != 0", [1, -1], [0]),
        ("result > -1e-3", [0], [-0.01]),
        ("result >= 0.9 and result <= 1", [0.95], [0.8, 1.1]),
        ("result < 0.1 or result > 0.9", [0.05, 0.95], [0.5]),
        # `and` binds tighter than `or`.
        ("result == 5 or result > 0 and result < 1", [5, 0.5], [2, -1]),
        ("  result   <=   .5  ", [0.5], [0.6]),
    ],
)
def test_conditions(text: str, true: list[float], false: list[float]) -> None:
    condition = parse_condition(text)
    assert all(condition.holds(v) for v in true)
    assert not any(condition.holds(v) for v in false)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "result",
        "result >=",
        "result >= x",
        "0.99 <= result",
        "result => 0.99",
        "result = 1",
        "result >= 0.99 and",
        "result >= 0.99 or or result < 1",
        "result >= 0.99 && result < 1",
        "Result >= 1",
        "result >= 1e999",
        "result >= nan",
        "__import__('os').system('id')",
        "result >= 0.99; rm -rf /",
        "result >= (0.99)",
        "len(result) > 0",
        "result >= 0.99 " + "and result >= 0 " * 20,
    ],
)
def test_hostile_or_malformed_conditions_are_refused(text: str) -> None:
    with pytest.raises(ConditionError):
        parse_condition(text)


# Placeholders.


def test_placeholders_are_filled() -> None:
    query = 'a{server=~"{{hosts}}"} / b{host=~"{{baseline}}",proxy="{{service}}"}'
    assert fill(query, ["web2", "web1"], ["db.1"], "api") == (
        'a{server=~"web1|web2"} / b{host=~"db\\\\.1",proxy="api"}'
    )
    assert fill(query, ["web1"], [], None) == 'a{server=~"web1"} / b{host=~"",proxy=""}'


# Judging one answer.


def test_judging_answers() -> None:
    at_least = parse_condition("result >= 0.99")
    assert judge(vector("0.995", "1"), at_least)[1:] == (Outcome.SUCCESSFUL, None)
    values, outcome, message = judge(vector("1", "0.5"), at_least)
    assert (values, outcome) == ((1.0, 0.5), Outcome.FAILED)
    assert message == "0.5 does not satisfy 'result >= 0.99'"
    assert judge(vector(), at_least)[1] is Outcome.INCONCLUSIVE
    assert judge(vector("NaN"), at_least)[1] is Outcome.INCONCLUSIVE
    assert judge(vector("1", "NaN"), at_least)[1] is Outcome.INCONCLUSIVE
    assert judge(vector("+Inf"), at_least)[1] is Outcome.SUCCESSFUL
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1, "0.1"]}}
    assert judge(scalar, at_least)[1] is Outcome.FAILED
    matrix = {"status": "success", "data": {"resultType": "matrix", "result": []}}
    assert judge(matrix, at_least)[1] is Outcome.INCONCLUSIVE
    assert judge({"status": "error", "error": "bad"}, at_least)[1] is Outcome.INCONCLUSIVE
    garbage = {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1]}]}}
    assert judge(garbage, at_least)[1] is Outcome.INCONCLUSIVE


# The outcome rules, with a fake Prometheus.


class Fake:
    """Answers queued per query; an Exception in the queue is raised."""

    def __init__(self, answers: Mapping[str, Sequence[dict[str, Any] | Exception]]) -> None:
        self.answers = {q: list(a) for q, a in answers.items()}
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, query: str) -> Mapping[str, Any]:
        with self.lock:
            self.asked.append(query)
            answer = self.answers[query].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def spec(name: str = "a", count: int = 3, failures: int = 0, inconclusives: int = 0) -> Analysis:
    return Analysis(
        name=name,
        query=f'{name}{{server=~"{{{{hosts}}}}"}}',
        condition=parse_condition("result >= 0.99"),
        interval=1,
        count=count,
        failure_limit=failures,
        inconclusive_limit=inconclusives,
    )


def no_wait(stop: threading.Event, _seconds: float) -> bool:
    return stop.is_set()


def run(
    analyses: Sequence[Analysis], fake: Fake, seen: list[str] | None = None
) -> list[analysis.Run]:
    def note(r: analysis.Run, m: analysis.Measurement) -> None:
        if seen is not None:
            seen.append(f"{r.analysis.name}:{m.outcome.value}")

    return analysis.run_all(
        analyses,
        ["web1"],
        ["web2"],
        fake,
        note,
        wait=no_wait,
        now=lambda: datetime(2027, 1, 1, tzinfo=UTC),
    )


GOOD, BAD, EMPTY = vector("1"), vector("0.5"), vector()


def test_every_measurement_successful_succeeds() -> None:
    seen: list[str] = []
    fake = Fake({'a{server=~"web1"}': [GOOD, GOOD, GOOD]})
    [result] = run([spec()], fake, seen)
    assert result.result is Outcome.SUCCESSFUL and result.message is None
    assert seen == ["a:successful"] * 3
    assert result.query == 'a{server=~"web1"}'
    assert result.as_json()["measurements"][0] == {
        "time": "2027-01-01T00:00:00.000+00:00",
        "values": [1.0],
        "outcome": "successful",
        "message": None,
    }


def test_a_failure_past_the_limit_fails_at_once() -> None:
    fake = Fake({'a{server=~"web1"}': [GOOD, BAD, GOOD]})
    [result] = run([spec()], fake)
    assert result.result is Outcome.FAILED
    assert len(result.measurements) == 2  # stopped as soon as it failed
    assert "0.5 does not satisfy" in str(result.message)


def test_failures_within_the_limit_do_not_fail() -> None:
    fake = Fake({'a{server=~"web1"}': [BAD, GOOD, GOOD]})
    assert run([spec(failures=1)], fake)[0].result is Outcome.SUCCESSFUL
    fake = Fake({'a{server=~"web1"}': [BAD, BAD, GOOD]})
    assert run([spec(failures=1)], fake)[0].result is Outcome.FAILED


def test_inconclusive_past_the_limit_is_inconclusive() -> None:
    answers: list[dict[str, Any] | Exception] = [EMPTY, FleetError("mon1: refused"), GOOD]
    fake = Fake({'a{server=~"web1"}': answers})
    [result] = run([spec(inconclusives=1)], fake)
    assert result.result is Outcome.INCONCLUSIVE
    assert result.message == "query failed: mon1: refused"
    assert [m.outcome for m in result.measurements] == [
        Outcome.INCONCLUSIVE,
        Outcome.INCONCLUSIVE,
        Outcome.SUCCESSFUL,
    ]
    fake = Fake({'a{server=~"web1"}': [EMPTY, vector("NaN"), GOOD]})
    assert run([spec(inconclusives=2)], fake)[0].result is Outcome.SUCCESSFUL


def test_a_failure_outweighs_inconclusives() -> None:
    fake = Fake({'a{server=~"web1"}': [EMPTY, EMPTY, BAD]})
    assert run([spec()], fake)[0].result is Outcome.FAILED


def test_one_failed_analysis_stops_the_others() -> None:
    failing = spec("a", count=3)
    slow = spec("b", count=1000)
    fake = Fake({'a{server=~"web1"}': [BAD], 'b{server=~"web1"}': [GOOD] * 1000})
    first, second = run([failing, slow], fake)
    assert first.result is Outcome.FAILED
    assert second.result is Outcome.INCONCLUSIVE
    assert second.message == "cut short: another analysis failed"
    assert len(second.measurements) < 1000
    assert analysis.verdict([first, second]) is Outcome.FAILED


def test_the_verdict_of_several() -> None:
    def decided(outcome: Outcome) -> analysis.Run:
        r = analysis.Run(spec(), "q")
        r.result = outcome
        return r

    ok, inconclusive = decided(Outcome.SUCCESSFUL), decided(Outcome.INCONCLUSIVE)
    assert analysis.verdict([ok, ok]) is Outcome.SUCCESSFUL
    assert analysis.verdict([ok, inconclusive]) is Outcome.INCONCLUSIVE
    assert analysis.verdict([inconclusive, decided(Outcome.FAILED)]) is Outcome.FAILED


def test_nan_values_are_written_as_prometheus_writes_them() -> None:
    m = analysis.Measurement("t", (math.nan, 1.0), Outcome.INCONCLUSIVE, "NaN")
    assert m.as_json()["values"] == ["nan", 1.0]


# The report.


def test_an_inconclusive_analysis_makes_the_report_ask_for_attention() -> None:
    release = Release("r", "deploy", "op", "flake", None, "now")
    canary = HostReport("web1", HostResult.DEPLOYED, changed=True)
    report = Report(release, [canary, HostReport("web2")], stopped="analysis inconclusive")
    held = analysis.Run(spec(), "q")
    held.result = Outcome.INCONCLUSIVE
    report.analysis = [held]
    assert report.exit_code is ExitCode.ATTENTION
    assert report.as_json()["analysis"][0]["result"] == "inconclusive"
    held.result = Outcome.FAILED
    canary.result = HostResult.ROLLED_BACK
    assert report.exit_code is ExitCode.ROLLED_BACK
    report.analysis, report.stopped = [], None
    canary.result = HostResult.DEPLOYED
    assert report.as_json()["analysis"] == []


# The inventory.

INVENTORY: dict[str, Any] = {
    "schemaVersion": 1,
    "hosts": {
        "mon1": {
            "address": "192.0.2.1",
            "sshPort": 22,
            "sshUser": "root",
            "tags": ["monitoring"],
            "system": "x86_64-linux",
            "hostKey": None,
            "services": [],
            "checks": [],
        }
    },
    "deploy": {
        "parallel": 1,
        "canary": 1,
        "batchSize": 1,
        "maxFailures": 0,
        "healthTimeout": 30,
        "confirmTimeout": 20,
        "analysis": [
            {
                "name": "errors",
                "query": "up",
                "service": None,
                "interval": 2,
                "count": 5,
                "successCondition": "result == 1",
                "failureLimit": 0,
                "inconclusiveLimit": 1,
            }
        ],
    },
    "monitoring": {
        "servers": ["mon1"],
        "prometheusPort": 9090,
        "alertmanagerPort": 9093,
        "blackboxPort": 9115,
        "nodeExporterPort": 9100,
        "haproxyPort": 8405,
        "scrapeInterval": "15s",
        "webhook": None,
        "textfileDirectory": "/var/lib/fleet-metrics",
        "nodes": {"mon1": {"address": "192.0.2.1", "tags": ["monitoring"]}},
        "services": {},
        "balancers": [],
    },
}


def test_the_inventory_parses_its_analyses() -> None:
    [parsed] = parse(INVENTORY, "test").deploy.analysis
    assert (parsed.name, parsed.interval, parsed.count, parsed.inconclusive_limit) == (
        "errors",
        2.0,
        5,
        1,
    )
    assert parsed.condition.holds(1) and not parsed.condition.holds(0)


def changed(change: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(INVENTORY)
    data["deploy"]["analysis"][0] |= change
    return data


def test_a_bad_condition_is_bad_input_naming_the_analysis() -> None:
    with pytest.raises(InventoryError) as caught:
        parse(changed({"successCondition": "result >= os.system(1)"}), "test")
    message = str(caught.value)
    assert message.startswith("inventory from test: deploy.analysis 'errors': successCondition")
    assert "\n" not in message
    assert caught.value.exit_code is ExitCode.USAGE


def test_the_service_placeholder_needs_a_service() -> None:
    with pytest.raises(InventoryError, match="uses \\{\\{service\\}\\} but names no service"):
        parse(changed({"query": 'up{service="{{service}}"}'}), "test")


def test_an_analysis_needs_monitoring() -> None:
    data = copy.deepcopy(INVENTORY)
    data["monitoring"] = None
    with pytest.raises(InventoryError, match="no monitoring host"):
        parse(data, "test")


def test_two_analyses_of_one_name() -> None:
    data = copy.deepcopy(INVENTORY)
    data["deploy"]["analysis"] *= 2
    with pytest.raises(InventoryError, match="'errors' twice"):
        parse(data, "test")


def test_a_dry_run_names_the_analyses_a_deploy_would_run() -> None:
    from fleet.flows import analyses_to_run
    from fleet.rollout import DeployOptions, Plan

    inventory = parse(INVENTORY, "test")
    options = DeployOptions(1, 1, 1, 0, 30, 20)
    canary = Plan("mon1", None, "/nix/store/x", True, wave=1, why="canary (first in order)")
    assert analyses_to_run(inventory, options, [canary]) == ["errors"]
    later = Plan("mon1", None, "/nix/store/x", True, wave=1, why="tier 0")
    assert analyses_to_run(inventory, options, [later]) == []
    skipping = DeployOptions(1, 1, 1, 0, 30, 20, skip_analysis=True)
    assert analyses_to_run(inventory, skipping, [canary]) == []
    booting = DeployOptions(1, 1, 1, 0, 30, 20, boot=True)
    assert analyses_to_run(inventory, booting, [canary]) == []
