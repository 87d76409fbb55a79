"""What a checkout may not decide on the operator's machine, and files the tool writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet import config, report
from fleet.errors import UsageError
from fleet.ssh import Endpoint, SshConfig, Transport


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg/fleet").mkdir(parents=True)
    (tmp_path / "flake").mkdir()
    return tmp_path


@pytest.mark.parametrize("line", ["jumpHost: '$(id>x)'", "jumpHost: bastion", "flake: /x"])
def test_a_checkout_may_not_choose_the_jump_host_or_the_flake(home: Path, line: str) -> None:
    (home / "flake/fleet.yaml").write_text(line + "\n")
    with pytest.raises(UsageError, match=r"jumpHost|may only be set in the operator.s own"):
        config.load(str(home / "flake"))
    assert not (Path.cwd() / "x").exists()


@pytest.mark.parametrize(
    "value", ["$(id>x)", "`id`", "a b", "-oProxyCommand=x", "host;id", "bastion\n", "u@h:p"]
)
def test_a_jump_host_is_a_destination_and_nothing_else(home: Path, value: str) -> None:
    (home / "xdg/fleet/config.yaml").write_text(f"jumpHost: {value!r}\n".replace("'", '"'))
    with pytest.raises(UsageError, match="jumpHost"):
        config.load_user()


def test_good_jump_hosts_pass(home: Path) -> None:
    (home / "xdg/fleet/config.yaml").write_text(
        "jumpHost: ops@bastion.example.org:2222,[2001:db8::1]\n"
    )
    assert config.load_user().get("jumpHost") == "ops@bastion.example.org:2222,[2001:db8::1]"


def test_the_operators_own_file_wins(home: Path) -> None:
    (home / "xdg/fleet/config.yaml").write_text("parallel: 2\n")
    (home / "flake/fleet.yaml").write_text("parallel: 50\nhealthTimeout: 9\n")
    cfg = config.load(str(home / "flake"))
    assert cfg.get("parallel") == 2 and cfg.get("healthTimeout") == 9


@pytest.mark.parametrize("value", [".nan", ".inf", "-1.5"])
def test_timeouts_are_finite_and_positive(home: Path, value: str) -> None:
    (home / "xdg/fleet/config.yaml").write_text(f"healthTimeout: {value}\n")
    with pytest.raises(UsageError, match="healthTimeout"):
        config.load_user()


def test_a_pinned_host_key_is_final() -> None:
    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("h", "192.0.2.1", host_key="ssh-ed25519 AAAA"))
        opts = remote.options()
    for option in ("KnownHostsCommand=none", "VerifyHostKeyDNS=no", "StrictHostKeyChecking=yes"):
        assert option in opts


def test_the_report_never_writes_through_a_planted_file(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ".report.html.tmp").symlink_to(victim)
    report.write(target, "<html></html>")
    assert victim.read_text() == "keep" and target.read_text() == "<html></html>"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.html.")] == [
        ".report.html.tmp"
    ]
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"
    with pytest.raises(UsageError, match="does not exist"):
        report.write(tmp_path / "missing/r.html", "x")


def test_a_path_with_a_space_is_refused_before_any_host(home: Path) -> None:
    (home / "xdg/fleet/config.yaml").write_text("identityFile: 'my keys/id'\n")
    with pytest.raises(UsageError, match="without spaces"):
        config.load_user()


def test_a_long_host_name_keeps_the_control_socket_short() -> None:
    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("h" * 63, "192.0.2.1"))
        assert len(str(remote.control_path)) < 100  # sun_path holds 108 bytes
