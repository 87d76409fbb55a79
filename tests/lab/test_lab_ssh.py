"""The lab's hosts answer ssh with their pinned keys, and a wrong key is refused."""

from __future__ import annotations

import subprocess
import sys

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


HOSTILE_CHECK = """
import sys
from fleet.errors import HostKeyError
from fleet.ssh import Endpoint, SshConfig, Transport
name, address, wrong_key, identity = sys.argv[1:5]
with Transport(SshConfig(identity_file=identity)) as transport:
    try:
        transport.remote(Endpoint(name, address, 22, "root", wrong_key)).run(["true"])
    except HostKeyError:
        print("refused")
    else:
        print("let in")
"""


def test_a_hostile_ssh_config_cannot_replace_a_pinned_key(lab, tmp_path):
    """~/.ssh/config offers the host's real key by KnownHostsCommand and DNS; the pinned
    (here: wrong) key still decides. The run sees that config through a private mount."""
    right = ops.endpoints(lab)[0]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    wrong_key = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    real = f"{right.name} {right.host_key}"
    dotssh = tmp_path / "dotssh"
    dotssh.mkdir(mode=0o700)
    (dotssh / "real").write_text(real + "\n")
    (dotssh / "config").write_text(
        "Host *\n"
        f"  KnownHostsCommand /bin/cat {dotssh / 'real'}\n"
        "  VerifyHostKeyDNS yes\n"
        "  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {dotssh / 'real'}\n"
    )
    home = subprocess.run(["sh", "-c", "getent passwd $(id -u) | cut -d: -f6"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    script = f'mkdir -p "{home}/.ssh" && mount --bind "$1" "{home}/.ssh" && shift && exec "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(dotssh), sys.executable, "-c", HOSTILE_CHECK, right.name, right.address,
         wrong_key, str(lab.identity)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout.strip() == "refused", result.stderr
