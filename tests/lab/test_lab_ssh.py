"""The lab's hosts answer ssh with their pinned keys, and a wrong key is refused."""

from __future__ import annotations

import subprocess

import pytest

from fleet.errors import HostKeyError
from fleet.lab import ops
from fleet.ssh import Endpoint, SshConfig, Transport

pytestmark = pytest.mark.lab


def test_every_host_answers_with_its_pinned_key(lab, lab_remotes):
    for name, remote in lab_remotes.items():
        assert remote.run(["hostname"]).stdout.strip() == name
        assert remote.run(["systemctl", "is-system-running"], check=False).stdout.strip() in (
            "running",
            "degraded",
        )


def test_known_hosts_file_lets_plain_ssh_in(lab):
    endpoint = ops.endpoints(lab)[0]
    out = subprocess.run(
        [
            "ssh",
            "-i",
            str(lab.identity),
            "-o",
            f"UserKnownHostsFile={lab.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            f"root@{endpoint.address}",
            "hostname",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == endpoint.name


def test_arguments_are_quoted_not_pasted(lab_remotes):
    remote = lab_remotes["lab1"]
    tricky = "a b; echo injected $(id) 'q' \"dq\""
    assert remote.run(["printf", "%s", tricky]).stdout == tricky


def test_host_key_mismatch_is_refused(lab, tmp_path):
    right = ops.endpoints(lab)[0]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    wrong_key = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    wrong = Endpoint(right.name, right.address, right.port, right.user, wrong_key)
    pinned = "does not match the key pinned in the inventory"
    with (
        Transport(SshConfig(identity_file=lab.identity)) as transport,
        pytest.raises(HostKeyError, match=pinned),
    ):
        transport.remote(wrong).run(["true"])


def test_unknown_host_key_is_refused(lab, tmp_path):
    right = ops.endpoints(lab)[0]
    unpinned = Endpoint(right.name, right.address, right.port, right.user, None)
    empty = tmp_path / "known_hosts"
    empty.touch()
    config = SshConfig(identity_file=lab.identity, known_hosts_file=empty)
    with (
        Transport(config) as transport,
        pytest.raises(HostKeyError, match="unknown or does not match"),
    ):
        transport.remote(unpinned).run(["true"])
