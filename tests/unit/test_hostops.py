"""The operator's side of the host protocol, against a stand-in remote: how answers and
exit codes of fleet-host become results and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from fleet.hostops import RUNNING_HELPER, Fenced, HelperError, HostOps, LockHeld, helper_of
from fleet.models import Generation
from fleet.process import Result
from fleet.ssh import Endpoint

TARGET = "/nix/store/" + "b" * 32 + "-nixos-system-web1-2"


@dataclass
class FakeRemote:
    """Answers each call with the next canned (exit code, stdout, stderr)."""

    answers: list[tuple[int, str, str]]
    endpoint: Endpoint = field(default_factory=lambda: Endpoint("web1", "192.0.2.1"))
    calls: list[list[str]] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.endpoint.name

    def run(self, argv: list[str], **kwargs: Any) -> Result:
        self.calls.append(list(argv))
        self.timeouts.append(kwargs.get("timeout"))
        code, out, err = self.answers.pop(0)
        return Result(tuple(argv), code, out, err)

    def command_line(self, argv: list[str]) -> str:
        return " ".join(["ssh", self.endpoint.address, *argv])


def ops(*answers: tuple[int, str, str]) -> tuple[HostOps, FakeRemote]:
    remote = FakeRemote(list(answers))
    return HostOps(remote), remote  # type: ignore[arg-type]


def begin(host: HostOps) -> dict[str, Any]:
    return host.begin("ab" * 16, {"release": "r"}, {}, "switch", Generation(3, TARGET), 30, 20)


def test_a_target_without_fleet_host_falls_back_to_the_running_one() -> None:
    """A rollback to a generation built before fleet-host existed."""
    ok = json.dumps({"ok": True, "begun": True, "recorded": {"path": TARGET, "number": 4}})
    host, remote = ops((127, "", "sh: 1: not found"), (0, ok + "\n", ""))
    answer = begin(host)
    assert answer["helper"] == RUNNING_HELPER
    assert remote.calls[0][0] == helper_of(TARGET) and remote.calls[1][0] == RUNNING_HELPER
    assert remote.calls[0][1:] == remote.calls[1][1:]
    assert remote.calls[0][-2:] == ["--generation", "3"]


def test_exit_codes_become_their_errors() -> None:
    held = json.dumps({"ok": False, "error": "held", "holder": {"operator": "bob\x1b[2J"}})
    host, remote = ops((3, held, ""))
    with pytest.raises(LockHeld) as exc:
        begin(host)
    assert "bob?[2J" in str(exc.value) and "\x1b" not in str(exc.value)
    assert exc.value.command == f"ssh 192.0.2.1 {TARGET}/sw/bin/fleet-host begin " + " ".join(
        remote.calls[0][2:]
    )  # the step, to run again by hand
    host, _ = ops((4, json.dumps({"ok": False, "error": "no longer ours"}), ""))
    with pytest.raises(Fenced):
        host.commit(helper_of(TARGET), "ab" * 16, {})
    host, _ = ops((1, "Traceback ...", "boom"))
    with pytest.raises(HelperError, match="exit 1"):
        host.state()


def test_a_drain_no_transaction_holds_is_a_breach_recover_repairs() -> None:
    from fleet.hostops import BreachKind, parse_state

    path = "/nix/store/" + "a" * 32 + "-nixos-system-web1"
    base = {"current": 1, "running": path, "generations": [[1, 0, path]]}
    assert parse_state(base).breaches("web1") == []
    drained = parse_state(base | {"traffic": {"api": "drain"}})
    [breach] = drained.breaches("web1")
    assert breach.kind is BreachKind.ORPHAN_DRAIN and breach.repair == "fleet recover web1"
    assert "api drain" in breach.message
    # While a transaction runs, its drain is its own.
    txn = {"token": "ab" * 16, "holder": {}, "mode": "switch", "state": "begun", "deadline": 0}
    assert parse_state(base | {"traffic": {"api": "drain"}, "txn": txn}).breaches("web1") == []


def test_a_prometheus_query_goes_through_the_hosts_program() -> None:
    """Every word one argument: a query that looks like an option stays a query."""
    answer = json.dumps({"ok": True, "status": "success", "data": {"result": []}})
    host, remote = ops((0, answer, ""), (0, answer, ""))
    assert host.prom_query(9090, "-up or x", at="2027-01-15T08:00:00Z") == {
        "status": "success", "data": {"result": []}}  # fmt: skip
    assert remote.calls[0] == [RUNNING_HELPER, "prom-query", "--port=9090", "--query=-up or x",
                               "--time=2027-01-15T08:00:00Z"]  # fmt: skip
    assert remote.timeouts[0] == 30  # a measurement never hangs the rollout
    assert host.prom_alerts(9090)["status"] == "success"
    assert remote.calls[1] == [RUNNING_HELPER, "prom-alerts", "--port=9090"]
    failed = json.dumps({"ok": False, "error": "127.0.0.1:9090/api/v1/query: Connection refused"})
    host, _ = ops((1, failed, ""))
    with pytest.raises(
        HelperError, match=r"web1: 127\.0\.0\.1:9090/api/v1/query: Connection refused"
    ):
        host.prom_query(9090, "up")


USAGE = (2, "", "usage: fleet-host begin ...\nfleet-host: error: unrecognized arguments: --x")


def test_begin_asks_an_older_helper_the_older_way() -> None:
    """A helper that refuses an option refused it before doing anything: the newest form
    first, then without activating in the same call, then (nothing to deliver) without
    secrets."""
    ok = json.dumps({"ok": True, "begun": True, "recorded": {"path": TARGET, "number": 4}})
    host, remote = ops(USAGE, USAGE, (0, ok, ""))
    answer = host.begin("ab" * 16, {"release": "r"}, {}, "switch", Generation(None, TARGET),
                        30, 20, secrets=[], health=10, activate=5)  # fmt: skip
    assert answer["begun"]
    newest, older, oldest = remote.calls
    assert newest[-7:] == ["--checks", "--health", "10", "--activate", "--confirm-timeout",
                           "5", "--secrets"]  # fmt: skip
    assert older == [*newest[:-7], "--secrets"] and oldest == newest[:-7]


def test_secrets_to_deliver_are_never_dropped_for_an_older_helper() -> None:
    host, remote = ops(USAGE, USAGE)
    with pytest.raises(HelperError, match="unrecognized arguments"):
        host.begin("ab" * 16, {"release": "r"}, {}, "switch", Generation(None, TARGET), 30, 20,
                   secrets=[{"service": "s", "name": "n", "data": "eA=="}], health=10,
                   activate=5)  # fmt: skip
    assert all("--secrets" in call for call in remote.calls) and len(remote.calls) == 2


def test_activate_asks_for_the_checks_then_without() -> None:
    answer = {"ok": True, "switchExit": 0, "settled": True, "failedUnits": [], "deadline": 9.0,
              "checks": None, "seconds": 0.25}  # fmt: skip
    host, remote = ops(USAGE, (0, json.dumps(answer), ""))
    activation = host.activate(helper_of(TARGET), "ab" * 16, 10, 5)
    assert activation.health is None and activation.seconds == 0.25
    assert remote.calls[0][-1] == "--checks" and "--checks" not in remote.calls[1]


def test_the_hosts_run_of_checks_counts_only_for_exactly_those_checks() -> None:
    from fleet import health
    from fleet.hostops import declared

    raw = [{"name": n, "service": None, "type": "tcp", "port": 80, "timeout": 1,
            "interval": 1, "retries": 1} for n in ("a", "b")]  # fmt: skip
    checks = declared(raw, "test")
    ran = {"ok": False, "checks": [
        {"name": "a", "ok": True, "attempts": 1, "message": "connected"},
        {"name": "b", "ok": False, "attempts": 3, "message": "refused\x1b[2J"},
    ]}  # fmt: skip
    made = health.from_host(ran, checks)
    assert made is not None and not made.ok
    assert made.message == "check b: refused?[2J"
    assert health.from_host({"checks": ran["checks"][:1]}, checks) is None  # one is missing
    assert health.from_host(None, checks) is None
    assert health.from_host(ran, declared([{"name": "a"}], "test")) is None  # unreadable
