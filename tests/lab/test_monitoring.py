"""The fleet's monitoring in the lab: Debian's Prometheus, Alertmanager, blackbox and node
exporters, configured by the fleet's generator, watching real lab hosts through deploys,
rollbacks and faults; Prometheus reached as the tool reaches it, through ssh. Last, canary
analysis: after the canary wave, the lab's declared analysis asks Prometheus for the share
of lab-web's answers through the balancer that are not 5xx, under client load (after the
other tests, whose quiet fleet its rollbacks would disturb)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.lab import flake, ops
from fleet.lab.layout import Lab
from fleet.lab.load import Clients
from tests.lab.fleetrun import (
    assert_safe,
    faulted,
    fleet_argv,
    own_lab,
    results,
    run_fleet,
    running_paths,
    set_release,
)

pytestmark = [pytest.mark.lab]

APPS = ["lab1", "lab2"]
BALANCER = "lab3"
MONITOR = "lab4"
HOSTS = [*APPS, BALANCER, MONITOR]
FLEET_HOST = "/run/current-system/sw/bin/fleet-host"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Four hosts beside the session's lab: two run lab-web, one HAProxy, one monitors."""
    with own_lab(52, 4, balancers=1, monitoring=True) as instance:
        yield instance


def query(lab: Lab, promql: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus answers, asked through the monitoring host's ssh."""
    argv = ["exec", MONITOR, "--", FLEET_HOST, "prom-query", "--port", "9090", "--query", promql]
    code, report, err = run_fleet(lab, *argv)
    assert code == 0, err
    answer = json.loads(report["hosts"][MONITOR]["stdout"])
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def wait_for(
    lab: Lab,
    promql: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = query(lab, promql)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"{promql}: {found}"
        time.sleep(1)


def by_host(vector: list[dict[str, Any]]) -> dict[str, str]:
    return {s["metric"]["host"]: s["value"][1] for s in vector}


class Webhook:
    """Alertmanager's receiver: the operator machine's address on the lab bridge."""

    def __init__(self, lab: Lab) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(size)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((lab.gateway, flake.WEBHOOK_PORT), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alertnames(self) -> set[tuple[str, str, str]]:
        return {
            (a["labels"]["alertname"], a["labels"].get("host", ""), a["status"])
            for message in self.received
            for a in message["alerts"]
        }


def test_prometheus_scrapes_every_host_and_service_labelled(lab: Lab, safe: None) -> None:
    up = wait_for(lab, "up", lambda v: len(v) == 12 and all(s["value"][1] == "1" for s in v))
    jobs: dict[str, set[str]] = {}
    for sample in up:
        jobs.setdefault(sample["metric"]["job"], set()).add(sample["metric"]["host"])
    assert jobs == {
        "node": set(HOSTS),
        "fleet-service": set(APPS),  # lab-web's /metrics
        "fleet-health": {*APPS, BALANCER},  # the declared checks, probed by blackbox
        "haproxy": {BALANCER},  # HAProxy's own exporter
        "prometheus": {MONITOR},
        "alertmanager": {MONITOR},
    }
    tags = {s["metric"]["host"]: s["metric"]["tags"] for s in up if s["metric"]["job"] == "node"}
    assert tags == {
        "lab1": ",lab,odd,",
        "lab2": ",lab,even,",
        "lab3": ",lab,odd,balancer,",
        "lab4": ",lab,even,monitoring,",
    }
    health = by_host(query(lab, 'probe_success{job="fleet-health"}'))
    assert health == {"lab1": "1", "lab2": "1", "lab3": "1"}
    # Each instance behind the balancer, as HAProxy counts it.
    servers = query(lab, 'haproxy_server_status{state="UP",proxy="lab-web"}')
    assert {s["metric"]["server"]: s["value"][1] for s in servers} == {"lab1": "1", "lab2": "1"}
    # Quiet: nothing fires on a healthy fleet, and `fleet status` says so per host.
    assert query(lab, 'ALERTS{alertstate="firing"}') == []
    code, status, err = run_fleet(lab, "status")
    assert code == 0, err
    assert set(status) == {*HOSTS, "_fleetAlerts", "_alertsError"}
    assert status["_alertsError"] is None and status["_fleetAlerts"] == []
    assert all(status[h]["alerts"] == [] for h in HOSTS), status


def test_a_deploy_leaves_its_release_and_phases_on_every_host(lab: Lab, safe: None) -> None:
    set_release(lab, "m1")
    code, report, err = run_fleet(lab, "deploy")
    assert code == 0, err
    release = report["release"]
    # The hosts it changed: the balancer's and the monitor's systems do not follow lab-web.
    info = wait_for(
        lab,
        f'fleet_release_info{{release="{release}"}}',
        lambda v: {s["metric"]["host"] for s in v} == set(APPS),
    )
    assert {s["metric"]["result"] for s in info} == {"deployed"}
    phases = query(lab, 'fleet_phase_duration_seconds{host="lab1",phase="activate"}')
    assert len(phases) == 1 and float(phases[0]["value"][1]) > 0
    assert by_host(query(lab, "fleet_generation_drift")) == dict.fromkeys(HOSTS, "0")
    assert by_host(query(lab, "fleet_lock_held")) == dict.fromkeys(HOSTS, "0")
    # The release joined to what is scraped, and named the fleet's last.
    joined = query(lab, 'fleet:up:release{job="fleet-service"}')
    assert {s["metric"]["release"] for s in joined} == {release}
    latest = wait_for(lab, "fleet:release:latest", lambda v: len(v) > 0)
    assert {s["metric"]["release"] for s in latest} == {release}
    # lab-web's own metrics carry the lab release each instance runs.
    versions = query(lab, "lab_web_release_info")
    assert {s["metric"]["host"]: s["metric"]["release"] for s in versions} == {
        "lab1": "m1",
        "lab2": "m1",
    }


def test_a_rollback_fires_its_alert_and_reaches_the_webhook(lab: Lab, safe: None) -> None:
    webhook = Webhook(lab)
    try:
        set_release(lab, "m2", broken="health")
        code, report, err = run_fleet(lab, "deploy", "lab1")
        assert code == 3, err
        assert results(report) == {"lab1": "rolled-back"}
        rolled = {"lab1"}
        counts = wait_for(
            lab,
            "fleet_rollbacks_total",
            lambda v: {h for h, n in by_host(v).items() if n != "0"} == rolled,
        )
        assert set(by_host(counts)) == set(HOSTS)
        firing = wait_for(
            lab,
            'ALERTS{alertname="FleetRecentRollback",alertstate="firing"}',
            lambda v: {s["metric"]["host"] for s in v} == rolled,
        )
        assert {s["metric"]["severity"] for s in firing} == {"warning"}
        # Alertmanager waits 30 s to group before it posts.
        deadline = time.monotonic() + 90
        wanted = {("FleetRecentRollback", h, "firing") for h in rolled}
        while not wanted <= webhook.alertnames():
            assert time.monotonic() < deadline, webhook.received
            time.sleep(1)
    finally:
        webhook.close()


def test_a_failed_unit_a_failing_check_and_a_lost_host_are_alerted(
    lab: Lab, safe: None, tmp_path: Path
) -> None:
    # lab-web killed outside any deploy: its unit fails (Restart=no), its check fails.
    # (The main process alone: a container refuses systemd's kill of a whole cgroup.)
    try:
        kill = ["systemctl", "kill", "--kill-who=main", "-s", "KILL", "lab-web"]
        code, _, err = run_fleet(lab, "exec", "lab2", "--", *kill)
        assert code == 0, err
        pending = wait_for(
            lab,
            'ALERTS{host="lab2"}',
            lambda v: (
                {"FleetUnitFailed", "FleetHealthCheckFailing"}
                <= {s["metric"]["alertname"] for s in v}
            ),
        )
        assert {s["metric"]["alertstate"] for s in pending} <= {"pending", "firing"}
        unit = [s for s in pending if s["metric"]["alertname"] == "FleetUnitFailed"]
        assert unit[0]["metric"]["name"] == "lab-web.service"
        # `fleet status` shows it on lab2 alone, asked of the monitoring host through ssh.
        code, status, err = run_fleet(lab, "status")
        assert status is not None and status["_alertsError"] is None, err
        failing = {h for h in HOSTS for a in status[h]["alerts"] if a["name"] == "FleetUnitFailed"}
        assert failing == {"lab2"} and status["lab2"]["failedUnits"] == ["lab-web.service"]
        [alert] = [a for a in status["lab2"]["alerts"] if a["name"] == "FleetUnitFailed"]
        assert alert["state"] in ("pending", "firing") and alert["severity"] == "warning"
        # The report shows it in lab2's row.
        page = tmp_path / "report.html"
        code, _, err = run_fleet(lab, "report", "--html", str(page))
        assert code == 4, err  # a failed unit breaks the invariant
        row = page.read_text().split('<tr data-host="lab2">', 1)[1].split("</tr>", 1)[0]
        assert "FleetUnitFailed" in row
        # A host cut off: its node exporter stops answering.
        with faulted(lab, "lab1", ops.Fault.PARTITION):
            wait_for(
                lab,
                'ALERTS{alertname="FleetHostDown"}',
                lambda v: {s["metric"]["host"] for s in v} == {"lab1"},
            )
    finally:
        code, _, err = run_fleet(
            lab,
            "exec",
            "lab2",
            "--",
            "sh",
            "-c",
            "systemctl reset-failed lab-web; systemctl start lab-web",
        )
        assert code == 0, err
    # Mended: the alerts end.
    wait_for(
        lab,
        'ALERTS{alertname=~"FleetUnitFailed|FleetHealthCheckFailing|FleetHostDown"}',
        lambda v: v == [],
    )


def test_a_deploy_tells_the_operators_file_and_grafana_each_phase(
    lab: Lab, safe: None, tmp_path: Path
) -> None:
    """Deploy events from the operator's own config: JSON lines for every phase of every
    host, and one annotation in Grafana's shape, to a local stand-in for Grafana."""
    received: list[tuple[str, str | None, dict[str, Any]]] = []

    class Grafana(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(size))
            received.append((self.path, self.headers.get("Authorization"), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    grafana = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Grafana)
    threading.Thread(target=grafana.serve_forever, daemon=True).start()
    try:
        config = tmp_path / ".config" / "fleet"
        config.mkdir(parents=True)
        (config / "token").write_text("s3cret\n")
        events = tmp_path / "events.jsonl"
        (config / "config.yaml").write_text(
            f"events:\n  file: {events}\n"
            f"annotations:\n  url: http://127.0.0.1:{grafana.server_port}/api/annotations\n"
            "  tokenFile: token\n"
        )
        set_release(lab, "m3")
        env = dict(os.environ, HOME=str(tmp_path))
        code, report, err = run_fleet(lab, "deploy", *APPS, env=env)
        assert code == 0, err
    finally:
        grafana.shutdown()
        grafana.server_close()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert {line["release"] for line in lines} == {report["release"]}
    assert lines[0]["event"] == "release-start" and lines[-1]["event"] == "release-end"
    assert lines[-1]["result"] == "deployed" and lines[-1]["exitCode"] == 0
    # The host makes the new system's checks in the activation's own call: no `health`
    # events of their own, but the report's timings have the phase as the host timed it.
    protocol = ["connect", "copy", "lock", "drain", "activate", "confirm"]
    for host in APPS:
        ended = [e["phase"] for e in lines if e.get("host") == host and e["event"] == "phase-end"]
        assert [p for p in ended if p in protocol] == protocol  # every phase, in order
        assert "health" in report["hosts"][host]["timings"]
        started = [
            e["phase"] for e in lines if e.get("host") == host and e["event"] == "phase-start"
        ]
        assert started == ended
        ends = [e for e in lines if e.get("host") == host and e["event"] == "host-end"]
        assert [e["result"] for e in ends] == ["deployed"]
    [(path, authorization, annotation)] = received
    assert path == "/api/annotations" and authorization == "Bearer s3cret"
    assert {"fleet", "deploy", "deployed"} <= set(annotation["tags"])
    assert annotation["timeEnd"] >= annotation["time"] > 0
    assert report["release"] in annotation["text"]


# Canary analysis.

CANARY = "lab1"  # the first host in order: the lab tags no canary
RESTORE = ("deploy", "--skip-analysis")  # back to release 0 without load to measure


@pytest.fixture()
def analysed(lab: Lab) -> Iterator[None]:
    """The lab's analysis declared for one test, release 0 everywhere before and after."""
    assert_safe(lab)
    flake.set_analysis(lab, flake.LAB_ANALYSIS)
    try:
        yield
        set_release(lab, "0")
        code, _, err = run_fleet(lab, *RESTORE)
        assert code == 0, err
    finally:
        flake.set_analysis(lab, None)
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


def test_a_healthy_release_passes_the_analysis_and_reaches_every_host(
    lab: Lab, analysed: None
) -> None:
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


def test_a_release_failing_a_fifth_of_its_clients_fails_the_analysis_and_is_rolled_back(
    lab: Lab, analysed: None
) -> None:
    """Healthy through its checks and after, but 500 to a fifth of its clients. (A release
    that turns sick after its checks is the traffic tests' weighted canary.)"""
    before = running_paths(lab)
    set_release(lab, "a1", broken="errors:20")
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
    lab: Lab, analysed: None
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


def test_a_deploy_killed_during_its_analysis_leaves_the_fleet_safe(
    lab: Lab, analysed: None
) -> None:
    """The analysis runs after the canaries committed and before anything else is touched:
    the tool killed in the middle of it leaves the canary on the new release, the rest on
    the old one, every host healthy, in rotation and unlocked."""
    set_release(lab, "a4")
    with clients(lab):
        proc = subprocess.Popen(
            fleet_argv(lab, "deploy"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("analysis web-success 1/"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert releases(lab) == {CANARY: "a4", "lab2": "0"}
    assert_safe(lab)
