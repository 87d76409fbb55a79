"""A lab host reboots as a machine does: it comes back by itself on its boot entry, with its
disks (/nix, /boot, /var/lib/fleet) and its host key; a one-shot entry is booted once; and
after activation the booted system's fleet-host resolves what a crash left."""

from __future__ import annotations

import pytest

from fleet import nix
from fleet.lab import containers, ops
from tests.lab.test_lab_activation import PROFILE, build, http_get

pytestmark = pytest.mark.lab

ONESHOT = "/boot/lab/oneshot"


def reboot(lab, remote) -> None:
    """Reboot from inside, as `systemctl reboot` does, and wait for the next boot."""
    before = ops.boot_ids(lab)
    ops.fault(lab, remote.name, ops.Fault.REBOOT)
    ops.wait_booted(lab, [remote.name], after=before)
    remote.disconnect()  # the shared connection ended with the old boot


def readlink(remote, path: str) -> str:
    return remote.run(["readlink", "-f", path]).stdout.strip()


def exists(remote, path: str) -> bool:
    return remote.run(["test", "-e", path, "-o", "-L", path], check=False).returncode == 0


def test_a_host_reboots_by_itself_onto_its_boot_entry(lab, lab_remotes):
    remote = lab_remotes["lab1"]
    supervisor = containers.nspawn_pid(lab, lab.host(1))
    default = readlink(remote, "/boot/lab/default")
    generations = remote.run(["nix-env", "-p", PROFILE, "--list-generations"]).stdout
    remote.run(["sh", "-c", "echo kept > /var/lib/fleet/reboot-test; echo lost > /run/reboot-test"])
    try:
        reboot(lab, remote)
        assert readlink(remote, "/run/current-system") == default
        assert readlink(remote, "/run/booted-system") == default
        assert remote.run(["nix-env", "-p", PROFILE, "--list-generations"]).stdout == generations
        assert remote.run(["nix-store", "--verify", "--check-contents"]).returncode == 0
        assert remote.run(["cat", "/var/lib/fleet/reboot-test"]).stdout == "kept\n"
        assert not exists(remote, "/run/reboot-test")
        assert remote.run(["systemctl", "is-active", "lab-web"]).stdout.strip() == "active"
        assert containers.nspawn_pid(lab, lab.host(1)) == supervisor  # never down for `lab up`
        assert [s.ssh for s in ops.status(lab) if s.name == "lab1"] == [True]
    finally:
        remote.run(["rm", "-f", "/var/lib/fleet/reboot-test"], check=False)


def test_a_one_shot_entry_is_booted_once(lab, lab_remotes):
    remote = lab_remotes["lab2"]
    default = readlink(remote, "/boot/lab/default")
    other = build(lab, "lab2", "r1")
    nix.copy_closure(remote, other)
    remote.run(["ln", "-sfn", other, ONESHOT])
    try:
        reboot(lab, remote)
        assert readlink(remote, "/run/current-system") == other
        assert readlink(remote, "/run/booted-system") == other
        assert not exists(remote, ONESHOT)
        assert readlink(remote, "/boot/lab/default") == default
        assert http_get(remote.endpoint.address, "/version") == (200, "r1")
        reboot(lab, remote)
        assert readlink(remote, "/run/current-system") == default
        assert readlink(remote, "/run/booted-system") == default
    finally:
        remote.run(["rm", "-f", ONESHOT], check=False)
        if readlink(remote, "/run/current-system") != default:
            remote.run([f"{default}/bin/switch-to-configuration", "test"], check=False)
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")


# A system of two scripts, on the host's persistent disk: each says when it ran.
FAKE = "/var/lib/fleet/fake-system"
FAKE_LOG = "/var/lib/fleet/fake-boot.log"
MAKE_FAKE = f"""
mkdir -p {FAKE}/bin {FAKE}/sw/bin
cat > {FAKE}/bin/switch-to-configuration <<'SCRIPT'
#!/bin/sh
entry=$(ls {ONESHOT} 2>/dev/null || echo gone)
echo "switch-to-configuration $1; one-shot entry: $entry" >> {FAKE_LOG}
exit 4
SCRIPT
cat > {FAKE}/sw/bin/fleet-host <<'SCRIPT'
#!/bin/sh
echo "fleet-host $1; booted: $(readlink /run/booted-system)" >> {FAKE_LOG}
echo "fleet-host says why it failed"
exit 1
SCRIPT
chmod 0555 {FAKE}/bin/switch-to-configuration {FAKE}/sw/bin/fleet-host
ln -sfn {FAKE} {ONESHOT}
"""


def test_boot_runs_the_booted_systems_fleet_host_after_activation(lab, lab_remotes):
    remote = lab_remotes["lab3"]
    default = readlink(remote, "/boot/lab/default")
    remote.run(["sh", "-c", MAKE_FAKE])
    try:
        reboot(lab, remote)
        # The entry was gone before activation; fleet-host ran after it, although it failed.
        assert remote.run(["cat", FAKE_LOG]).stdout.splitlines() == [
            "switch-to-configuration test; one-shot entry: gone",
            f"fleet-host boot; booted: {FAKE}",
        ]
        journal = remote.run(
            ["journalctl", "-b", "-u", "fleet-lab-boot", "-o", "cat", "--no-pager"]
        ).stdout
        assert "fleet-host says why it failed" in journal
        assert "fleet-host boot failed with exit code 1" in journal
        # Neither failure fails the boot.
        assert remote.run(["systemctl", "is-system-running"]).stdout.strip() == "running"
        reboot(lab, remote)
        assert readlink(remote, "/run/current-system") == default
        assert remote.run(["cat", FAKE_LOG]).stdout.count("\n") == 2
    finally:
        remote.run(["rm", "-rf", FAKE, FAKE_LOG, ONESHOT], check=False)
        if readlink(remote, "/run/current-system") != default:
            remote.run([f"{default}/bin/switch-to-configuration", "test"], check=False)
    assert http_get(remote.endpoint.address, "/health") == (200, "ok")
