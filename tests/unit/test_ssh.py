"""The transport's own files on the operator's machine."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fleet import ssh
from fleet.errors import HostKeyError, SshError, UsageError
from fleet.process import Result
from fleet.ssh import Endpoint, SshConfig, Transport, jump_chain


def test_a_killed_runs_control_directory_is_swept_by_the_next():
    stale = Path(tempfile.mkdtemp(prefix="fleet-ssh-999999999-"))
    with Transport(SshConfig()) as transport:
        assert not stale.exists()
        assert transport.dir.name.startswith(f"fleet-ssh-{os.getpid()}-")
    assert not transport.dir.exists()


def test_another_users_control_directory_is_left_alone():
    other = Path(tempfile.mkdtemp(prefix="fleet-ssh-999999998-"))
    if os.geteuid() == 0:
        os.chown(other, 12345, 12345)
    try:
        with Transport(SshConfig()):
            assert other.exists() == (os.geteuid() == 0)
    finally:
        if other.exists():
            other.rmdir()


# Jump hosts: verified through the run's own ssh_config (fleet/ssh.py, docs/security.md).

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq6tuZ1bUQsAdDLPz2JvNTMJ2cTSVjUnQ5O0Ut1UcVQ"
HOSTILE = """Host *
  KnownHostsCommand /bin/echo evil
  StrictHostKeyChecking no
  BatchMode no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /tmp/evil
  HostKeyAlias evil
  ProxyCommand /bin/false
  ProxyJump evil.example
  VerifyHostKeyDNS yes
  UpdateHostKeys yes
  ControlMaster auto
  ControlPath /tmp/evil-%h
  ForwardAgent yes
  CanonicalizeHostname always
"""


@pytest.fixture()
def operator_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The operator's ~/.ssh/config, hostile, as the file the run's ssh_config includes."""
    hostile = tmp_path / "ssh_config"
    hostile.write_text(HOSTILE)
    hostile.chmod(0o600)
    monkeypatch.setattr(ssh, "_operator_ssh_configs", lambda: [hostile])
    monkeypatch.setattr(ssh, "_home", lambda: tmp_path / "home")
    return hostile


def chain_config(**kwargs: object) -> SshConfig:
    chain = jump_chain("ops@bastion.example:2222,[2001:db8::1],root@10.0.0.7", {"10.0.0.7": KEY})
    return SshConfig(identity_file=Path("/keys/id%h"), jump_hosts=chain, **kwargs)  # type: ignore[arg-type]


def test_a_chain_is_parsed_hop_by_hop() -> None:
    hops = jump_chain("ops@bastion.example:2222,[2001:db8::1],root@10.0.0.7", {"10.0.0.7": KEY})
    assert [h.spec for h in hops] == ["ops@bastion.example:2222", "[2001:db8::1]", "root@10.0.0.7"]
    assert [h.known_as for h in hops] == ["[bastion.example]:2222", "2001:db8::1", "10.0.0.7"]
    assert [h.host_key for h in hops] == [None, None, KEY]
    assert jump_chain("[2001:db8::1]:22", {"[2001:db8::1]": KEY})[0].known_as == "2001:db8::1"
    assert jump_chain("[2001:db8::1]:2200")[0].known_as == "[2001:db8::1]:2200"


@pytest.mark.parametrize(
    ("value", "keys", "message"),
    [
        ("a,b,a", {}, "appears twice"),
        ("bastion", {"other": KEY}, "not a jump host"),
        ("bastion:70000", {}, "expected user@host:port"),
        ("bastion;id", {}, "expected user@host:port"),
        ("bastion", {"bastion": "ssh-ed25519 AAAA\n@cert-authority * x"}, "TYPE BASE64"),
    ],
)
def test_a_bad_chain_is_refused(value: str, keys: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        jump_chain(value, keys)


def test_the_run_ssh_config_pins_every_jump_host(operator_files: Path) -> None:
    with Transport(chain_config()) as transport:
        assert transport.jump_config is not None
        text = transport.jump_config.read_text()
        pinned = transport.jump_pinned_file.read_text()
        modes = {p.name: p.stat().st_mode & 0o777 for p in transport.dir.iterdir()}
    blocks = [b + "\n" for b in text.split("\nHost ")[1:-1]]
    assert [b.split("\n", 1)[0] for b in blocks] == ["bastion.example", "2001:db8::1", "10.0.0.7"]
    first, second, third = blocks
    # The chain is ours: the first hop directly, each later one through the one before.
    assert "  ProxyJump none\n" in first
    assert "  ProxyJump ops@bastion.example:2222\n" in second
    assert "  ProxyJump [2001:db8::1]\n" in third
    for block in blocks:
        for option in (
            "BatchMode yes", "StrictHostKeyChecking yes", "KnownHostsCommand none",
            "VerifyHostKeyDNS no", "UpdateHostKeys no", "ControlPath none",
            "IdentitiesOnly yes", 'IdentityFile "/keys/id%%h"', "ConnectTimeout 10",
        ):  # fmt: skip
            assert f"  {option}\n" in block, (option, block)
    assert "  HostKeyAlias [bastion.example]:2222\n" in first
    # Unpinned: ssh's default files, written out; pinned: the run's file alone.
    home = operator_files.parent / "home"
    assert f'  UserKnownHostsFile "{home}/.ssh/known_hosts" "{home}/.ssh/known_hosts2"\n' in first
    assert "GlobalKnownHostsFile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2" in first
    assert f'  UserKnownHostsFile "{transport.jump_pinned_file}"\n' in third
    assert "  GlobalKnownHostsFile /dev/null\n" in third
    assert pinned == f"10.0.0.7 {KEY}\n"
    # The fleet's hosts: through the last hop, the jump's stderr kept for the error message.
    d = transport.dir
    proxy = f"ssh -F {d}/ssh_config -l root -W '[%h]:%p' 10.0.0.7 2>{d}/jump-%n-%p.log"
    assert f"\nHost *\n  ProxyCommand {proxy}\n" in text
    # The operator's own files come last, under Match all.
    assert text.endswith(f'\nMatch all\n  Include "{operator_files}"\n')
    assert modes["ssh_config"] == modes["jump_known_hosts"] == 0o600


def test_every_ssh_gets_the_run_config_and_the_last_hop(operator_files: Path) -> None:
    with Transport(chain_config(known_hosts_file=Path("/kh/known%hosts"))) as transport:
        remote = transport.remote(Endpoint("h", "192.0.2.1"))
        opts = remote.options()
        sshopts = remote.nix_sshopts()
        assert opts[opts.index("-F") + 1] == str(transport.jump_config)
    assert not any("Proxy" in o for o in opts)
    assert "IdentityFile=/keys/id%%h" in opts and "UserKnownHostsFile=/kh/known%%hosts" in opts
    assert sshopts.split() == opts and not any(c.isspace() for o in opts for c in o)
    assert "-J" not in opts
    with (
        Transport(chain_config()) as transport,
        pytest.raises(SshError, match="cannot go through a jump host"),
    ):
        transport.remote(Endpoint("h", "a;id")).options()


def test_the_run_directory_never_needs_quoting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/50% off $(id)")
    with Transport(SshConfig(jump_hosts=jump_chain("bastion"))) as transport:
        assert str(transport.jump_config).startswith("/tmp/fleet-ssh-")


@pytest.mark.parametrize("path", ["/keys/${HOME}/id", '/keys/"id', "/keys/id\\x", "/keys/id\n"])
def test_a_path_ssh_would_not_take_literally_is_refused(path: str) -> None:
    with Transport(SshConfig(identity_file=Path(path))) as transport:
        remote = transport.remote(Endpoint("h", "192.0.2.1"))
        with pytest.raises(SshError, match="literally"):
            remote.options()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")
def test_ssh_itself_resolves_a_hostile_operator_config_to_our_options(
    operator_files: Path,
) -> None:
    """`ssh -G` prints what ssh would use; no connection is made."""
    with Transport(chain_config()) as transport:
        assert transport.jump_config is not None
        resolved = {}
        for hop in ("bastion.example", "2001:db8::1", "10.0.0.7", "target.example"):
            out = subprocess.run(
                ["ssh", "-G", "-F", str(transport.jump_config), hop],
                capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
            ).stdout  # fmt: skip
            resolved[hop] = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        pinned = str(transport.jump_pinned_file)
        run_dir = transport.dir
    for hop, alias in (("bastion.example", "[bastion.example]:2222"), ("10.0.0.7", "10.0.0.7")):
        got = resolved[hop]
        assert got["batchmode"] == "yes" and got["stricthostkeychecking"] == "true"
        assert got["hostkeyalias"] == alias and "knownhostscommand" not in got
        assert got["verifyhostkeydns"] == "false" and got["updatehostkeys"] == "false"
        assert "controlpath" not in got and got["forwardagent"] == "no"
        assert "proxycommand" not in got and got["canonicalizehostname"] == "false"
    assert "proxyjump" not in resolved["bastion.example"]
    assert resolved["2001:db8::1"]["proxyjump"] == "ops@bastion.example:2222"
    assert resolved["10.0.0.7"]["proxyjump"] == "[2001:db8::1]"
    assert resolved["10.0.0.7"]["userknownhostsfile"] == pinned
    assert resolved["10.0.0.7"]["globalknownhostsfile"] == "/dev/null"
    assert "/dev/null" not in resolved["bastion.example"]["userknownhostsfile"]
    # The fleet's hosts go through the last hop, whatever the operator's file says.
    assert resolved["target.example"]["proxycommand"].endswith(
        "10.0.0.7 2>" + f"{run_dir}/jump-%n-%p.log"
    )
    # Everything else still reads the operator's file (here: its hostile values).
    assert resolved["target.example"]["knownhostscommand"] == "/bin/echo evil"


def test_a_refused_jump_host_key_is_named(operator_files: Path) -> None:
    stderr = (
        "No ED25519 host key is known for [bastion.example]:2222 and you have requested "
        "strict checking.\r\nHost key verification failed.\r\n"
        "kex_exchange_identification: Connection closed by remote host\r\n"
        "Connection closed by UNKNOWN port 65535\r\n"
    )
    closed = "kex_exchange_identification: Connection closed by remote host\r\n"
    with Transport(chain_config()) as transport:
        remote = transport.remote(Endpoint("h", "192.0.2.1", port=2200))
        log = transport.dir / "jump-192.0.2.1-2200.log"

        def error(jump_log: str, stderr: str = closed) -> SshError:
            log.write_text(jump_log)
            return remote.connection_error(Result(("ssh",), 255, "", stderr))

        unknown = error(stderr)
        changed = stderr.replace("No ED25519 host key is known for", "Host key for").replace(
            "and you have", "has changed and you have"
        )
        pinned = error(changed.replace("[bastion.example]:2222", "10.0.0.7"))
        target = error("", stderr.replace("[bastion.example]:2222", "h"))
        down = error("ssh: connect to host bastion.example port 2222: No route to host\r\n")
    assert isinstance(unknown, HostKeyError) and "\n" not in str(unknown)
    assert "jump host ops@bastion.example:2222: host key is unknown" in str(unknown)
    assert "jump host root@10.0.0.7" in str(pinned) and "jumpHostKeys" in str(pinned)
    assert isinstance(target, HostKeyError) and "jump host root" not in str(target)
    assert "does not match ~/.ssh/known_hosts" in str(target)
    assert not isinstance(down, HostKeyError) and str(down).endswith("No route to host")


def test_another_login_to_the_same_host_never_rides_its_connection(tmp_path) -> None:
    """The same host as another user (or at another address) gets its own master."""
    from fleet.ssh import Endpoint, SshConfig, Transport

    with Transport(SshConfig()) as transport:
        root = transport.remote(Endpoint("web1", "192.0.2.1", 22, "root"))
        deploy = transport.remote(Endpoint("web1", "192.0.2.1", 22, "deploy"))
        moved = transport.remote(Endpoint("web1", "192.0.2.2", 22, "root"))
        assert len({root.control_path, deploy.control_path, moved.control_path}) == 3
        assert transport.remote(Endpoint("web1", "192.0.2.1", 22, "deploy")) is deploy


# A failed remote step as a line the operator can paste (Remote.command_line).

HOSTILE_ARGS = ["activate", "a b", "it's", '"q"', "$HOME", "$(touch pwned)", "`touch pwned`",
                "a;b", "x\ny", "--", "-o", "*", "~", "\\", ""]  # fmt: skip
FAKE_SSH = """#!/bin/sh
# Record the options, then run the remote command through a shell, as sshd does.
for last; do :; done
printf '%s\\0' "$@" > "$OUT/ssh-args"
cd "$OUT" && exec /bin/sh -c "$last"
"""
FAKE_HELPER = """#!/bin/sh
printf '%s\\0' "$@" > "$OUT/remote-args"
echo 'not JSON' >&2
exit 9
"""


@pytest.fixture()
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``ssh`` and ``fleet-host`` on PATH that record what reached them, run from ``out``."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("fleet-host", FAKE_HELPER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("OUT", str(out))
    return out


def args_in(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def test_a_pasted_line_reaches_the_host_with_every_argument_intact(fake_ssh: Path) -> None:
    config = SshConfig(identity_file=Path("/keys/id_ed25519"), known_hosts_file=Path("/k/hosts"))
    with Transport(config) as transport:
        remote = transport.remote(Endpoint("web1", "10.0.0.5", 2222, "deploy"))
        line = remote.command_line(["fleet-host", *HOSTILE_ARGS])
    subprocess.run(["/bin/sh", "-c", line], check=False)  # as pasted in a shell
    assert args_in(fake_ssh / "remote-args") == HOSTILE_ARGS
    assert not (fake_ssh / "pwned").exists()
    sent = args_in(fake_ssh / "ssh-args")
    assert sent[-3:-1] == ["--", "10.0.0.5"]
    options = dict(zip(sent[:-3:2], sent[1:-3:2], strict=True))
    assert options["-p"] == "2222" and options["-l"] == "deploy"
    given = {
        v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in itertools.pairwise(sent) if k == "-o"
    }
    assert given["IdentityFile"] == "/keys/id_ed25519"
    assert given["UserKnownHostsFile"] == "/k/hosts" and given["StrictHostKeyChecking"] == "yes"
    assert given["ControlMaster"] == "no"  # not the run's connection, gone when it ends


def test_a_pinned_key_goes_in_the_line_and_no_file_of_the_run(fake_ssh: Path) -> None:
    chain = jump_chain("ops@bastion.example:2222")
    with Transport(SshConfig(jump_hosts=chain)) as transport:
        remote = transport.remote(Endpoint("web1", "10.0.0.5", 22, "root", KEY))
        line = remote.command_line(["fleet-host", "state"])
        assert str(transport.dir) not in line
    sent = shlex.split(line)
    given = [v for k, v in itertools.pairwise(sent) if k == "-o"]
    assert f"KnownHostsCommand=/usr/bin/env echo web1 {KEY}" in given
    assert {"UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=web1"} <= set(given)  # fmt: skip
    assert sent[sent.index("-J") + 1] == "ops@bastion.example:2222"


def test_a_failed_remote_step_carries_its_line(fake_ssh: Path) -> None:
    from fleet.hostops import HelperError, HostOps

    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("web1", "10.0.0.5"))
        with pytest.raises(ssh.RemoteCommandError) as failed:
            remote.run(["fleet-host", "it's; $(x)"])
        with pytest.raises(HelperError) as helper:
            HostOps(remote).call("activate", "--token", "t 1", helper="fleet-host")
    assert failed.value.command == remote.command_line(["fleet-host", "it's; $(x)"])
    assert helper.value.command == remote.command_line(
        ["fleet-host", "activate", "--token", "t 1"])  # fmt: skip
    assert "exit 9" in str(helper.value)
