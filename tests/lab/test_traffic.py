"""Deploys behind a real balancer: Debian's HAProxy on a lab host, with the configuration
the fleet's generator makes, in front of four hosts' lab-web, under client load."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from fleet.lab import containers, flake, ops
from fleet.lab.layout import Lab
from fleet.lab.load import Clients, ask
from tests.lab.faultmatrix import Case, run_case, traffic_cases
from tests.lab.fleetrun import (
    assert_safe,
    faulted,
    fleet_argv,
    inventory,
    own_lab,
    results,
    run_fleet,
    set_release,
    traffic_view,
    wait_until_safe,
)

pytestmark = [pytest.mark.lab]

APPS = ["lab1", "lab2", "lab3", "lab4"]
BALANCER = "lab5"
ONE_AT_A_TIME = ("--canary", "1", "--batch-size", "1")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Five hosts beside the session's lab: four run lab-web, the fifth HAProxy."""
    with own_lab(50, 5, balancers=1) as instance:
        yield instance


def clients(lab: Lab) -> Clients:
    address = lab.hosts(5)[4].address
    return Clients(lab, address, flake.INGRESS_PORT, threads=4, max_seconds=240)


def test_the_balancer_serves_every_instance(lab: Lab, safe: None) -> None:
    servers, errors = traffic_view(lab)
    assert errors == {}
    assert sorted(s.host for s in servers) == APPS
    assert all(s.serving and s.balancer == BALANCER for s in servers), servers
    assert inventory(lab).traffic is not None


def test_a_rolling_deploy_under_load_fails_no_request(lab: Lab, safe: None) -> None:
    set_release(lab, "r1")
    with clients(lab) as load:
        time.sleep(1)
        code, report, err = run_fleet(lab, "deploy", *ONE_AT_A_TIME, timeout=300)
        time.sleep(2)
    seen = load.load
    assert code == 0, err
    assert set(results(report).values()) == {"deployed"}, report
    assert seen.failed == 0, seen.summary()
    assert set(seen.releases) <= {"0", "r1"} and seen.releases["r1"] > 0, seen.summary()
    drains = [h["timings"].get("drain") for n, h in report["hosts"].items() if n in APPS]
    assert all(d is not None for d in drains), report
    assert_safe(lab)


def test_a_canary_that_sickens_under_its_share_of_traffic_is_rolled_back(
    lab: Lab, safe: None
) -> None:
    """10 % of the traffic to a canary whose release fails a few seconds after it passed
    its first checks: what clients see fail stays within the canary's share of its window,
    then nothing fails; every instance ends in rotation on the old release."""
    set_release(lab, "c1", sick_after=4)
    with clients(lab) as load:
        time.sleep(1)
        code, report, err = run_fleet(
            lab, "deploy", "--canary", "1", "--canary-weight", "10", "--canary-hold", "20",
            timeout=300,
        )  # fmt: skip
        during = load.load.requests
    assert code == 3, err
    lab1 = report["hosts"]["lab1"]
    assert lab1["result"] == "rolled-back" and lab1["phase"] == "canary", lab1
    assert "at 10% of the traffic" in lab1["message"], lab1
    assert {h["result"] for n, h in report["hosts"].items() if n != "lab1"} <= {"skipped"}
    assert load.load.failed <= 0.1 * during, load.load.summary()
    assert set(load.load.releases) <= {"0", "c1"}, load.load.summary()
    with clients(lab) as after:
        time.sleep(3)
    assert after.load.failed == 0 and set(after.load.releases) == {"0"}, after.load.summary()
    assert_safe(lab)
    print(f"canary at 10 %: {load.load.summary()}")


def test_a_drain_waits_for_open_sessions_until_its_timeout(lab: Lab, safe: None) -> None:
    """Long requests on every instance: lab1's drain waits its timeout (the lab's 10 s)
    for them, then the deploy goes on, and the report names the sessions it cut."""
    set_release(lab, "s1")
    address = lab.hosts(5)[4].address
    answers: list[tuple[str | None, str | None]] = []

    def slow() -> None:
        answers.append(ask(address, flake.INGRESS_PORT, "/slow/20", 90))

    threads = [threading.Thread(target=slow) for _ in range(8)]  # two per instance
    for thread in threads:
        thread.start()
    time.sleep(1)
    code, report, err = run_fleet(lab, "deploy", "lab1", timeout=200)
    for thread in threads:
        thread.join(100)
    assert code == 0, err
    lab1 = report["hosts"]["lab1"]
    assert lab1["result"] == "deployed", lab1
    assert flake.DRAIN_TIMEOUT <= lab1["timings"]["drain"] < flake.DRAIN_TIMEOUT + 5, lab1
    assert lab1["traffic"].startswith(f"drain timeout ({flake.DRAIN_TIMEOUT} s)"), lab1
    assert "sessions" in lab1["traffic"], lab1
    assert len(answers) == 8


def test_a_killed_deploy_leaves_no_instance_drained(lab: Lab, safe: None) -> None:
    """SIGKILL while lab2 is out of rotation: its dead-man switch ends the transaction,
    and with it the drain; no request fails meanwhile."""
    set_release(lab, "k1")
    env = dict(os.environ, FLEET_TEST_PAUSE="drain@lab2")
    with clients(lab) as load:
        proc = subprocess.Popen(
            fleet_argv(lab, "deploy", "lab2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("fleet-test-paused drain lab2"):
                break
        [lab2] = [s for s in traffic_view(lab)[0] if s.host == "lab2"]
        assert not lab2.serving, lab2
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The host undoes at begin's deadline: confirm timeout + drain timeout.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            [lab2] = [s for s in traffic_view(lab)[0] if s.host == "lab2"]
            if lab2.serving:
                break
            time.sleep(1)
    assert lab2.serving, lab2
    assert load.load.failed == 0, load.load.summary()
    wait_until_safe(lab)


def test_a_crashed_host_is_taken_out_and_comes_back(lab: Lab, safe: None) -> None:
    with clients(lab) as load:
        time.sleep(1)
        ops.fault(lab, "lab3", ops.Fault.CRASH)
        crashed = time.monotonic()
        while time.monotonic() - crashed < 20:
            [lab3] = [s for s in traffic_view(lab)[0] if s.host == "lab3"]
            if lab3.status.startswith("DOWN"):
                break
            time.sleep(0.2)
        taken_out = time.monotonic() - crashed
        time.sleep(2)
        failed_by_then = load.load.failed
    assert lab3.status.startswith("DOWN"), lab3
    # HAProxy retries a refused or reset connection on another instance.
    assert failed_by_then <= 5, load.load.summary()
    code, _, err = run_fleet(lab, "traffic")
    assert code == 4, err
    ops.up(lab, None, lambda _m: None)
    wait_until_safe(lab, timeout=90)
    print(f"taken out of rotation {taken_out:.1f} s after the crash; {load.load.summary()}")


def test_a_balancer_that_cannot_be_read_stops_the_deploy_before_anything(
    lab: Lab, safe: None
) -> None:
    set_release(lab, "u1")
    before = {s.host: s for s in traffic_view(lab)[0]}
    with faulted(lab, BALANCER, ops.Fault.STOP_SSH):
        code, report, err = run_fleet(lab, "deploy", "lab1", timeout=120)
    assert code != 0, err
    lab1 = report["hosts"]["lab1"]
    assert lab1["phase"] == "drain" and "nothing was activated" in lab1["message"], lab1
    assert lab1["result"] == "rolled-back", lab1
    assert before["lab1"].serving
    wait_until_safe(lab)


@pytest.mark.parametrize("case", traffic_cases(), ids=lambda c: c.id)
def test_a_fault_while_drained_leaves_every_instance_in_rotation(
    lab: Lab, safe: None, case: Case
) -> None:
    """The drain boundary of every change, each with one fault: the invariant (traffic
    included) comes back by itself."""
    run_case(lab, case)


def test_drain_and_undrain_a_host_for_maintenance(lab: Lab, safe: None) -> None:
    with clients(lab) as load:
        code, report, err = run_fleet(lab, "drain", "lab2", "--reason", "disk swap")
        assert code == 0, err
        assert report["hosts"]["lab2"] == {"wasDrained": False, "balancers": "drained"}
        [lab2] = [s for s in traffic_view(lab)[0] if s.host == "lab2"]
        assert not lab2.serving and lab2.sessions == 0, lab2
        code, status, err = run_fleet(lab, "status", "lab2")
        assert status["lab2"]["maintenance"]["reason"] == "disk swap", status
        # A deploy of a drained host leaves it drained.
        set_release(lab, "m1")
        code, _, err = run_fleet(lab, "deploy", "lab2")
        assert code == 0, err
        [lab2] = [s for s in traffic_view(lab)[0] if s.host == "lab2"]
        assert not lab2.serving, lab2
        code, report, err = run_fleet(lab, "undrain", "lab2")
        assert code == 0, err
        assert report["hosts"]["lab2"] == {"wasDrained": True, "balancers": "serving"}
    assert load.load.failed == 0, load.load.summary()
    code, history, err = run_fleet(lab, "history")
    entries = history if isinstance(history, list) else history["releases"]
    assert [e["action"] for e in entries[:3]] == ["undrain", "deploy", "drain"], entries[:3]


def test_the_agent_answers_within_the_host_modules_hardening(lab: Lab, safe: None) -> None:
    """One agent check by hand, as a balancer makes it, against the hardened unit."""
    import socket

    with socket.create_connection((lab.hosts(5)[0].address, flake.AGENT_PORT), 5) as conn:
        conn.sendall(b"lab-web\n")
        assert conn.recv(64) == b"ready 100%\n"


def test_an_agent_check_past_its_time_limit_leaves_no_failed_unit(lab: Lab, safe: None) -> None:
    """An agent instance that outlives RuntimeMaxSec (a host too loaded to answer in
    time, here one stopped) is stopped by systemd and unloaded: a failed instance would
    fail every deploy's health check on the host."""
    import socket

    host = lab.hosts(5)[0]

    def inside(*argv: str) -> str:
        return containers.run_inside(lab, host, list(argv), timeout=30).stdout

    with socket.create_connection((host.address, flake.AGENT_PORT), 5) as conn:
        # The balancer's own agent checks come and go on the same socket: the instance to
        # stop is the one whose name ends with this connection's address and port.
        ours = "-{}:{}.service".format(*conn.getsockname()[:2])
        pattern = f"fleet-agent@*{ours}"
        pid = ""
        deadline = time.monotonic() + 10
        while not pid.strip().isdigit() or pid.strip() == "0":
            assert time.monotonic() < deadline, "no agent instance for the connection"
            units = inside("systemctl", "list-units", "--plain", "--no-legend", pattern)
            names = [line.split()[0] for line in units.splitlines() if line.strip()]
            if names:
                pid = inside("systemctl", "show", "-P", "MainPID", names[0])
            time.sleep(0.05)
        inside("kill", "-STOP", pid.strip())
        running = ("systemctl", "list-units", "--plain", "--no-legend",
                   "--state=active,activating,deactivating", pattern)  # fmt: skip
        while inside(*running):
            assert time.monotonic() < deadline + 15, "the stopped agent was never stopped"
            time.sleep(0.2)
    assert inside("systemctl", "list-units", "--failed", "--plain", "--no-legend") == ""
