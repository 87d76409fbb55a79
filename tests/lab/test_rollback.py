"""`fleet rollback` and `fleet history` against real lab hosts, ending with the safety check."""

from __future__ import annotations

import os

import pytest

from fleet.lab import ops
from tests.lab.fleetrun import (
    assert_safe,
    faulted,
    host_states,
    results,
    run_fleet,
    running_paths,
    set_release,
)

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


def deploy(lab, version: str, *args: str, user: str = "alice") -> dict:
    set_release(lab, version)
    env = dict(os.environ, USER=user, LOGNAME=user)
    code, report, err = run_fleet(lab, "deploy", "--canary", "0", *args, env=env)
    assert code == 0, err
    return report


def test_rollback_one_host_then_a_tag(lab):
    first = deploy(lab, "r1")
    deploy(lab, "r2")
    code, report, err = run_fleet(lab, "rollback", "lab1", "--yes")
    assert code == 0, err
    assert results(report) == {"lab1": "deployed"}
    state = host_states(lab)["lab1"]
    assert state.running == first["hosts"]["lab1"]["new"]["path"] == state.current_path
    assert_safe(lab)
    code, report, err = run_fleet(lab, "rollback", "@odd", "--yes")  # lab1 and lab3
    assert code == 0, err
    assert set(results(report)) == {"lab1", "lab3"}
    assert host_states(lab)["lab3"].running == first["hosts"]["lab3"]["new"]["path"]


def test_rollback_of_a_release_across_all_hosts(lab):
    before = running_paths(lab)
    release = deploy(lab, "r3")["release"]
    code, report, err = run_fleet(lab, "rollback", "--release", release, "--yes")
    assert code == 0, err
    assert report["action"] == "rollback"
    assert running_paths(lab) == before
    code, history, err = run_fleet(lab, "history", "--limit", "2")
    assert code == 0, err
    assert [r["id"] for r in history["releases"]] == [report["release"], release]
    assert history["releases"][0]["action"] == "rollback"


def test_rollback_with_a_partitioned_host_reports_it_and_a_second_run_finishes(lab):
    before = running_paths(lab)
    release = deploy(lab, "r4")["release"]
    with faulted(lab, "lab2", ops.Fault.PARTITION):
        code, report, err = run_fleet(lab, "rollback", "--release", release, "--yes")
    assert code == 4, err
    assert results(report) == {"lab1": "deployed", "lab3": "deployed", "lab2": "unreachable"}
    assert running_paths(lab)["lab2"] != before["lab2"]
    code, report, err = run_fleet(lab, "rollback", "lab2", "--release", release, "--yes")
    assert code == 0, err
    assert running_paths(lab) == before


def test_history_is_the_same_whoever_deployed_and_whatever_was_asked_first(lab):
    deploy(lab, "h1", user="alice")
    deploy(lab, "h2", "lab2", user="bob")
    code, whole, err = run_fleet(lab, "history", "--limit", "5")
    assert code == 0, err
    # Each host's own view agrees with the merged one on every release it took part in.
    for host in ("lab3", "lab2", "lab1"):
        code, mine, err = run_fleet(lab, "history", "--host", host)
        assert code == 0, err
        merged = {r["id"]: r for r in whole["releases"]}
        for release in mine["releases"][:5]:
            if release["id"] in merged:
                assert release["hosts"][host] == merged[release["id"]]["hosts"][host]
    views = [whole, run_fleet(lab, "history", "--limit", "5")[1]]
    assert views[0] == views[1]
    newest = views[0]["releases"][0]
    assert newest["operator"].startswith("bob@") and list(newest["hosts"]) == ["lab2"]
    assert views[0]["releases"][1]["operator"].startswith("alice@")


def test_bad_rollback_input_touches_nothing(lab, tmp_path):
    before = host_states(lab)
    code, _, err = run_fleet(lab, "rollback", "--to", "999", "--yes")
    assert code == 2 and "generation #999" in err and "no longer exists" in err
    code, _, err = run_fleet(lab, "rollback", "@nosuchtag", "--yes")
    assert code == 2 and "no tag 'nosuchtag'" in err
    code, _, err = run_fleet(lab, "rollback", "--release", "nosuch", "--yes")
    assert code == 2 and "no selected host has a record" in err
    code, _, err = run_fleet(lab, "rollback", "--to", "1", "--release", "x", "--yes")
    assert code == 2
    code, _, err = run_fleet(lab, "rollback", "lab1")  # not a terminal, no --yes
    assert code == 2 and "--yes" in err
    assert host_states(lab) == before
