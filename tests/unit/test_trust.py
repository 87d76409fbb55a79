"""What a checkout may not decide on the operator's machine, and files the tool writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet import config, flows, report
from fleet.errors import UsageError
from fleet.inventory import DeployPolicy, Inventory
from fleet.ssh import Endpoint, SshConfig, Transport


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg/fleet").mkdir(parents=True)
    (tmp_path / "flake").mkdir()
    (tmp_path / "flake/flake.nix").write_text("{ outputs = { self }: { }; }\n")
    return tmp_path


@pytest.mark.parametrize(
    "line", ["jumpHost: '$(id>x)'", "jumpHost: bastion", "flake: /x", "signingKey: /x"]
)
def test_a_checkout_may_not_choose_the_jump_host_the_flake_or_the_signing_key(
    home: Path, line: str
) -> None:
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


@pytest.mark.parametrize("key", ["healthTimeout", "confirmTimeout", "connectTimeout"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-1.5", "0", "-1", "86400", "10000000000"])
def test_timeouts_are_finite_positive_and_under_a_day(home: Path, key: str, value: str) -> None:
    """Whole numbers too: one that overflows a timer would stop a deploy midway."""
    (home / "flake/fleet.yaml").write_text(f"{key}: {value}\n")
    with pytest.raises(UsageError, match=key):
        config.load(str(home / "flake"))


@pytest.mark.parametrize(
    "value", ["-oProxyCommand=x", "a;id", "'a$(id)'", "'%d'", "Root", "'a b'", '"a\\x1b[2J"']
)
def test_a_checkouts_ssh_user_is_a_user_name(home: Path, value: str) -> None:
    """It replaces the inventory's on every ssh command line, held to the same shape."""
    (home / "flake/fleet.yaml").write_text(f"sshUser: {value}\n")
    with pytest.raises(UsageError, match="sshUser"):
        config.load(str(home / "flake"))


def test_a_user_name_passes(home: Path) -> None:
    (home / "flake/fleet.yaml").write_text("sshUser: deploy_1\nhealthTimeout: 90\n")
    cfg = config.load(str(home / "flake"))
    assert (cfg.get("sshUser"), cfg.get("healthTimeout")) == ("deploy_1", 90)


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


NO_HOSTS = Inventory({}, DeployPolicy(1, 1, 1, 0, 1.0, 1.0))
JUMP_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq6tuZ1bUQsAdDLPz2JvNTMJ2cTSVjUnQ5O0Ut1UcVQ"


def test_a_checkout_may_not_pin_the_jump_hosts_key(home: Path) -> None:
    (home / "flake/fleet.yaml").write_text(f"jumpHostKeys: {{bastion: {JUMP_KEY}}}\n")
    with pytest.raises(UsageError, match=r"jumpHostKeys.*may only be set in the operator.s own"):
        config.load(str(home / "flake"))


@pytest.mark.parametrize(
    "value",
    [
        f"'bastion {JUMP_KEY}'",  # not a mapping
        "{}",
        f"{{'-oProxyCommand=x': {JUMP_KEY}}}",
        f"{{'bastion;id': {JUMP_KEY}}}",
        "{bastion: ssh-ed25519}",
        "{bastion: 'ssh-ed25519 AAAA$(id)'}",
        f"{{bastion: '{JUMP_KEY} comment'}}",
        f'{{bastion: "{JUMP_KEY}\\n@cert-authority * {JUMP_KEY}"}}',
        f"{{bastion: [{JUMP_KEY}]}}",
        f"{{22: {JUMP_KEY}}}",
    ],
)
def test_a_pinned_jump_host_key_is_a_host_and_a_key_and_nothing_else(
    home: Path, value: str
) -> None:
    (home / "xdg/fleet/config.yaml").write_text(f"jumpHostKeys: {value}\n")
    with pytest.raises(UsageError, match="jumpHostKeys"):
        config.load_user()


def test_good_pinned_jump_host_keys_pass(home: Path) -> None:
    (home / "xdg/fleet/config.yaml").write_text(
        "jumpHost: ops@bastion.example.org:2222,[2001:db8::1]\n"
        f"jumpHostKeys:\n  bastion.example.org: {JUMP_KEY}\n  '[2001:db8::1]': {JUMP_KEY}\n"
    )
    cfg = config.load(str(home / "flake"))
    session = flows.Session(str(home / "flake"), cfg, NO_HOSTS)
    hops = session.ssh_config().jump_hosts
    assert [(h.host, h.port, h.host_key) for h in hops] == [
        ("bastion.example.org", 2222, JUMP_KEY),
        ("2001:db8::1", None, JUMP_KEY),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (f"jumpHostKeys: {{bastion: {JUMP_KEY}}}\n", "jumpHost is not"),
        (f"jumpHost: bastion\njumpHostKeys: {{bastlon: {JUMP_KEY}}}\n", "not a jump host"),
    ],
)
def test_a_pinned_key_for_no_jump_host_is_an_error(home: Path, lines: str, message: str) -> None:
    """A typo in a host name must not leave the jump host it meant unpinned."""
    (home / "xdg/fleet/config.yaml").write_text(lines)
    session = flows.Session(str(home / "flake"), config.load(str(home / "flake")), NO_HOSTS)
    with pytest.raises(UsageError, match=message):
        session.ssh_config()


def test_a_jump_host_is_verified_like_every_other_host(home: Path) -> None:
    """No option for the jump host rides on the command line, where ssh would not pass it on
    to the jump host's own ssh: it is in the run's ssh_config, given with -F."""
    (home / "xdg/fleet/config.yaml").write_text(
        f"jumpHost: ops@bastion\njumpHostKeys: {{bastion: {JUMP_KEY}}}\n"
    )
    session = flows.Session(str(home / "flake"), config.load(str(home / "flake")), NO_HOSTS)
    with session.transport() as transport:
        opts = transport.remote(Endpoint("h", "192.0.2.1")).options()
        assert transport.jump_config is not None
        text = transport.jump_config.read_text()
    assert opts[-2:] == ["-F", str(transport.jump_config)]
    block = text.split("Host bastion\n", 1)[1].split("Match all", 1)[0]
    for option in (
        "StrictHostKeyChecking yes", "BatchMode yes", "KnownHostsCommand none",
        "GlobalKnownHostsFile /dev/null", "HostKeyAlias bastion", "ProxyJump none",
    ):  # fmt: skip
        assert f"  {option}\n" in block
    assert "-l ops -W '[%h]:%p' bastion 2>" in text


def test_a_checkouts_known_hosts_never_vouch_for_the_jump_host(home: Path) -> None:
    """fleet.yaml may name a known_hosts file for the fleet's hosts, not for the jump host
    the operator chose: that one is looked up where the operator's own config says."""
    (home / "flake/fleet.yaml").write_text(f"knownHostsFile: {home}/checkout_known_hosts\n")
    (home / "xdg/fleet/config.yaml").write_text("jumpHost: bastion\n")
    session = flows.Session(str(home / "flake"), config.load(str(home / "flake")), NO_HOSTS)
    ssh_config = session.ssh_config()
    assert ssh_config.known_hosts_file == home / "checkout_known_hosts"
    assert ssh_config.jump_known_hosts_file is None
    with Transport(ssh_config) as transport:
        assert transport.jump_config is not None
        assert "checkout_known_hosts" not in transport.jump_config.read_text()
    (home / "xdg/fleet/config.yaml").write_text(f"jumpHost: bastion\nknownHostsFile: {home}/mine\n")
    session = flows.Session(str(home / "flake"), config.load(str(home / "flake")), NO_HOSTS)
    assert session.ssh_config().jump_known_hosts_file == home / "mine"


@pytest.mark.parametrize(
    "text",
    [
        "sshOptions: {ProxyCommand: 'sh -c id'}",
        "sshOptions: {StrictHostKeyChecking: 'no'}",
        "sshOptions: {KexAlgorithms: 'curve25519-sha256 -oProxyCommand=id'}",
        "sshOptions: {Ciphers: '$(id)'}",
        "sshOptions: {Compression: 1}",
        "sshOptions: curve25519-sha256",
    ],
)
def test_ssh_options_choose_the_session_crypto_and_nothing_else(home: Path, text: str) -> None:
    (home / "xdg/fleet/config.yaml").write_text(text + "\n")
    with pytest.raises(UsageError, match="sshOptions"):
        config.load_user()


def test_a_checkout_may_not_choose_the_ssh_options(home: Path) -> None:
    (home / "flake/fleet.yaml").write_text(
        "sshOptions: {KexAlgorithms: diffie-hellman-group1-sha1}\n"
    )
    with pytest.raises(UsageError, match=r"operator.s own"):
        config.load(str(home / "flake"))


def test_the_operators_ssh_options_come_first_on_every_ssh(home: Path) -> None:
    (home / "xdg/fleet/config.yaml").write_text(
        "sshOptions: {KexAlgorithms: curve25519-sha256, Ciphers: aes128-gcm@openssh.com}\n"
    )
    options = tuple(sorted(config.load_user().get("sshOptions").items()))
    with Transport(SshConfig(options=options)) as transport:
        argv = transport.remote(Endpoint("h", "192.0.2.1", host_key=None)).ssh_argv(["true"])
    assert argv[1:5] == ["-o", "Ciphers=aes128-gcm@openssh.com",
                         "-o", "KexAlgorithms=curve25519-sha256"]  # fmt: skip
