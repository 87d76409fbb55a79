"""A lab toplevel travels the way a real one does: built by Nix, copied over ssh,
made a generation of the system profile, activated by its switch-to-configuration."""

from __future__ import annotations

import urllib.request

import pytest

from fleet import nix
from fleet.errors import NixError
from fleet.lab import flake, ops
from tests.lab.fleetrun import faulted

pytestmark = pytest.mark.lab

PROFILE = "/nix/var/nix/profiles/system"


def http_get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}:8080{path}", timeout=3) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


def build(lab, host: str, version: str, broken: str | None = None) -> str:
    flake.set_release(lab, flake.LabRelease(version, broken))
    try:
        return nix.build_systems(str(lab.flake), [host], ops.OFFLINE)[host]
    finally:
        flake.set_release(lab, flake.LabRelease("0"))


def install(remote, path: str) -> None:
    nix.copy_closure(remote, path)
    remote.run(["nix-env", "-p", PROFILE, "--set", path])


def current(remote) -> str:
    return remote.run(["readlink", "-f", "/run/current-system"]).stdout.strip()


def test_copy_set_generation_and_switch(lab, lab_remotes):
    remote = lab_remotes["lab2"]
    before = current(remote)
    # The generation to go back to: the current one, not the newest older one (an undone
    # transaction may have left a newer generation that was never current).
    number = remote.run(["readlink", PROFILE]).stdout.strip().split("-")[1]
    path = build(lab, "lab2", "t1")
    install(remote, path)
    assert remote.run(["readlink", "-f", PROFILE]).stdout.strip() == path
    result = remote.run([f"{path}/bin/switch-to-configuration", "switch"], check=False)
    assert result.returncode == 0, result.stderr
    assert current(remote) == path
    assert remote.run(["readlink", "-f", "/boot/lab/default"]).stdout.strip() == path
    assert http_get(remote.endpoint.address, "/version") == (200, "t1")
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")
    # Back to where it was, through the profile, as a rollback does.
    remote.run(["nix-env", "-p", PROFILE, "--switch-generation", number])
    assert (
        remote.run([f"{before}/bin/switch-to-configuration", "switch"], check=False).returncode == 0
    )
    assert current(remote) == before == remote.run(["readlink", "-f", PROFILE]).stdout.strip()


def test_unit_that_fails_to_start_gives_exit_code_4(lab, lab_remotes):
    remote = lab_remotes["lab3"]
    before = current(remote)
    path = build(lab, "lab3", "t2", broken="start")
    nix.copy_closure(remote, path)
    result = remote.run([f"{path}/bin/switch-to-configuration", "test"], check=False)
    assert result.returncode == 4
    assert "lab-web.service" in result.stderr
    # `test` leaves the boot entry alone; re-activating the old system heals the host.
    assert remote.run(["readlink", "-f", "/boot/lab/default"]).stdout.strip() == before
    assert (
        remote.run([f"{before}/bin/switch-to-configuration", "test"], check=False).returncode == 0
    )
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")
    assert remote.run(["systemctl", "--failed", "--no-legend"]).stdout.strip() == ""


def test_broken_health_starts_but_answers_503(lab, lab_remotes):
    remote = lab_remotes["lab3"]
    before = current(remote)
    path = build(lab, "lab3", "t3", broken="health")
    nix.copy_closure(remote, path)
    assert remote.run([f"{path}/bin/switch-to-configuration", "test"], check=False).returncode == 0
    assert http_get(remote.endpoint.address, "/health") == (503, "unhealthy")
    assert (
        remote.run([f"{before}/bin/switch-to-configuration", "test"], check=False).returncode == 0
    )
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")


def test_dry_activate_and_boot_change_nothing_running(lab, lab_remotes):
    remote = lab_remotes["lab1"]
    before = current(remote)
    path = build(lab, "lab1", "t4")
    nix.copy_closure(remote, path)
    dry = remote.run([f"{path}/bin/switch-to-configuration", "dry-activate"])
    assert "would restart the following units: lab-web.service" in dry.stdout
    assert remote.run([f"{path}/bin/switch-to-configuration", "boot"]).returncode == 0
    assert current(remote) == before
    assert remote.run(["readlink", "-f", "/boot/lab/default"]).stdout.strip() == path
    assert remote.run([f"{before}/bin/switch-to-configuration", "boot"]).returncode == 0
    version = remote.run(["cat", f"{before}/nixos-version"]).stdout.strip()
    assert http_get(remote.endpoint.address, "/version") == (200, version)
    usage = remote.run([f"{path}/bin/switch-to-configuration", "bogus"], check=False)
    assert usage.returncode == 1


def test_full_disk_stops_the_copy(lab, lab_remotes):
    remote = lab_remotes["lab1"]
    path = build(lab, "lab1", "t5")
    with faulted(lab, "lab1", ops.Fault.FILL_DISK), pytest.raises(NixError):
        nix.copy_closure(remote, path)
    nix.copy_closure(remote, path)
    assert remote.run(["nix-store", "--verify-path", path]).returncode == 0


def test_systems_carry_fleet_host(lab, lab_remotes):
    """The module as the package has it, run by a launcher from the bytecode the build
    made: no call compiles it."""
    remote = lab_remotes["lab1"]
    helper = "/run/current-system/sw/bin/fleet-host"
    assert remote.run(["test", "-x", helper], check=False).returncode == 0
    module = "/run/current-system/sw/lib/fleet-host/fleet_host.py"
    assert remote.run(["cat", module]).stdout == (lab.flake / flake.HOST_HELPER).read_text()
    # Python's -v says where each module's code came from: the pyc, found valid.
    run = remote.run(["python3", "-v", "-BIS", helper, "version"])
    loaded = [line for line in run.stderr.splitlines() if "fleet_host" in line]
    assert any("fleet_host.cpython-" in line and " matches " in line for line in loaded), loaded


def test_gc_keeps_the_running_and_booted_systems(lab, lab_remotes):
    """As on NixOS, /run/current-system and /run/booted-system are garbage collector roots:
    a system activated with `test` and in no generation survives `nix-store --gc`."""
    remote = lab_remotes["lab3"]
    before = current(remote)
    booted = remote.run(["readlink", "-f", "/run/booted-system"]).stdout.strip()
    path = build(lab, "lab3", "t6")
    nix.copy_closure(remote, path)
    add_garbage = "echo garbage > /tmp/garbage && nix-store --add /tmp/garbage"
    garbage = remote.run(["sh", "-c", add_garbage]).stdout.strip()
    try:
        switched = remote.run([f"{path}/bin/switch-to-configuration", "test"], check=False)
        assert switched.returncode == 0, switched.stderr
        links = remote.run(["sh", "-c", f"readlink -f {PROFILE}-*-link"]).stdout.split()
        assert path not in links
        remote.run(["nix-store", "--gc"])
        assert remote.run(["test", "-e", garbage], check=False).returncode == 1  # it collected
        for kept in {path, booted, *links}:
            assert remote.run(["nix-store", "--verify-path", kept], check=False).returncode == 0
    finally:
        remote.run([f"{before}/bin/switch-to-configuration", "test"], check=False)
    assert current(remote) == before
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")


def test_lab_inventory_matches_the_schema(lab):
    from fleet import inventory

    data = nix.eval_json(str(lab.flake), "fleet")
    parsed = inventory.parse(data, "lab flake")
    assert sorted(parsed.hosts) == ["lab1", "lab2", "lab3"]
    assert parsed.hosts["lab1"].host_key is not None
    assert [c.name for c in parsed.hosts["lab1"].checks] == ["lab-web-health"]
