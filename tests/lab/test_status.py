"""`fleet status` reads the truth from the hosts, and a dead host cannot stall it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fleet.lab import containers, ops
from fleet.status import STATE_TIMEOUT
from tests.lab.fleetrun import assert_safe, run_fleet, set_release, wait_until_safe

pytestmark = pytest.mark.lab


def test_status_of_a_healthy_fleet(lab):
    set_release(lab, "st1")
    code, deployed, err = run_fleet(lab, "deploy", "lab1")
    assert code == 0, err
    code, status, err = run_fleet(lab, "status")
    assert code == 0, err
    assert set(status) == {"lab1", "lab2", "lab3"}
    lab1 = status["lab1"]
    assert lab1["reachable"] and lab1["healthy"] and lab1["failedUnits"] == []
    assert lab1["running"] == deployed["hosts"]["lab1"]["new"]
    assert lab1["current"] == lab1["running"] and not lab1["pendingReboot"]
    assert lab1["breaches"] == [] and lab1["transaction"] is None
    assert lab1["lastRelease"]["release"] == deployed["release"]
    assert lab1["lock"] is None
    assert lab1["drift"] is None  # not asked: it would need a build
    set_release(lab, "st2")
    code, status, err = run_fleet(lab, "status", "--desired")
    assert code == 0, err
    assert all(h["drift"] is True for h in status.values())
    assert status["lab1"]["desired"].endswith("-lab-system-lab1-st2")
    set_release(lab, "0")


def test_status_with_a_crashed_host_returns_promptly(lab):
    ops.fault(lab, "lab3", ops.Fault.CRASH)
    try:
        start = time.monotonic()
        code, status, _ = run_fleet(lab, "status")
        elapsed = time.monotonic() - start
    finally:
        ops.up(lab, None, lambda _m: None)
    assert code == 4
    assert status["lab3"]["reachable"] is False and "cannot connect" in status["lab3"]["message"]
    assert status["lab1"]["reachable"] and status["lab2"]["reachable"]
    assert elapsed < 15
    assert_safe(lab)


def test_status_with_a_hung_host_returns_within_its_deadline(lab):
    """The host accepts the connection, but its systemd is frozen: `fleet-host state` hangs
    there (it asks systemd); the deadline on remote commands ends the wait."""
    leader = containers.leader_pid(containers.nspawn_pid(lab, lab.host(3)) or 0)
    assert leader is not None
    os.kill(leader, signal.SIGSTOP)
    try:
        start = time.monotonic()
        code, status, err = run_fleet(lab, "status", timeout=120)
        elapsed = time.monotonic() - start
    finally:
        os.kill(leader, signal.SIGCONT)
    assert code == 4, err
    assert status["lab3"]["reachable"] is False and "no answer within" in status["lab3"]["message"]
    assert status["lab1"]["reachable"] and status["lab2"]["reachable"]
    assert elapsed < STATE_TIMEOUT + 15
    wait_until_safe(lab)
