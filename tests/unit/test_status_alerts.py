"""`fleet status` and `fleet report` with the fleet's alerts, against stand-in hosts: one
alert query per run, to the first monitoring server that answers, beside the hosts' own;
whatever a monitoring host answers, status and the page stand."""

from __future__ import annotations

import contextlib
import html.parser
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fleet import alerts, config, flows, opening, report
from fleet.cli import cli
from fleet.errors import SshError
from fleet.hostops import parse_state
from fleet.inventory import DeployPolicy, Host, Inventory, Monitoring, NodeTarget
from fleet.status import FleetStatus, HostStatus

NAMES = ["web1", "web2", "mon1", "mon2"]
PATH = "/nix/store/" + "a" * 32 + "-nixos-system-web1"


def host(name: str) -> Host:
    return Host(name, "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ())


def monitoring(servers: tuple[str, ...] = ("mon1", "mon2")) -> Monitoring:
    return Monitoring(
        servers=servers,
        prometheus_port=9090,
        alertmanager_port=9093,
        blackbox_port=9115,
        node_exporter_port=9100,
        haproxy_port=8405,
        scrape_interval="15s",
        webhook=None,
        textfile_directory="/var/lib/fleet-metrics",
        nodes=tuple(NodeTarget(n, "192.0.2.1", ()) for n in NAMES),
        services={},
        balancers=(),
    )


def session(watched: Monitoring | None) -> flows.Session:
    inventory = Inventory(
        {n: host(n) for n in NAMES}, DeployPolicy(1, 1, 1, 0, 1.0, 1.0), monitoring=watched
    )
    return flows.Session("/flake", config.Config({}, ()), inventory)


def alert(name: str, state: str = "firing", host: str | None = "web1", **more: Any) -> Any:
    labels = {"alertname": name, "severity": "warning"} | ({"host": host} if host else {})
    return {
        "labels": labels,
        "annotations": {"summary": f"{name} on {host}"},
        "state": state,
        "activeAt": "2027-01-15T08:00:00Z",
        "value": "1e+00",
    } | more


def answer(*entries: Any) -> dict[str, Any]:
    return {"status": "success", "data": {"alerts": list(entries)}}


@dataclass
class Monitor:
    """What each monitoring server answers: a dict, or an exception it raises."""

    answers: dict[str, Any]
    asked: list[tuple[str, int, float | None]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)


@dataclass
class FakeOps:
    name: str
    monitor: Monitor
    remote: Any = None

    def prom_alerts(self, port: int, timeout: float | None = None) -> dict[str, Any]:
        self.monitor.asked.append((self.name, port, timeout))
        self.monitor.started.set()
        got = self.monitor.answers[self.name]
        if isinstance(got, Exception):
            raise got
        return got  # type: ignore[no-any-return]


@pytest.fixture()
def monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Monitor]:
    """Stand-ins for ssh and the hosts: every host healthy, the monitoring servers
    answering as the test says."""
    state = parse_state({"current": 1, "running": PATH, "generations": [[1, 0, PATH]]})
    mon = Monitor({})

    def probe(h: Host, _ops: Any) -> HostStatus:
        if h.name == "web2":
            raise SshError("web2 (root@192.0.2.1:22): cannot connect: No route to host")
        return HostStatus(h.name, True, state=state, health=None)

    class NoTransport:
        @contextlib.contextmanager
        def hold(self, _remote: object) -> Iterator[None]:
            yield

    @contextlib.contextmanager
    def transport(_self: flows.Session, _timeout: float | None = None) -> Iterator[object]:
        yield NoTransport()

    monkeypatch.setattr(flows, "probe", probe)
    monkeypatch.setattr(flows.Session, "transport", transport)
    monkeypatch.setattr(flows.Session, "ops", lambda _s, _t, h: FakeOps(h.name, mon))
    yield mon


def run(monkeypatch: pytest.MonkeyPatch, watched: Monitoring | None, *args: str) -> Any:
    monkeypatch.setattr(opening, "start", lambda flake: flake)  # no flake, no Nix
    monkeypatch.setattr(flows, "open_session", lambda _flake, _parallel=None: session(watched))
    return CliRunner().invoke(cli, list(args))


def test_alerts_are_grouped_by_their_host_label() -> None:
    found = alerts.group(
        answer(
            alert("FleetRecentRollback", "pending"),
            alert("FleetUnitFailed"),
            alert("FleetUnitFailed", activeAt="2027-01-15T09:00:00Z"),  # a second unit
            alert("FleetHostDown", host="mon1"),
            alert("Watchdog", host=None),
            alert("FleetHostDown", host="retired"),  # a host the fleet no longer declares
            alert("FleetHostDown", host="web2"),  # not asked about
        ),
        ["web1", "mon1"],
        NAMES,
    )
    assert [(a.name, a.state.value) for a in found.by_host["web1"]] == [
        ("FleetUnitFailed", "firing"),
        ("FleetUnitFailed", "firing"),
        ("FleetRecentRollback", "pending"),
    ]
    assert alerts.cell(found.by_host["web1"]) == "FleetUnitFailed, FleetRecentRollback (pending)"
    assert [a.name for a in found.by_host["mon1"]] == ["FleetHostDown"]
    assert [(a.name, a.host) for a in found.fleet] == [
        ("FleetHostDown", "retired"),
        ("Watchdog", None),
    ]
    assert found.of("web2") == ()
    assert found.by_host["web1"][2].as_json() == {
        "name": "FleetRecentRollback",
        "state": "pending",
        "severity": "warning",
        "summary": "FleetRecentRollback on web1",
        "activeAt": "2027-01-15T08:00:00Z",
    }


@pytest.mark.parametrize(
    "entry",
    [
        "FleetUnitFailed",
        None,
        [],
        {"labels": "alertname=x", "state": "firing"},
        {"labels": {"alertname": 7}, "state": "firing"},
        {"labels": {"alertname": ""}, "state": "firing"},
        {"labels": {"alertname": "X"}, "state": "inactive"},
        {"labels": {"alertname": "X"}, "state": ["firing"]},
        {"labels": {"alertname": "X", "host": ["web1"]}, "state": "firing"},
    ],
)
def test_an_alert_of_the_wrong_shape_is_passed_over(entry: Any) -> None:
    found = alerts.group(answer(entry, alert("Good")), ["web1"], NAMES)
    assert [a.name for a in found.by_host["web1"]] == ["Good"] and found.fleet == ()


def test_hostile_values_are_cut_and_made_printable() -> None:
    raw = alert(
        "Fleet\x1b[2JUnit" + "X" * 5000,
        annotations={"summary": "\x07" + "s" * 10**6, "description": 5},
        activeAt={"not": "a time"},
        labels={"alertname": "Big\x00" + "A" * 10**5, "severity": 3, "host": "web1"},
    )
    [got] = alerts.group(answer(raw), ["web1"], NAMES).by_host["web1"]
    assert got.name.startswith("Big?AAA") and len(got.name) <= alerts.NAME_MAX
    assert got.summary is not None and len(got.summary) <= alerts.SUMMARY_MAX
    assert got.summary.startswith("?s") and got.severity is None and got.active_at is None
    assert len(alerts.cell([got] * 10)) <= alerts.CELL_MAX


@pytest.mark.parametrize(
    "garbage",
    [
        "not json at all",
        [],
        {"status": "error", "error": "bad"},
        {"status": "success", "data": {"alerts": "many"}},
        {"status": "success", "data": None},
    ],
)
def test_a_garbage_answer_is_an_error_and_the_next_server_is_asked(
    monitor: Monitor, garbage: Any
) -> None:
    monitor.answers = {"mon1": garbage, "mon2": answer(alert("FleetUnitFailed"))}
    found = alerts.fetch(monitoring(), lambda n: FakeOps(n, monitor), ["web1"], NAMES, 15)  # type: ignore[arg-type, return-value]
    assert found.error is None and found.server == "mon2"
    assert [a.name for a in found.by_host["web1"]] == ["FleetUnitFailed"]
    assert len(found.notes) == 1 and found.notes[0].startswith("mon1: ")


def test_status_asks_one_server_once_beside_the_hosts_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    monitor.answers = {
        "mon1": SshError("mon1 (root@192.0.2.1:22): cannot connect: Connection refused"),
        "mon2": answer(
            alert("FleetUnitFailed"),
            alert("FleetRecentRollback", "pending"),
            alert("FleetHostDown", host="web2"),
            alert("Watchdog", host=None),
        ),
    }
    result = run(monkeypatch, monitoring(), "--json", "status")
    assert result.exit_code == 4, result.output  # web2 is unreachable; the alerts change nothing
    doc = json.loads(result.stdout)
    assert [(n, p) for n, p, _ in monitor.asked] == [("mon1", 9090), ("mon2", 9090)]
    assert all(t is not None and 0 < t <= 15 for _, _, t in monitor.asked)
    assert [(a["name"], a["state"]) for a in doc["web1"]["alerts"]] == [
        ("FleetUnitFailed", "firing"),
        ("FleetRecentRollback", "pending"),
    ]
    # An unreachable host's alerts are shown too: they may say why.
    assert not doc["web2"]["reachable"] and doc["web2"]["alerts"][0]["name"] == "FleetHostDown"
    assert doc["mon1"]["alerts"] == []
    assert [(a["name"], a["host"]) for a in doc["_fleetAlerts"]] == [("Watchdog", None)]
    assert doc["_alertsError"] is None
    assert "alerts from mon2; mon1 (root@192.0.2.1:22): cannot connect" in result.stderr


def test_the_alerts_are_asked_while_the_hosts_are(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    """Neither waits for the other: each side here waits until the other has begun."""
    monitor.answers = {"mon1": answer()}
    probing = threading.Event()
    probe = flows.probe  # type: ignore[attr-defined]  # the fixture's stand-in

    def slow_probe(h: Host, ops: Any) -> HostStatus:
        probing.set()
        assert monitor.started.wait(5), "the alerts were not asked while the hosts were"
        return probe(h, ops)

    original = FakeOps.prom_alerts

    def slow_alerts(self: FakeOps, port: int, timeout: float | None = None) -> dict[str, Any]:
        got = original(self, port, timeout)
        assert probing.wait(5)
        return got

    monkeypatch.setattr(flows, "probe", slow_probe)
    monkeypatch.setattr(FakeOps, "prom_alerts", slow_alerts)
    found = flows.status(session(monitoring()), ["web1"])
    assert found.alerts is not None and found.alerts.server == "mon1"
    assert len(monitor.asked) == 1


def test_no_monitoring_no_column_no_query(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    result = run(monkeypatch, None, "--json", "status", "web1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"web1": json.loads(result.stdout)["web1"]}
    assert json.loads(result.stdout)["web1"]["alerts"] is None and monitor.asked == []
    result = run(monkeypatch, None, "status", "web1")
    assert "alerts" not in result.stdout.splitlines()[0]


def test_no_monitoring_server_answers(monkeypatch: pytest.MonkeyPatch, monitor: Monitor) -> None:
    monitor.answers = {
        "mon1": SshError("mon1: ssh: no answer within 15 s"),
        "mon2": {"status": "success", "data": {"alerts": None}},
    }
    result = run(monkeypatch, monitoring(), "--json", "status", "web1")
    assert result.exit_code == 0, result.output  # the hosts are fine: so is status
    doc = json.loads(result.stdout)
    assert doc["web1"]["alerts"] is None and doc["_fleetAlerts"] is None
    assert (
        doc["_alertsError"]
        == "mon1: ssh: no answer within 15 s; mon2: no list of alerts in its answer"
    )
    [note] = result.stderr.splitlines()
    assert note.startswith("alerts unknown: mon1: ssh")
    result = run(monkeypatch, monitoring(), "status", "web1")
    header, _, row = result.stdout.splitlines()
    assert header.split()[-1] == "alerts" and row.split()[-1] == "unknown"


def test_the_table_keeps_hostile_alerts_on_one_line(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    hostile = alert("Evil\x1b[31m\nNext line" + "E" * 500, "pending")
    monitor.answers = {"mon1": answer(hostile, alert("FleetUnitFailed"))}
    result = run(monkeypatch, monitoring(), "status")
    assert result.exit_code == 4  # web2 unreachable
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + len(NAMES) and "\x1b" not in result.stdout
    header = lines[0].split()
    assert header[-1] == "alerts"
    [web1] = [line for line in lines if line.startswith("web1")]
    assert "FleetUnitFailed, Evil?[31m?Next lineEEE" in web1 and web1.endswith("…")


def test_the_fleets_keys_cannot_be_a_hosts_name() -> None:
    """A host name holds letters, digits and '-': the document's own keys start with '_'."""
    found = FleetStatus([HostStatus("fleetAlerts", False, "x")], alerts.FleetAlerts())
    assert {"fleetAlerts", "_fleetAlerts", "_alertsError"} <= set(found.as_json())


class Cells(html.parser.HTMLParser):
    """The text of the page, and every element and attribute it has."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_report_shows_alerts_beside_the_last_release_escaped(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor, tmp_path: Path
) -> None:
    evil = "<script>alert('x')</script>\" onmouseover=\"steal()"
    monitor.answers = {
        "mon1": answer(
            alert("FleetUnitFailed", annotations={"summary": evil}),
            alert("Pending<b>", "pending"),
            alert("FleetHostDown", host="web2"),
            alert("<img src=x>", host=None, annotations={"summary": evil}),
        )
    }
    monkeypatch.setattr(flows, "history", lambda *_a: ([], []))
    page = tmp_path / "r.html"
    result = run(monkeypatch, monitoring(), "--json", "report", "--html", str(page))
    assert result.exit_code == 4, result.output
    assert json.loads(result.stdout)["attention"] == ["web2"]
    text = page.read_text()
    assert "<script>" not in text and "<img" not in text and "<b>" not in text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&#34; onmouseover=&#34;steal()" in text
    parsed = Cells()
    parsed.feed(text)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert not [a for a, _ in parsed.attrs if a.startswith("on")]
    shown = "".join(parsed.text)
    assert f"FleetUnitFailed: {evil}" in shown and "Pending<b> (pending)" in shown
    assert "FleetHostDown" in shown and f"<img src=x>: {evil}" in shown
    assert "Fleet alerts" in shown and "Alerts" in shown


def test_the_report_without_monitoring_has_no_alerts() -> None:
    found = FleetStatus([HostStatus("web1", False, "unreachable")])
    page = report.render("/flake", found, [], [])
    assert "Alerts" not in page and "Fleet alerts" not in page
    found = FleetStatus(
        [HostStatus("web1", False, "unreachable")], alerts.FleetAlerts(error="mon1: <refused>")
    )
    page = report.render("/flake", found, [], [])
    assert "Alerts unknown: mon1: &lt;refused&gt;" in page and "unknown</span>" in page
