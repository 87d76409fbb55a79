"""`fleet lab up` and `down` are idempotent, and `down` leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.errors import FleetError
from fleet.lab import containers, network, ops
from fleet.lab.layout import Lab
from tests.lab.fleetrun import faulted

pytestmark = pytest.mark.lab


def leftovers(lab: Lab) -> list[str]:
    """Everything of the instance that still exists anywhere on the machine."""
    found = [f"link {n}" for n in network.links(lab.veth_prefix) + network.links(lab.bridge)]
    found += [f"netns {n}" for n in network.namespaces(lab.netns_prefix)]
    found += [f"process {p}" for p in containers.stray_nspawns(lab)]
    mounts = Path("/proc/self/mounts").read_text()
    found += [
        f"mount {line.split()[1]}"
        for line in mounts.splitlines()
        if str(lab.state) in line.split()[1]
    ]
    if lab.state.exists():
        found.append(f"directory {lab.state}")
    return found


def other_instance(offset: int) -> str:
    """An instance beside the session's lab (FLEET_LAB_INSTANCE), which keeps running; test
    sessions on different instances never touch each other's."""
    return str((Lab.from_env().instance + offset) % 255)


@pytest.fixture()
def spare_lab(monkeypatch) -> Lab:
    """A second instance, so the session's lab keeps running."""
    monkeypatch.setenv("FLEET_LAB_INSTANCE", other_instance(100))
    lab = Lab.from_env()
    ops.down(lab)
    yield lab
    ops.down(lab)
    assert leftovers(lab) == []


def test_up_twice_down_twice(spare_lab):
    states = ops.up(spare_lab, 2, lambda _m: None)
    assert [(s.name, s.running, s.ssh) for s in states] == [
        ("lab1", True, True),
        ("lab2", True, True),
    ]
    again = ops.up(spare_lab, None, lambda _m: None)
    assert again == states
    ops.down(spare_lab)
    assert leftovers(spare_lab) == []
    ops.down(spare_lab)
    assert leftovers(spare_lab) == []
    assert ops.status(spare_lab) == []


def test_crashed_host_boots_its_profile_generation_again(spare_lab):
    ops.up(spare_lab, 1, lambda _m: None)
    host = spare_lab.host(1)
    ops.fault(spare_lab, "lab1", ops.Fault.CRASH)
    [state] = ops.status(spare_lab)
    assert not state.running and not state.ssh
    with pytest.raises(FleetError, match="lab1 is down"):  # a crash does not reboot
        ops.wait_booted(spare_lab, ["lab1"], 5)
    [state] = ops.up(spare_lab, None, lambda _m: None)
    assert state.running and state.ssh
    with ops.transport(spare_lab) as transport:
        remote = transport.remote(ops.endpoints(spare_lab)[0])
        running = remote.run(["readlink", "-f", "/run/current-system"]).stdout.strip()
        profile = remote.run(["readlink", "-f", "/nix/var/nix/profiles/system"]).stdout.strip()
        assert running == profile
        assert remote.run(["systemctl", "is-active", "lab-web"]).stdout.strip() == "active"
    assert containers.nspawn_pid(spare_lab, host) is not None


def supervisors(lab: Lab) -> list[int]:
    return [
        p
        for p in containers.stray_nspawns(lab)
        if containers._is_supervisor(containers._cmdline(p))
    ]


def test_up_and_down_while_a_host_reboots(spare_lab):
    [before] = ops.up(spare_lab, 1, lambda _m: None)
    boots = ops.boot_ids(spare_lab)
    ops.fault(spare_lab, "lab1", ops.Fault.REBOOT)
    # `lab up` waits for the host's next boot and does not start another container.
    assert ops.up(spare_lab, None, lambda _m: None) == [before]
    assert ops.boot_ids(spare_lab)["lab1"] not in (None, boots["lab1"])
    assert len(supervisors(spare_lab)) == 1
    ops.fault(spare_lab, "lab1", ops.Fault.REBOOT)
    ops.down(spare_lab)  # fixture: nothing is left, not even a container booted meanwhile


def test_partition_and_heal(lab):
    host = lab.host(2)
    with faulted(lab, host.name, ops.Fault.PARTITION):
        assert not ops._port_open(host.address, 22, 0.5)
        assert [s.link_up for s in ops.status(lab) if s.name == host.name] == [False]
    assert ops._port_open(host.address, 22, 2)


def test_stop_and_start_ssh(lab):
    host = lab.host(3)
    with faulted(lab, host.name, ops.Fault.STOP_SSH):
        assert not ops._port_open(host.address, 22, 0.5)
        [state] = [s for s in ops.status(lab) if s.name == host.name]
        assert state.running and not state.ssh
        # What a host that does not come up is named for: asked inside, not over ssh.
        with pytest.raises(FleetError, match=r"\n  lab3: sshd is inactive \(systemd state "):
            ops.wait_booted(lab, [host.name], 2)
    assert ops._port_open(host.address, 22, 2)


def test_lab_files_are_not_world_readable(lab):
    assert oct(os.stat(lab.identity).st_mode & 0o777) == "0o600"


def test_a_degraded_host_is_named_then_booted_again(spare_lab):
    ops.up(spare_lab, 2, lambda _m: None)
    with ops.transport(spare_lab) as transport:
        lab1 = transport.remote(ops.endpoints(spare_lab)[0])
        lab1.run(["systemd-run", "--unit=fleet-test-broken", "--", "/bin/false"])
        [degraded] = ops._bring_up(spare_lab, spare_lab.hosts(2), None, 30)
        assert degraded.name == "lab1"
        assert (degraded.degraded or "").startswith("fleet-test-broken.service failed")
        states = ops.up(spare_lab, None, lambda _m: None)  # boots lab1 once more
        assert all(s.running and s.ssh for s in states)
        assert lab1.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"
