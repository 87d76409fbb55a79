"""The lab's hosts answer ssh with their pinned keys, and a wrong key is refused; so do jump
hosts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import HostKeyError
from fleet.lab import ops
from fleet.ssh import Endpoint, SshConfig, Transport
from tests.lab.fleetrun import fleet_argv, run_fleet, set_release

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


# Jump hosts: lab1 (and lab3) carry the connections to lab2, verified like every other host.


def operator_env(tmp_path: Path, config: str) -> dict[str, str]:
    """The environment of a `fleet` run whose operator's own config.yaml is ``config``."""
    xdg = tmp_path / "xdg"
    (xdg / "fleet").mkdir(parents=True)
    (xdg / "fleet/config.yaml").write_text(config)
    return {**os.environ, "XDG_CONFIG_HOME": str(xdg)}


def address(lab, name: str) -> str:
    return next(e.address for e in ops.endpoints(lab) if e.name == name)


def host_key(lab, name: str) -> str:
    key = next(e.host_key for e in ops.endpoints(lab) if e.name == name)
    assert key is not None
    return " ".join(key.split()[:2])


def fresh_key(tmp_path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    return " ".join((tmp_path / "k.pub").read_text().split()[:2])


@contextlib.contextmanager
def reachable_only_through_the_lab(lab, *names: str) -> Iterator[None]:
    """The operator's machine routes these hosts' addresses nowhere; the other lab hosts
    still reach them over the lab's bridge."""
    routes = [["blackhole", f"{address(lab, n)}/32"] for n in names]
    for route in routes:
        subprocess.run(["ip", "route", "add", *route], check=True)
    try:
        for name in names:
            direct = subprocess.run(
                ["ssh", "-F", "none", "-i", str(lab.identity), "-o", "BatchMode=yes",
                 "-o", "ConnectTimeout=3", "-o", f"UserKnownHostsFile={lab.known_hosts}",
                 f"root@{address(lab, name)}", "true"],
                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert direct.returncode == 255, f"{name} still reachable directly"
        yield
    finally:
        for route in routes:
            subprocess.run(["ip", "route", "del", *route], check=False)


def refusal(status: dict[str, Any], err: str, host: str = "lab2") -> str:
    assert status[host]["reachable"] is False, status[host]
    message = status[host]["message"]
    assert "\n" not in message and "Traceback" not in err, err
    return str(message)


def test_status_and_deploy_go_through_a_jump_host(lab, tmp_path, safety_check):
    jump = f"root@{address(lab, 'lab1')}"
    env = operator_env(tmp_path, f"jumpHost: {jump}\nknownHostsFile: {lab.known_hosts}\n")
    set_release(lab, "jump1")
    with reachable_only_through_the_lab(lab, "lab2"):
        code, status, err = run_fleet(lab, "status", "lab2", env=env)
        assert code == 0, err
        assert status["lab2"]["reachable"] and status["lab2"]["healthy"]
        code, report, err = run_fleet(lab, "deploy", "lab2", env=env)
        assert code == 0, err
        assert report["hosts"]["lab2"]["result"] == "deployed"
        assert report["hosts"]["lab2"]["new"]["path"].endswith("-lab-system-lab2-jump1")


def test_a_chain_of_jump_hosts(lab, tmp_path):
    chain = f"root@{address(lab, 'lab1')},root@{address(lab, 'lab3')}:22"
    env = operator_env(tmp_path, f"jumpHost: '{chain}'\nknownHostsFile: {lab.known_hosts}\n")
    with reachable_only_through_the_lab(lab, "lab2", "lab3"):
        code, status, err = run_fleet(lab, "status", "lab2", env=env)
    assert code == 0, err
    assert status["lab2"]["reachable"]


def test_an_unknown_jump_host_key_is_refused(lab, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.touch()
    jump = f"root@{address(lab, 'lab1')}"
    env = operator_env(tmp_path, f"jumpHost: {jump}\nknownHostsFile: {empty}\n")
    code, status, err = run_fleet(lab, "status", "lab2", env=env)
    assert code == 4, err
    message = refusal(status, err)
    assert f"jump host {jump}: host key is unknown or does not match {empty}" in message


def test_a_pinned_jump_host_key_is_final(lab, tmp_path):
    """known_hosts knows lab1's real key; the key jumpHostKeys pins (here: wrong) decides.
    The right pinned key alone lets the run in, with no known_hosts entry at all."""
    lab1 = address(lab, "lab1")
    wrong = operator_env(
        tmp_path / "wrong",
        f"jumpHost: root@{lab1}\nknownHostsFile: {lab.known_hosts}\n"
        f"jumpHostKeys: {{'{lab1}': '{fresh_key(tmp_path)}'}}\n",
    )
    code, status, err = run_fleet(lab, "status", "lab2", env=wrong)
    assert code == 4, err
    assert "does not match the key pinned in jumpHostKeys" in refusal(status, err)
    empty = tmp_path / "known_hosts"
    empty.touch()
    right = operator_env(
        tmp_path / "right",
        f"jumpHost: root@{lab1}\nknownHostsFile: {empty}\n"
        f"jumpHostKeys: {{'{lab1}': '{host_key(lab, 'lab1')}'}}\n",
    )
    code, status, err = run_fleet(lab, "status", "lab2", env=right)
    assert code == 0, err


def test_a_hostile_ssh_config_cannot_choose_the_jump_host_or_its_key(lab, tmp_path):
    """~/.ssh/config sends lab1's name to lab3's sshd (a ProxyCommand) and vouches for
    lab3's key under lab1's name in every way ssh_config knows. The run still reaches lab1
    itself, and only with a key known or pinned for lab1. The run sees that config through
    a private mount of ~/.ssh, where ssh looks for it; plain `ssh -J`, as the tool ran it
    before, lets lab3 stand in for lab1 there."""
    lab1, lab3 = address(lab, "lab1"), address(lab, "lab3")
    dotssh = tmp_path / "dotssh"
    dotssh.mkdir(mode=0o700)
    liar = dotssh / "liar"
    liar.write_text(f"{lab1} {host_key(lab, 'lab3')}\n")
    read = tmp_path / "read"  # ssh ran the config's Match exec: it read the file
    (dotssh / "config").write_text(
        f'Match exec "touch {read}"\n'
        f"Host {lab1}\n"
        f"  ProxyCommand ssh -F none -i {lab.identity} -o BatchMode=yes"
        " -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        f" -W 127.0.0.1:22 root@{lab3}\n"
        "Host *\n"
        f"  KnownHostsCommand /bin/cat {liar}\n"
        "  VerifyHostKeyDNS yes\n"
        "  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {liar}\n"
        f"  GlobalKnownHostsFile {liar}\n"
        "  HostKeyAlias liar\n"
        "  ControlMaster auto\n"
        "  ControlPath ~/.ssh/cm-%C\n"
        f"  IdentityFile {lab.identity}\n"
    )
    home = subprocess.run(["sh", "-c", "getent passwd $(id -u) | cut -d: -f6"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    script = f'mkdir -p "{home}/.ssh" && mount --bind "$1" "{home}/.ssh" && shift && exec "$@"'

    def under_hostile_config(argv: list[str], env: dict[str, str] | None = None):
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(dotssh), *argv],
            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def status_under_hostile_config(name: str, config: str) -> tuple[int, Any, str]:
        env = operator_env(tmp_path / name, config)
        proc = under_hostile_config(fleet_argv(lab, "status", "lab2"), env)
        return (
            proc.returncode,
            json.loads(proc.stdout) if proc.stdout.strip() else None,
            proc.stderr,
        )

    lab2 = next(e for e in ops.endpoints(lab) if e.name == "lab2")
    pinned_lab2 = tmp_path / "lab2.known_hosts"
    pinned_lab2.write_text(f"{lab2.address} {lab2.host_key}\n")
    before = under_hostile_config(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={pinned_lab2}", "-o", "HostKeyAlias=" + lab2.address,
         "-i", str(lab.identity), "-J", f"root@{lab1}", f"root@{lab2.address}", "hostname"],
    )  # fmt: skip
    assert before.stdout.strip() == "lab2", before.stderr  # through lab3, taken for lab1
    assert read.exists()

    empty = tmp_path / "known_hosts"
    empty.touch()
    unknown = f"jumpHost: root@{lab1}\nknownHostsFile: {empty}\n"
    code, status, err = status_under_hostile_config("unknown", unknown)
    assert code == 4, err
    assert "host key is unknown or does not match" in refusal(status, err)

    wrong = f"jumpHostKeys: {{'{lab1}': '{host_key(lab, 'lab3')}'}}\n"
    code, status, err = status_under_hostile_config("wrong", unknown + wrong)
    assert code == 4, err
    assert "jumpHostKeys" in refusal(status, err)

    right = f"jumpHostKeys: {{'{lab1}': '{host_key(lab, 'lab1')}'}}\n"
    code, status, err = status_under_hostile_config("right", unknown + right)
    assert code == 0, err
    assert status["lab2"]["reachable"]
