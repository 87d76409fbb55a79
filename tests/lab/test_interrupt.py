"""Ctrl-C on the lab: each press of a rollout does what the README says, `fleet exec`'s
remote commands end with it, and the invariant holds afterwards. The fault matrix sends
one and two presses at every step boundary besides (tests/lab/faultmatrix.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from fleet.rollout import NOT_STARTED
from tests.lab.faultmatrix import FIRST_NOTICE, _read_until, _wait_stopped
from tests.lab.fleetrun import (
    assert_safe,
    fleet_argv,
    results,
    run_fleet,
    running_paths,
    set_release,
    wait_until_safe,
)

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]

SECOND_NOTICE = "Ctrl-C again: stopping and restoring"


def start(lab: Any, *args: str, pause: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if pause:
        env["FLEET_TEST_PAUSE"] = pause
    return subprocess.Popen(
        fleet_argv(lab, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, Any, str]:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()  # a hung tool must not hold the lab's hosts for the tests after it
        proc.communicate()
        raise
    print(f"exit {proc.returncode}\n{out}\n{err}")
    return proc.returncode, json.loads(out) if out.strip() else None, err


def test_a_first_ctrl_c_lets_the_canary_finish_and_starts_no_other_host(lab):
    before = running_paths(lab)
    set_release(lab, "ctrl-c-1")
    proc = start(lab, "deploy", "--canary", "1", pause="copy@lab1")
    _read_until(proc, "fleet-test-paused")
    _wait_stopped(proc)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    assert FIRST_NOTICE in _read_until(proc, FIRST_NOTICE)[-1]
    code, report, _ = finish(proc)
    assert code == 130
    assert report["result"] == "interrupted"
    assert "wave 1 of" in report["stopped"], report["stopped"]
    assert results(report) == {"lab1": "deployed", "lab2": "skipped", "lab3": "skipped"}
    assert report["hosts"]["lab2"]["message"] == NOT_STARTED
    after = running_paths(lab)
    assert after["lab1"] != before["lab1"]
    assert {n: after[n] for n in ("lab2", "lab3")} == {n: before[n] for n in ("lab2", "lab3")}
    assert_safe(lab)


def test_a_second_ctrl_c_restores_the_hosts_in_flight_at_once(lab):
    before = running_paths(lab)
    # Its service takes 10 s to be ready, which the activation waits for: the presses
    # land while the host activates, in begin's one call.
    set_release(lab, "ctrl-c-2", start_delay=10)
    proc = start(lab, "deploy", "lab1", "lab2", "--canary", "0", "--batch-size", "2")
    _read_until(proc, "lab1: activate")
    os.kill(proc.pid, signal.SIGINT)
    _read_until(proc, FIRST_NOTICE)
    os.kill(proc.pid, signal.SIGINT)
    code, report, err = finish(proc)
    assert SECOND_NOTICE in err
    assert code == 130
    assert report["result"] == "interrupted"
    lab1 = report["hosts"]["lab1"]
    assert lab1["result"] == "rolled-back", lab1
    assert lab1["message"] == f"interrupted (Ctrl-C twice) in {lab1['phase']}", lab1
    # lab2 was wherever its own steps had come: stopped there, restored or untouched.
    lab2 = report["hosts"]["lab2"]
    assert lab2["result"] in ("rolled-back", "skipped"), lab2
    assert "interrupted (Ctrl-C" in lab2["message"], lab2
    assert running_paths(lab) == before
    assert_safe(lab)


def test_a_third_ctrl_c_leaves_the_hosts_to_their_dead_man_switches(lab):
    before = running_paths(lab)
    set_release(lab, "ctrl-c-3", broken="health")  # in flight for seconds: its checks fail
    proc = start(lab, "deploy", "lab1", "--health-timeout", "5", "--confirm-timeout", "5",
                 pause="activate@lab1")  # fmt: skip
    _read_until(proc, "fleet-test-paused")
    _wait_stopped(proc)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _read_until(proc, FIRST_NOTICE)
    os.kill(proc.pid, signal.SIGINT)
    _read_until(proc, SECOND_NOTICE)
    os.kill(proc.pid, signal.SIGINT)
    code, report, err = finish(proc)
    assert code == 130
    assert report is None  # it left: no claim it could not stand behind
    assert "undoes its transaction by itself" in err
    wait_until_safe(lab, 60)
    assert running_paths(lab) == before


def test_ctrl_c_stops_exec_commands_on_the_hosts(lab):
    # `slee[p]` matches the command, never the pgrep that looks for it.
    probe = ("--", "pgrep", "-f", "slee[p] 3017")
    proc = start(lab, "exec", "--", "sleep", "3017")
    for _ in range(100):
        code, data, _ = run_fleet(lab, "exec", *probe)
        if code == 0:
            break
    assert code == 0, data  # running on every host
    os.kill(proc.pid, signal.SIGINT)
    code, data, err = finish(proc)
    assert code == 130
    assert sorted(data["interrupted"]) == ["lab1", "lab2", "lab3"]
    assert "the command was stopped on 3 hosts" in err
    for _ in range(50):
        code, data, _ = run_fleet(lab, "exec", *probe)
        if all(h["exitCode"] == 1 for h in data["hosts"].values()):
            break
    assert all(h["exitCode"] == 1 for h in data["hosts"].values()), data
