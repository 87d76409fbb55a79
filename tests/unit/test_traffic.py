"""Reading the balancers (fleet/traffic.py) against canned answers of fleet-host
traffic-stat; the lab's tests read real HAProxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet import traffic
from fleet.inventory import Balanced, Instance, Traffic
from tests.unit.test_hostops import FakeRemote

TRAFFIC = Traffic(
    agent_port=9777,
    drain_timeout=2,
    socket="/run/haproxy/admin.sock",
    balancers=("lb1", "lb2"),
    services={
        "api": Balanced("api", "http", 80, 1, (Instance("app1", "192.0.2.11", 8080),
                                               Instance("app2", "192.0.2.12", 8080)), None),
    },
)  # fmt: skip


def row(server: str, status: str, weight: Any = 100, sessions: Any = 0, **extra: Any) -> dict:
    return {"backend": "api", "server": server, "status": status, "weight": weight,
            "sessions": sessions, "check": "L7OK", "agent": "L7OK"} | extra  # fmt: skip


def answer(*rows: dict) -> tuple[int, str, str]:
    return 0, json.dumps({"ok": True, "servers": list(rows)}), ""


def remotes(per_balancer: dict[str, list[tuple[int, str, str]]]) -> Any:
    fakes = {name: FakeRemote(list(answers)) for name, answers in per_balancer.items()}
    return lambda name: fakes[name]


def test_a_balancers_servers_of_other_backends_and_odd_fields_are_read_safely() -> None:
    found = traffic.read(TRAFFIC, "lb1", FakeRemote([answer(
        row("app1", "UP"), row("app2", "DRAIN\x1b[2J", weight="x", sessions=None),
        {"backend": "stats", "server": "x", "status": "UP"}, "not a row")]))  # type: ignore[arg-type]  # fmt: skip
    assert [(s.host, s.status, s.weight, s.sessions) for s in found] == [
        ("app1", "UP", 100, 0), ("app2", "DRAIN?[2J", None, None)]  # fmt: skip
    assert found[0].serving and not found[1].serving and found[1].drained


@pytest.mark.parametrize(
    ("status", "weight", "sessions", "serving", "drained"),
    [("UP", 100, 3, True, False), ("UP", 0, 0, False, True), ("DRAIN", 0, 2, False, False),
     ("DRAIN (agent)", 0, 0, False, True), ("DOWN", 100, 0, False, True),
     ("MAINT", 100, 0, False, True), ("UP 1/2", 100, 0, True, False)],
)  # fmt: skip
def test_what_serving_and_drained_mean(
    status: str, weight: int, sessions: int, serving: bool, drained: bool
) -> None:
    server = traffic.Server("lb1", "api", "app1", status, weight, sessions, "", "")
    assert (server.serving, server.drained) == (serving, drained)


def test_a_drain_is_done_when_every_balancer_agrees() -> None:
    read = remotes({
        "lb1": [answer(row("app1", "UP")), answer(row("app1", "DRAIN", 0, 1)),
                answer(row("app1", "DRAIN", 0, 0))],
        "lb2": [answer(row("app1", "DRAIN", 0, 0))] * 3,
    })  # fmt: skip
    waited = traffic.wait_drained(TRAFFIC, read, "app1", ["api"], 10)
    assert waited.done and waited.pending == ()


def test_a_drain_that_times_out_names_what_was_pending() -> None:
    read = remotes({"lb1": [answer(row("app1", "DRAIN", 0, 4))] * 50,
                    "lb2": [answer(row("app1", "DRAIN", 0, 0))] * 50})  # fmt: skip
    waited = traffic.wait_drained(TRAFFIC, read, "app1", ["api"], 0.5)
    assert not waited.done
    assert waited.describe() == "api on lb1: DRAIN, 4 sessions"


def test_a_balancer_that_cannot_be_read_is_an_error_not_a_guess() -> None:
    read = remotes({"lb1": [answer(row("app1", "DRAIN", 0, 0))],
                    "lb2": [(255, "", "ssh: connect to host lb2 port 22: refused")]})  # fmt: skip
    with pytest.raises(traffic.BalancerError, match="balancer lb2"):
        traffic.wait_drained(TRAFFIC, read, "app1", ["api"], 5)


def test_the_view_keeps_what_it_could_read_and_says_what_it_could_not() -> None:
    read = remotes({"lb1": [answer(row("app2", "UP"), row("app1", "UP"))],
                    "lb2": [(255, "", "ssh: no route to host")]})  # fmt: skip
    servers, errors = traffic.view(TRAFFIC, read, ["app1"])
    assert [(s.balancer, s.host) for s in servers] == [("lb1", "app1")]
    assert list(errors) == ["lb2"] and "no route" in errors["lb2"]


@pytest.mark.parametrize(
    ("instances", "canaries", "share", "weight"),
    [(4, 1, 10, 33), (4, 1, 25, 100), (4, 2, 10, 11), (10, 1, 5, 47), (2, 1, 90, 100),
     (3, 3, 10, 100), (100, 1, 1, 100), (4, 1, 1, 3), (200, 1, 1, 100)],
)  # fmt: skip
def test_a_canarys_weight_gives_it_its_share(
    instances: int, canaries: int, share: int, weight: int
) -> None:
    assert traffic.canary_weight(instances, canaries, share) == weight
    if weight < 100 and canaries < instances:
        got = canaries * weight / (canaries * weight + (instances - canaries) * 100)
        assert abs(got * 100 - share) < 1.5


@pytest.mark.parametrize("reason", ["two\nlines", "x" * 201, "bell\a"])
def test_a_reason_that_is_not_one_short_printable_line_is_bad_input(reason: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "--flake", "/nonexistent", "drain", "web1",
         "--reason", reason],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--reason: at most 200 printable characters" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
