"""`fleet deploy` against real lab hosts: the happy path and every fault, each test ending
with the safety check (running = profile's current = healthy, no lock, no timer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from fleet.hostops import HostOps, new_token
from fleet.lab import containers, ops
from fleet.models import Generation
from tests.lab.fleetrun import (
    assert_safe,
    faulted,
    fleet_argv,
    host_states,
    results,
    run_fleet,
    running_paths,
    set_release,
    wait_until_safe,
)

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


def read_stderr_until(proc: subprocess.Popen[str], *markers: str, timeout: float = 60) -> None:
    """Read a running fleet's progress lines until every marker has been seen."""
    assert proc.stderr is not None
    pending = set(markers)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"never saw {pending}"
        line = proc.stderr.readline()
        assert line, f"fleet ended before {pending}"
        pending = {m for m in pending if m not in line}


def test_deploy_persists_and_records(lab, lab_remotes):
    before = host_states(lab)
    set_release(lab, "d1")
    code, report, err = run_fleet(lab, "deploy")
    assert code == 0, err
    assert report["result"] == "deployed"
    assert results(report) == {"lab1": "deployed", "lab2": "deployed", "lab3": "deployed"}
    for name, host in report["hosts"].items():
        assert host["previous"]["number"] == before[name].current
        newest = max(g.number for g in before[name].generations)
        assert host["new"]["number"] == newest + 1  # after a rollback, current is not newest
        assert set(host["timings"]) >= {"copy", "lock", "activate", "health", "confirm"}
        remote = lab_remotes[name]
        assert remote.run(["curl", "-s", "127.0.0.1:8080/version"], check=False).stdout in (
            "d1\n",
            "",
        )  # curl may be absent; the safety check proves health below
        records = remote.run(["cat", "/var/lib/fleet/releases.jsonl"]).stdout.splitlines()
        last = json.loads(records[-1])
        assert last["release"] == report["release"] and last["result"] == "deployed"
        assert last["new"]["path"] == host["new"]["path"]
        booted = remote.run(["readlink", "-f", "/boot/lab/default"]).stdout.strip()
        assert booted == host["new"]["path"]
    # The same flake again changes nothing.
    code, report, _ = run_fleet(lab, "deploy")
    assert code == 0 and all(not h["changed"] for h in report["hosts"].values())


def test_failed_health_check_rolls_the_canary_back(lab, lab_remotes):
    before = running_paths(lab)
    set_release(lab, "h1", broken="health")
    code, report, err = run_fleet(lab, "deploy", "--health-timeout", "5")
    assert code == 3, err
    assert report["result"] == "rolled-back"
    assert results(report) == {"lab1": "rolled-back", "lab2": "skipped", "lab3": "skipped"}
    canary = report["hosts"]["lab1"]
    assert canary["phase"] == "health" and "HTTP 503" in canary["message"]
    assert running_paths(lab) == before
    # No host beyond the canary was touched: not even its closure was copied there.
    new_lab2 = lab_remotes["lab2"].run(["ls", "/nix/store"]).stdout
    assert "lab-system-lab2-h1" not in new_lab2


def test_unit_that_fails_to_start_rolls_back(lab):
    before = running_paths(lab)
    set_release(lab, "s1", broken="start")
    code, report, err = run_fleet(lab, "deploy", "lab2")
    assert code == 3, err
    host = report["hosts"]["lab2"]
    assert host["result"] == "rolled-back" and host["phase"] == "activate"
    assert "exit 4" in host["message"]
    assert running_paths(lab) == before
    # What failed beside what was restored, and the failed step as a line to paste: as is,
    # in a shell, it reaches the host (host key, identity) and its program answers that
    # the transaction is over.
    assert host["attempted"]["path"].endswith("-s1") and host["new"]["path"] == before["lab2"]
    assert "fleet-host activate --token" in host["command"]
    pasted = subprocess.run(["/bin/sh", "-c", host["command"]], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert pasted.returncode == 4, pasted.stderr
    assert "no longer this transaction's" in pasted.stdout


def test_build_failure_touches_no_host(lab):
    before = host_states(lab)
    set_release(lab, "b1", broken="build", broken_hosts=("lab3",))
    code, report, err = run_fleet(lab, "deploy")
    # With --json, stdout still has one document: the error.
    assert code == 1 and report["exitCode"] == 1 and "broken at build time" in report["error"]
    [error] = [line for line in err.splitlines() if line.startswith("fleet:")]
    assert error.startswith("fleet: nix build: error: builder for")
    assert "broken at build time" in error
    assert host_states(lab) == before


def test_full_disk_during_copy_activates_nothing(lab):
    before = running_paths(lab)
    set_release(lab, "f1")
    with faulted(lab, "lab3", ops.Fault.FILL_DISK):
        code, report, err = run_fleet(lab, "deploy", "lab3")
    assert code == 4, err
    host = report["hosts"]["lab3"]
    assert host["result"] == "failed" and host["phase"] == "copy"
    assert "nothing was changed" in host["message"]
    assert running_paths(lab) == before


def test_unreachable_host_is_reported_and_the_rest_follow_the_policy(lab):
    before = running_paths(lab)
    set_release(lab, "u1")
    with faulted(lab, "lab2", ops.Fault.PARTITION):
        code, report, err = run_fleet(lab, "deploy", "--canary", "0", "--max-failures", "1")
    assert code == 4, err
    assert results(report) == {"lab1": "deployed", "lab2": "unreachable", "lab3": "deployed"}
    assert report["hosts"]["lab2"]["phase"] == "connect"
    assert running_paths(lab)["lab2"] == before["lab2"]


def test_wave_failure_rolls_back_persisted_hosts_fleet_wide(lab):
    before = host_states(lab)
    set_release(lab, "a1", broken="health", broken_hosts=("lab3",))
    code, report, err = run_fleet(lab, "deploy", "--batch-size", "1", "--health-timeout", "4")
    assert code == 3, err
    assert results(report) == {"lab1": "rolled-back", "lab2": "rolled-back", "lab3": "rolled-back"}
    assert "rolled back with the rest" in report["hosts"]["lab1"]["message"]
    after = host_states(lab)
    for name, state in after.items():
        assert state.running == before[name].running
        assert state.current_path == before[name].running
        # The host's newest record of the release tells the story: rolled back from the
        # system that ran before it.
        assert state.last_release["release"] == report["release"]
        assert state.last_release["result"] == "rolled-back"
        assert state.last_release["previous"]["path"] == before[name].running


def test_no_rollback_keeps_hosts_that_deployed(lab):
    set_release(lab, "n1", broken="health", broken_hosts=("lab3",))
    code, report, err = run_fleet(
        lab, "deploy", "--batch-size", "1", "--health-timeout", "4", "--no-rollback"
    )
    assert code == 3, err
    assert results(report) == {"lab1": "deployed", "lab2": "deployed", "lab3": "rolled-back"}


def test_partition_during_activation_reverts_by_itself(lab):
    before = running_paths(lab)
    set_release(lab, "p1", start_delay=3)
    proc = subprocess.Popen(
        fleet_argv(lab, "deploy", "lab2", "--confirm-timeout", "6"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_stderr_until(proc, "lab2: activate")
        ops.fault(lab, "lab2", ops.Fault.PARTITION)
        out, _ = proc.communicate(timeout=120)
    finally:
        ops.fault(lab, "lab2", ops.Fault.HEAL)
    assert proc.returncode == 4
    host = json.loads(out)["hosts"]["lab2"]
    assert host["result"] == "unreachable"
    assert "dead-man switch undoes the change at" in host["message"]
    # The host put itself back: running its recorded generation, lock and switch gone.
    wait_until_safe(lab, 30)
    assert running_paths(lab) == before


def test_sigkill_after_activation_reverts_every_host(lab):
    before = running_paths(lab)
    set_release(lab, "k1", broken="health")
    proc = subprocess.Popen(
        fleet_argv(
            lab, "deploy", "--canary", "0", "--health-timeout", "6", "--confirm-timeout", "4"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The host proves the new system in the activation's own call (its checks retry for
    # seconds): killed once every host runs it, while it is being proven.
    read_stderr_until(proc, "lab1: activate", "lab2: activate", "lab3: activate")
    deadline = time.monotonic() + 30
    while any(running_paths(lab)[n] == before[n] for n in before):
        assert time.monotonic() < deadline and proc.poll() is None, "never all activated"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert running_paths(lab) != before  # the broken release is running, unconfirmed
    # The switch fires 10 s after activation (health 6 s + confirm 4 s).
    wait_until_safe(lab, 60)
    assert running_paths(lab) == before


def test_second_deploy_to_a_locked_host_is_refused(lab):
    set_release(lab, "c1", start_delay=3)
    first = subprocess.Popen(
        fleet_argv(lab, "deploy", "lab3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    read_stderr_until(first, "lab3: activate")
    code, report, err = run_fleet(lab, "deploy", "lab3")
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0
    first_report = json.loads(out)
    assert first_report["hosts"]["lab3"]["result"] == "deployed"
    assert code == 4, err
    refused = report["hosts"]["lab3"]
    assert refused["result"] == "failed" and refused["phase"] == "lock"
    assert first_report["release"] in refused["message"]
    assert "--break-lock" in refused["message"]


def test_lock_of_a_gone_holder_is_taken_over_only_on_purpose(lab, lab_remotes):
    """A holder that is gone while its switch is still armed: refused, then taken over;
    its recorded generation stays the rollback target and its record says so."""
    recorded = host_states(lab)["lab1"].running
    ghost = {"release": "ghost", "operator": "nobody@nowhere", "since": "then", "action": "x"}
    HostOps(lab_remotes["lab1"]).begin(
        new_token(), ghost, {"release": "ghost"}, "boot", Generation(None, recorded), 300, 20
    )
    set_release(lab, "g1")
    code, report, _ = run_fleet(lab, "deploy", "lab1")
    assert code == 4 and "nobody@nowhere" in report["hosts"]["lab1"]["message"]
    code, report, err = run_fleet(lab, "deploy", "lab1", "--break-lock")
    assert code == 0, err
    assert report["hosts"]["lab1"]["previous"]["path"] == recorded
    records = HostOps(lab_remotes["lab1"]).records()
    assert [r["result"] for r in records if r.get("release") == "ghost"] == ["taken-over"]


def test_abandoned_transaction_is_reported_and_recovered(lab, lab_remotes):
    """A transaction whose switch is gone: status names it (exit 4), recover undoes it."""
    state = host_states(lab)["lab2"]
    remote = lab_remotes["lab2"]
    ops_ = HostOps(remote)
    ops_.begin(new_token(), {"release": "lost"}, {"release": "lost"}, "boot",
               Generation(None, state.running), 300, 20)  # fmt: skip
    remote.run(["sh", "-c", "systemctl kill -s KILL 'fleet-watch-*'; systemctl reset-failed"])
    remote.run(["systemctl", "stop", "fleet-watch-*"], check=False)
    code, report, err = run_fleet(lab, "status", "lab2")
    assert code == 4, err
    assert report["lab2"]["breaches"][0]["kind"] == "abandoned-transaction"
    assert report["lab2"]["breaches"][0]["repair"] == "fleet recover lab2"
    code, report, err = run_fleet(lab, "recover", "lab2")
    assert code == 0, err
    assert report["hosts"]["lab2"]["recovered"] == "undone"
    code, _, err = run_fleet(lab, "status", "lab2")
    assert code == 0, err


def test_dry_run_touches_nothing(lab):
    before = host_states(lab)
    set_release(lab, "y1")
    code, report, err = run_fleet(lab, "deploy", "--dry-run")
    assert code == 0, err
    assert report["dryRun"] is True
    assert all(h["changed"] for h in report["hosts"].values())
    # The waves it would take, and why: no lab host is tagged canary, so the first is.
    assert {n: h["wave"] for n, h in report["hosts"].items()} == {"lab1": 1, "lab2": 2, "lab3": 2}
    assert report["hosts"]["lab1"]["why"].startswith("canary: first in order")
    assert host_states(lab) == before


def test_boot_only_takes_effect_at_the_next_boot(lab, monkeypatch):
    before = running_paths(lab)
    set_release(lab, "o1")
    code, report, err = run_fleet(lab, "deploy", "lab1", "--boot")
    assert code == 0, err
    new = report["hosts"]["lab1"]["new"]["path"]
    state = host_states(lab)["lab1"]
    assert state.running == before["lab1"] and state.current_path == new
    ops.fault(lab, "lab1", ops.Fault.CRASH)
    ops.up(lab, None, lambda _m: None)
    assert running_paths(lab)["lab1"] == new


def test_unknown_selector_is_an_error_before_anything(lab):
    before = host_states(lab)
    code, report, err = run_fleet(lab, "deploy", "lab9")
    assert err.strip() == "fleet: selector 'lab9': no host 'lab9' in the inventory"
    assert code == 2 and report == {"error": err.strip()[len("fleet: ") :], "exitCode": 2}
    code, _, err = run_fleet(lab, "deploy", "--batch-size", "0")
    assert code == 2 and "--batch-size" in err
    assert host_states(lab) == before


def test_failed_persist_puts_the_recorded_generation_back(lab):
    """The profile cannot be written after a confirmed activation: the host must not stay
    on a system its profile does not name."""
    before = running_paths(lab)
    set_release(lab, "w1", start_delay=3)
    host = lab.host(2)
    profiles = "/nix/var/nix/profiles"
    proc = subprocess.Popen(
        fleet_argv(lab, "deploy", "lab2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        read_stderr_until(proc, "lab2: activate")
        containers.run_inside(lab, host, ["mount", "--bind", profiles, profiles])
        containers.run_inside(lab, host, ["mount", "-o", "remount,bind,ro", profiles])
        out, _ = proc.communicate(timeout=120)
    finally:
        containers.run_inside(lab, host, ["umount", profiles])
    assert proc.returncode == 3, out
    report = json.loads(out)["hosts"]["lab2"]
    assert report["result"] == "rolled-back" and report["phase"] == "persist"
    assert running_paths(lab) == before


def test_reboot_deploy_proves_the_new_generation_after_booting_it_once(lab):
    """--reboot: the new generation boots once and becomes the default only when proven;
    a broken one is undone, and the host's next boot is the recorded generation."""
    set_release(lab, "rb1")
    code, report, err = run_fleet(lab, "deploy", "lab3", "--reboot", "--boot-timeout", "60")
    assert code == 0, err
    host = report["hosts"]["lab3"]
    state = host_states(lab)["lab3"]
    assert host["result"] == "deployed" and "reboot" in host["timings"]
    assert state.running == state.booted == state.boot_entry == host["new"]["path"]
    good = host["new"]["path"]
    set_release(lab, "rb2", broken="start")
    code, report, err = run_fleet(
        lab, "deploy", "lab3", "--reboot", "--boot-timeout", "60", "--health-timeout", "5"
    )
    assert code == 3, err
    host = report["hosts"]["lab3"]
    assert host["result"] == "rolled-back" and host["phase"] == "health"
    assert "failed units after the reboot" in host["message"]
    state = host_states(lab)["lab3"]
    assert state.running == state.current_path == state.boot_entry == good
    assert state.booted != good  # it keeps the boot it made until its next one


@pytest.mark.parametrize("phase", ["lock", "activate", "health", "confirm"])
def test_an_error_nobody_foresaw_ends_like_a_failed_phase(lab, phase):
    """An exception after any step: the host undoes what is not committed, the lock goes
    with it, and the report says what the host did."""
    before = running_paths(lab)
    set_release(lab, f"x-{phase}")
    env = dict(os.environ, FLEET_TEST_RAISE=f"{phase}@lab1")
    code, report, err = run_fleet(lab, "deploy", "lab1", env=env)
    host = report["hosts"]["lab1"]
    assert_safe(lab)
    running = running_paths(lab)["lab1"]
    if phase == "confirm":  # committed before the error: the host's record says deployed
        assert code == 0, err
        assert host["result"] == "deployed" and running == host["new"]["path"]
    else:
        assert code == 3, err
        assert host["result"] == "rolled-back" and running == before["lab1"]
        assert "injected" in host["message"]


def test_a_boot_loader_that_refuses_the_new_system_leaves_the_old_one_whole(lab):
    """`switch-to-configuration boot` fails (as grub-install refusing a disk): the new
    system ran and passed its checks, but a host whose boot entry lags its profile would
    boot something else after a crash. The commit is undone: running, profile and boot
    entry all the recorded generation, the boot loader's words in the report, exit 3. The
    generation the commit added is deleted: never current, it must not be where a later
    `fleet rollback` ("the one before the current") lands."""
    before = running_paths(lab)
    numbers = [g.number for g in host_states(lab)["lab2"].generations]
    set_release(lab, "bl1", broken="boot", broken_hosts=("lab2",))
    code, report, err = run_fleet(lab, "deploy", "--canary", "0")
    assert code == 3, err
    lab2 = report["hosts"]["lab2"]
    assert lab2["result"] == "rolled-back" and lab2["phase"] == "persist", lab2
    assert "the boot loader refuses it" in lab2["message"], lab2
    assert running_paths(lab) == before  # the others were reverted with the release
    assert [g.number for g in host_states(lab)["lab2"].generations] == numbers
    assert_safe(lab)


def test_a_build_host_builds_and_the_deploy_goes_on_from_here(lab, lab_remotes):
    """--build-host lab2: lab2's Nix builds what lab1 runs; the output comes back here once
    and goes on to lab1 as usual (-s: lab1 first asks its own substituters, which it has
    none of, for what it can fetch)."""
    set_release(lab, "bh1")
    before = running_paths(lab)["lab1"]
    # The build options reach the build host's nix-store; a failed build touches no host.
    code, _, err = run_fleet(lab, "deploy", "lab1", "--build-host", "lab2", "--max-jobs", "0")
    assert code == 1 and "nix build on lab2: error: unable to start any build" in err, err
    assert running_paths(lab)["lab1"] == before
    code, report, err = run_fleet(lab, "deploy", "lab1", "--build-host", "lab2", "-s")
    assert code == 0, err
    assert "building 1 host on lab2" in err and "built on lab2" in err
    path = report["hosts"]["lab1"]["new"]["path"]
    assert running_paths(lab)["lab1"] == path
    # lab2, not a target, holds lab1's system and Nix's log of building it.
    builder = lab_remotes["lab2"]
    assert builder.run(["nix-store", "--check-validity", path], check=False).ok
    assert builder.run(["nix-store", "--read-log", path], check=False).ok
    assert running_paths(lab)["lab2"] != path
