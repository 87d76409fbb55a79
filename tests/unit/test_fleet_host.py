"""fleet-host, the host's half, on its own: records, the transaction file, boot entries,
and whole transactions against stand-ins for systemd and Nix (the lab tests run it for
real)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.hostside import fleet_host as fh

HELPER = Path(fh.__file__)


def tk(name: str) -> str:
    """A token of the shape the helper accepts, named for the reader."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


# Stand-ins for the host's programs: they log their argv and do the least that makes the
# helper's bookkeeping observable. Real systemd and Nix are exercised in the lab tests.
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$FLEET_HOST_ROOT/calls"
if [ -n "$FAKE_ACTIVE" ] && [ "$1" = show ]; then
  printf 'ActiveState=active\\nActiveEnterTimestampMonotonic=1\\n'
fi
exit 0
"""
FAKE_SYSTEMD_RUN = """#!/bin/sh
echo "systemd-run $*" >> "$FLEET_HOST_ROOT/calls"
case "$*" in
  *switch-to-configuration*)
    while [ "${1%switch-to-configuration}" = "$1" ]; do shift; done
    exec "$@" ;;
esac
exit 0
"""
FAKE_NIX_ENV = """#!/bin/sh
echo "nix-env $*" >> "$FLEET_HOST_ROOT/calls"
profile=$2
case "$3" in
  --set)
    n=$(ls "$(dirname "$profile")" | sed -n 's/^system-\\([0-9]*\\)-link$/\\1/p' |
      sort -n | tail -1)
    n=$((n + 1))
    ln -sfn "$4" "$(dirname "$profile")/system-$n-link"
    ln -sfn "system-$n-link" "$profile" ;;
  --switch-generation)
    ln -sfn "system-$4-link" "$profile" ;;
  --delete-generations)
    shift 3
    for n in "$@"; do rm "$(dirname "$profile")/system-$n-link"; done ;;
esac
"""
SWITCH = """#!/bin/sh
echo "switch $0 $1" >> "$FLEET_HOST_ROOT/calls"
system=$(dirname "$(dirname "$0")")
case "$1" in
  test) ln -sfn "$system" "$FLEET_HOST_ROOT/run/current-system" ;;
  boot) ln -sfn "$system" "$FLEET_HOST_ROOT/boot/lab/default" ;;
esac
exit "${FAIL_SWITCH:-0}"
"""


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def host(tmp_path: Path) -> Path:
    """A fake host root with two systems, generation 1 running, fake programs on PATH."""
    root = tmp_path / "host"
    for name in ("sys-a", "sys-b"):
        _script(root / "store" / name / "bin/switch-to-configuration", SWITCH)
    bindir = tmp_path / "bin"
    _script(bindir / "systemctl", FAKE_SYSTEMCTL)
    _script(bindir / "systemd-run", FAKE_SYSTEMD_RUN)
    _script(bindir / "nix-env", FAKE_NIX_ENV)
    profiles = root / "nix/var/nix/profiles"
    profiles.mkdir(parents=True)
    (profiles / "system-1-link").symlink_to(root / "store/sys-a")
    (profiles / "system").symlink_to("system-1-link")
    (root / "run").mkdir()
    (root / "run/current-system").symlink_to(root / "store/sys-a")
    (root / "boot/lab").mkdir(parents=True)
    (root / "boot/lab/default").symlink_to(root / "store/sys-a")
    return root


def helper(host: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None):
    environ = dict(os.environ, FLEET_HOST_ROOT=str(host), **(env or {}))
    environ["PATH"] = f"{host.parent / 'bin'}:{environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, str(HELPER), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else None)


def begin(host: Path, token: str, target: str = "sys-b", *extra: str):
    return helper(
        host, "begin", "--token", token, "--holder", json.dumps({"release": token[:6]}),
        "--base", json.dumps({"release": token[:6], "host": "h"}), "--mode", "switch",
        "--target", str(host / "store" / target), "--deadline", "30", "--confirm", "20",
        *extra,
    )  # fmt: skip


def test_a_whole_transaction_commits_and_leaves_nothing(host: Path) -> None:
    code, out = begin(host, tk("t1"))
    assert code == 0 and out["begun"] and out["recorded"]["number"] == 1
    txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
    assert txn["state"] == "begun" and txn["recorded"]["path"].endswith("sys-a")
    assert f"fleet-watch-{tk('t1')[:16]}" in (host / "calls").read_text()
    code, out = helper(host, "activate", "--token", tk("t1"), "--health", "5", "--confirm", "5")
    assert code == 0 and out["switchExit"] == 0
    assert os.path.realpath(host / "run/current-system").endswith("sys-b")
    code, out = helper(host, "commit", "--token", tk("t1"), stdin=json.dumps({"message": None}))
    assert code == 0 and out["committed"] and out["new"]["number"] == 2
    assert not (host / "var/lib/fleet/txn.json").exists()
    assert os.path.realpath(host / "boot/lab/default").endswith("sys-b")
    [record] = [json.loads(x) for x in (host / "var/lib/fleet/releases.jsonl").open()]
    assert record["result"] == "deployed" and record["new"]["number"] == 2


def test_second_holder_is_refused_then_fenced_after_a_take_over(host: Path) -> None:
    assert begin(host, tk("first"))[0] == 0
    # The fake systemctl lists no running switch: make the first one look alive.
    code, out = helper(host, "state")
    assert out["abandoned"] is True  # no switch running: nobody will resolve it
    code, out = begin(host, tk("second"), "sys-b", "--take-over")
    assert code == 0
    # The abandoned first transaction was undone, not inherited, and the old holder is fenced.
    code, out = helper(host, "activate", "--token", tk("first"), "--health", "5", "--confirm", "5")
    assert code == fh.Exit.FENCED and "no longer" in out["error"]


def test_undo_puts_running_profile_and_boot_entry_back(host: Path) -> None:
    begin(host, tk("t2"))
    helper(host, "activate", "--token", tk("t2"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "undo", "--token", tk("t2"), stdin=json.dumps({"phase": "health"}))
    assert code == 0 and out["undone"]
    assert os.path.realpath(host / "run/current-system").endswith("sys-a")
    assert os.path.realpath(host / "nix/var/nix/profiles/system").endswith("sys-a")
    assert os.path.realpath(host / "boot/lab/default").endswith("sys-a")
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_a_failed_boot_entry_undoes_the_commit(host: Path) -> None:
    begin(host, tk("t3"))
    helper(host, "activate", "--token", tk("t3"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "commit", "--token", tk("t3"), stdin="{}", env={"FAIL_SWITCH": "1"})
    assert code == fh.Exit.FAILED and "boot entry not installed" in out["error"]
    # FAIL_SWITCH fails the undo's re-activation too; the profile is back all the same.
    assert os.path.realpath(host / "nix/var/nix/profiles/system").endswith("sys-a")
    assert not (host / "var/lib/fleet/txn.json").exists()
    # The generation the commit added was never current: it is gone, so that a later
    # rollback ("the one before the current") cannot land on it.
    assert out["deleted"] == [2]
    assert sorted(p.name for p in (host / "nix/var/nix/profiles").glob("system-*")) == [
        "system-1-link"
    ]


def test_a_crash_before_the_commit_point_is_undone_at_boot(host: Path) -> None:
    begin(host, tk("t4"))
    helper(host, "activate", "--token", tk("t4"), "--health", "5", "--confirm", "5")
    # The profile was written, then the host died before the commit point.
    subprocess.run(["nix-env", "-p", str(host / "nix/var/nix/profiles/system"), "--set",
                    str(host / "store/sys-b")], env=dict(os.environ, FLEET_HOST_ROOT=str(host),
                    PATH=f"{host.parent / 'bin'}:{os.environ['PATH']}"), check=True)  # fmt: skip
    code, out = helper(host, "boot")  # in the same boot: not its business
    assert code == 0 and out["recovered"] is None and out["live"] == tk("t4")[:16]
    (host / "run/fleet/boot-id").unlink()  # /run starts empty at every boot
    code, out = helper(host, "boot")
    assert code == 0 and out["recovered"]["action"] == "undone"
    assert os.path.realpath(host / "nix/var/nix/profiles/system").endswith("sys-a")
    assert os.path.realpath(host / "run/current-system").endswith("sys-a")
    assert out["recovered"]["deleted"] == [2]
    assert not (host / "nix/var/nix/profiles/system-2-link").exists()


def test_a_committed_transaction_is_finished_by_anyone(host: Path) -> None:
    begin(host, tk("t5"))
    txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
    txn["state"] = "committed"
    txn["record"] = {"release": "t5", "result": "deployed"}
    (host / "var/lib/fleet/txn.json").write_text(json.dumps(txn))
    code, out = helper(host, "recover")
    assert code == 0 and out["recovered"]["action"] == "finished"
    assert json.loads((host / "var/lib/fleet/releases.jsonl").read_text())["release"] == "t5"


def test_commit_after_the_deadline_undoes_instead(host: Path) -> None:
    begin(host, tk("t6"))
    helper(host, "activate", "--token", tk("t6"), "--health", "0", "--confirm", "0")
    code, out = helper(host, "commit", "--token", tk("t6"), stdin="{}")
    assert code == fh.Exit.EXPIRED and out["undone"]
    assert os.path.realpath(host / "run/current-system").endswith("sys-a")


def test_same_system_is_a_noop_without_a_lock(host: Path) -> None:
    code, out = begin(host, tk("t7"), "sys-a")
    assert code == 0 and out["noop"] is True
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_missing_target_changes_nothing(host: Path) -> None:
    code, out = begin(host, tk("t8"), "sys-gone")
    assert code == fh.Exit.FAILED and "not on the host" in out["error"]
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_records_are_whole_lines_after_a_torn_or_foreign_one(tmp_path: Path) -> None:
    paths = fh.Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    paths.records.write_text('{"release": "a"}\n{"release": "tor')  # torn: no newline
    assert fh.append_record(paths, {"release": "b"}) is None
    lines = paths.records.read_text().splitlines()
    assert [fh.parse_record(x) for x in lines] == [{"release": "a"}, None, {"release": "b"}]


@pytest.mark.parametrize("short", [True, False])
def test_a_record_that_cannot_be_written_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    """A full disk: a short write or ENOSPC; the file keeps only whole records."""
    paths = fh.Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    paths.records.write_text('{"release": "a"}\n')
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if short:
            return real_write(fd, data[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fh.os, "write", full)
    error = fh.append_record(paths, {"release": "b"})
    monkeypatch.undo()
    assert error is not None
    assert paths.records.read_text() == '{"release": "a"}\n'


def test_boot_entry_of_systemd_boot(tmp_path: Path) -> None:
    paths = fh.Paths(tmp_path)
    profiles = paths.profile.parent
    profiles.mkdir(parents=True)
    (tmp_path / "s7").mkdir()
    (profiles / "system-7-link").symlink_to(tmp_path / "s7")
    paths.loader_conf.parent.mkdir(parents=True)
    paths.loader_conf.write_text("timeout 5\ndefault nixos-generation-7.conf\n")
    assert fh.boot_entry(paths) == str(tmp_path / "s7")


def test_generation_numbers() -> None:
    assert fh.generation_number("system-42-link") == 42
    assert fh.generation_number("system-x-link") is None
    assert fh.generation_number("system-42") is None


def test_a_token_is_hex_only(host: Path) -> None:
    code, _ = helper(host, "commit", "--token", "x; rm -rf /", stdin="{}")
    assert code == fh.Exit.USAGE


# A stand-in for `nix path-info --json` and `nix store verify --sigs-needed 1`: a system is
# signed when its folder holds a file named "signed", content-addressed when "ca".
FAKE_NIX = """#!/bin/sh
echo "nix $*" >> "$FLEET_HOST_ROOT/calls"
for last; do :; done
case "$*" in
  *path-info*)
    if [ -e "$last/ca" ]; then ca='"fixed:r:sha256:0"'; else ca=null; fi
    printf '[{"path": "%s", "ca": %s}]\\n' "$last" "$ca" ;;
  *) [ -e "$last/signed" ] ;;
esac
"""


@pytest.fixture()
def deploy_user(host: Path) -> dict[str, str]:
    """fleet-host as sudo runs it for a deploy user other than root."""
    _script(host.parent / "bin/nix", FAKE_NIX)
    return {"SUDO_UID": "1500", "SUDO_USER": "deploy", "NIX_STORE_DIR": str(host / "store")}


def begin_as(host: Path, token: str, env: dict[str, str], target: str = "sys-b"):
    return helper(
        host, "begin", "--token", token, "--holder", "{}", "--mode", "switch",
        "--target", str(host / "store" / target), "--deadline", "30", "--confirm", "20",
        env=env,
    )  # fmt: skip


def test_a_deploy_user_may_switch_to_a_signed_system(host: Path, deploy_user) -> None:
    (host / "store/sys-b/signed").touch()
    code, out = begin_as(host, tk("s"), deploy_user)
    assert code == 0 and out["begun"], out
    assert "store verify --no-contents --sigs-needed 1" in (host / "calls").read_text()


def test_a_deploy_user_may_not_switch_to_an_unsigned_system(host: Path, deploy_user) -> None:
    code, out = begin_as(host, tk("u"), deploy_user)
    assert code == 1 and "signed by no key this host trusts" in out["error"]
    assert not (host / "var/lib/fleet/txn.json").exists()
    assert "switch" not in (host / "calls").read_text()


def test_a_content_addressed_path_proves_no_author(host: Path, deploy_user) -> None:
    """`nix-store --add` needs no trust, and Nix counts such a path as valid unsigned."""
    (host / "store/sys-b/signed").touch()
    (host / "store/sys-b/ca").touch()
    code, out = begin_as(host, tk("c"), deploy_user)
    assert code == 1 and "signed by no key this host trusts" in out["error"]
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_root_is_not_asked_for_signatures(host: Path) -> None:
    code, out = begin(host, tk("r"))
    assert code == 0 and out["begun"]


@pytest.mark.parametrize(
    "target",
    [
        "/tmp/evil",  # outside the store
        "{store}/sys-b/../sys-b",  # not a store path as written
        "{store}/sys-b/bin",  # inside a store path
        "{store}/link",  # a symlink in the store to elsewhere
    ],
)
def test_a_deploy_user_names_store_paths_only(host: Path, deploy_user, target: str) -> None:
    (host / "store/link").symlink_to("/tmp")
    _script(Path(host / "evil-root/bin/switch-to-configuration"), SWITCH)
    target = target.format(store=host / "store")
    code, out = helper(
        host, "begin", "--token", tk("p"), "--holder", "{}", "--mode", "switch",
        "--target", target, "--deadline", "30", "--confirm", "20", env=deploy_user,
    )  # fmt: skip
    assert code in (1, 2) and not out["ok"], out
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_a_deploy_user_may_go_back_to_any_generation(host: Path, deploy_user) -> None:
    """Generations were made by root (an unsigned system installed locally included)."""
    profiles = host / "nix/var/nix/profiles"
    (profiles / "system-2-link").symlink_to(host / "store/sys-b")
    code, out = helper(
        host, "begin", "--token", tk("g"), "--holder", "{}", "--mode", "switch",
        "--target", str(host / "store/sys-b"), "--generation", "2",
        "--deadline", "30", "--confirm", "20", env=deploy_user,
    )  # fmt: skip
    assert code == 0 and out["begun"], out


@pytest.mark.parametrize("command", ["watch", "boot"])
def test_what_only_the_host_runs_is_refused_to_a_deploy_user(
    host: Path, deploy_user, command: str
) -> None:
    args = ["--token", tk("w")] if command == "watch" else []
    code, out = helper(host, command, *args, env=deploy_user)
    assert code == 2 and "run by the host only" in out["error"]


# -- secrets --------------------------------------------------------------------------


def with_manifest(host: Path, system: str, secrets: list[dict[str, str]]) -> None:
    (host / "store" / system / "etc/fleet").mkdir(parents=True, exist_ok=True)
    (host / "store" / system / "etc/fleet/manifest.json").write_text(
        json.dumps({"services": {"web": {"unit": "web.service"}}, "secrets": secrets})
    )


def given(*items: tuple[str, str, bytes]) -> str:
    import base64

    return json.dumps(
        [{"service": s, "name": n, "data": base64.b64encode(d).decode()} for s, n, d in items]
    )


def begin_with(host: Path, token: str, secrets: str, target: str = "sys-b", **env: str):
    return helper(
        host, "begin", "--token", token, "--holder", "{}", "--mode", "switch",
        "--target", str(host / "store" / target), "--deadline", "30", "--confirm", "20",
        "--secrets", stdin=secrets, env=env,
    )  # fmt: skip


def test_secrets_are_delivered_root_only_and_restart_what_loads_them(host: Path) -> None:
    with_manifest(host, "sys-b", [])
    code, out = begin_with(host, tk("s1"), given(("web", "token", b"\x00one")), FAKE_ACTIVE="1")
    assert code == 0 and out["begun"], out
    path = host / "var/lib/fleet/secrets/web/token"
    assert path.read_bytes() == b"\x00one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
    assert txn["restart"] == ["web.service"]
    code, out = helper(
        host, "activate", "--token", tk("s1"), "--health", "5", "--confirm", "5",
        env={"FAKE_ACTIVE": "1"},
    )  # fmt: skip
    assert code == 0 and out["restarted"] == ["web.service"], out
    assert "systemctl try-restart web.service" in (host / "calls").read_text()


def test_an_unchanged_secret_restarts_nothing(host: Path) -> None:
    with_manifest(host, "sys-a", [])
    secret = given(("web", "token", b"same"))
    # The running system already: a no-op that still delivers.
    code, out = begin_with(host, tk("n1"), secret, target="sys-a", FAKE_ACTIVE="1")
    assert code == 0 and out["noop"] and out["restarted"] == ["web.service"]
    code, out = begin_with(host, tk("n2"), secret, target="sys-a", FAKE_ACTIVE="1")
    assert code == 0 and out["noop"] and out["restarted"] == []


@pytest.mark.parametrize(
    "bad",
    [
        [{"service": "../etc", "name": "x", "data": ""}],
        [{"service": "web", "name": "a/b", "data": ""}],
        [{"service": "web", "name": ".hidden", "data": ""}],
        [{"service": "web", "name": "x", "data": "not base64!"}],
        [{"service": "web", "name": "x"}],
        {"service": "web"},
        ["web"],
    ],
)
def test_bad_secrets_change_nothing(host: Path, bad) -> None:
    code, out = begin_with(host, tk("b"), json.dumps(bad))
    assert code == 2 and not out["ok"], out
    assert not (host / "var/lib/fleet/txn.json").exists()
    assert not (host / "var/lib/fleet/secrets").exists()


def test_secrets_declared_no_more_are_removed_at_the_commit(host: Path) -> None:
    with_manifest(host, "sys-b", [])
    begin_with(host, tk("p0"), given(("web", "old", b"1")), target="sys-a")
    old = host / "var/lib/fleet/secrets/web/old"
    assert old.exists()
    code, out = helper(host, "state")
    assert out["heldSecrets"] == ["web/old"]
    code, out = begin_with(host, tk("p1"), given(("web", "new", b"2")))
    assert code == 0 and out["begun"]
    assert old.exists()  # the running system may still load it
    helper(host, "activate", "--token", tk("p1"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "commit", "--token", tk("p1"), stdin="{}")
    assert code == 0 and out["committed"], out
    assert not old.exists() and (host / "var/lib/fleet/secrets/web/new").exists()


def test_state_names_the_running_systems_missing_secrets(host: Path, tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_text("x")
    with_manifest(
        host,
        "sys-a",
        [
            {"service": "web", "name": "here", "path": str(present)},
            {"service": "web", "name": "gone", "path": str(tmp_path / "gone")},
        ],
    )
    code, out = helper(host, "state")
    assert code == 0
    assert out["missingSecrets"] == [
        {"service": "web", "name": "gone", "path": str(tmp_path / "gone")}
    ]


# -- traffic: the agent, drains, the balancer's statistics ------------------------------


def agent(host: Path, request: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(HELPER), "agent"],
        input=request, capture_output=True, text=True, timeout=30,
        env=dict(os.environ, FLEET_HOST_ROOT=str(host)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_transaction_drains_its_services_until_it_ends(host: Path) -> None:
    assert agent(host, "web\n") == "ready 100%\n"
    code, _ = begin(host, tk("d1"), "sys-b", "--drain", "web")
    assert code == 0
    assert agent(host, "web\n") == "drain\n"
    assert agent(host, "other\n") == "ready 100%\n"
    helper(host, "activate", "--token", tk("d1"), "--health", "5", "--confirm", "5")
    assert helper(host, "state")[1]["traffic"] == {"web": "drain"}
    helper(host, "commit", "--token", tk("d1"), stdin="{}")
    assert agent(host, "web\n") == "ready 100%\n"
    assert helper(host, "state")[1]["traffic"] == {}


@pytest.mark.parametrize("how", ["undo", "expiry"])
def test_an_undone_transaction_puts_its_services_back_in_rotation(host: Path, how: str) -> None:
    """The tool's undo and the dead-man switch's both: no drain outlives its transaction."""
    begin(host, tk("d2"), "sys-b", "--drain", "web", "--drain", "api")
    assert agent(host, "api\n") == "drain\n"
    if how == "undo":
        helper(host, "undo", "--token", tk("d2"), "--settle", "0", stdin="{}")
    else:
        txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
        txn["deadline"] = 0
        (host / "var/lib/fleet/txn.json").write_text(json.dumps(txn))
        code, out = helper(host, "watch", "--token", tk("d2"))
        assert code == 0, out
    assert agent(host, "api\n") == agent(host, "web\n") == "ready 100%\n"
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_a_boot_transaction_drains_nothing(host: Path) -> None:
    helper(
        host, "begin", "--token", tk("d3"), "--holder", "{}", "--mode", "boot",
        "--target", str(host / "store/sys-b"), "--deadline", "30", "--confirm", "20",
        "--drain", "web",
    )  # fmt: skip
    assert agent(host, "web\n") == "ready 100%\n"


@pytest.mark.parametrize(
    "request_", ["", "\n", "../etc/passwd\n", "web" * 100 + "\n", "\x00\n", "web extra\n"]
)
def test_the_agent_answers_anything_it_cannot_read_with_ready(host: Path, request_: str) -> None:
    (host / "run/fleet/traffic").mkdir(parents=True)
    (host / "run/fleet/traffic/web").write_text("drain\n")
    assert agent(host, request_) == "ready 100%\n"


def test_the_agent_never_repeats_what_it_does_not_understand(host: Path) -> None:
    (host / "run/fleet/traffic").mkdir(parents=True)
    (host / "run/fleet/traffic/web").write_text("down\nmaint\n")
    assert agent(host, "web\n") == "ready 100%\n"
    (host / "run/fleet/traffic/web").write_text("ready 33%\n")
    assert agent(host, "web\n") == "ready 33%\n"


def test_maintenance_drains_every_service_until_undone(host: Path) -> None:
    code, out = helper(host, "maintenance", "on", "--holder", json.dumps({"reason": "disk"}))
    assert code == 0 and out["maintenance"]["reason"] == "disk"
    assert agent(host, "web\n") == agent(host, "api\n") == "drain\n"
    assert helper(host, "state")[1]["maintenance"]["reason"] == "disk"
    code, out = helper(host, "maintenance", "off")
    assert code == 0 and out["maintenance"] is None
    assert agent(host, "web\n") == "ready 100%\n"
    # Recorded beside the deploys, but no change of system: the last record stays a deploy's.
    records = [json.loads(x) for x in (host / "var/lib/fleet/releases.jsonl").open()]
    assert [(r["action"], r["result"]) for r in records] == [
        ("drain", "drained"), ("undrain", "undrained")]  # fmt: skip
    assert records[0]["reason"] == "disk"
    assert helper(host, "state")[1]["lastRecord"] is None


STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
    "wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,"
    "lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,"
    "hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,"
    "cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,"
    "ctime,rtime,ttime,agent_status\n"
    "web,FRONTEND,,,3,5,,,,,,,,,,,,OPEN,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,\n"
    "web,lab1,0,0,2,4,,9,,,,,,0,0,0,0,UP,100,1,0,0,0,12,0,,1,3,1,,9,,2,0,,3,L7OK,200,1,,,,,,,,,,"
    ",,,,,,,,,,,,,,L7OK\n"
    "web,lab2,0,0,0,4,,9,,,,,,0,0,0,0,DRAIN,0,1,0,0,0,3,0,,1,3,2,,9,,2,0,,3,L7OK,200,1,,,,,,,,,,"
    ",,,,,,,,,,,,,,L7OK\n"
    "web,BACKEND,0,0,2,4,,9,,,,,,0,0,0,0,UP,100,1,0,,0,12,0,,1,3,0,,9,,1,0,,3,,,,,,,,,,,,,,,,,,,,"
    ",,,,,\n"
)


def test_traffic_stat_reads_the_runtime_api(host: Path, tmp_path: Path) -> None:
    import socket
    import threading

    path = host / "run/haproxy/admin.sock"
    path.parent.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            assert conn.recv(64) == b"show stat\n"
            conn.sendall(STAT.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    code, out = helper(host, "traffic-stat")
    thread.join(5)
    server.close()
    assert code == 0, out
    assert out["servers"] == [
        {"backend": "web", "server": "lab1", "status": "UP", "weight": 100, "sessions": 2,
         "check": "L7OK", "agent": "L7OK", "lastChange": 12},
        {"backend": "web", "server": "lab2", "status": "DRAIN", "weight": 0, "sessions": 0,
         "check": "L7OK", "agent": "L7OK", "lastChange": 3},
    ]  # fmt: skip


def test_traffic_stat_of_a_balancer_that_is_not_there_fails_in_one_line(host: Path) -> None:
    code, out = helper(host, "traffic-stat")
    assert code == fh.Exit.FAILED and "/run/haproxy/admin.sock" in out["error"]


def test_a_canary_gets_its_weight_then_is_drained_again_and_undone(host: Path) -> None:
    begin(host, tk("w1"), "sys-b", "--drain", "web")
    code, out = helper(host, "weight", "--token", tk("w1"), "--weights", '{"web": 33}',
                       "--hold", "10")  # fmt: skip
    assert code == fh.Exit.FAILED and "state begun" in out["error"]  # not activated yet
    helper(host, "activate", "--token", tk("w1"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "weight", "--token", tk("w1"), "--weights", '{"web": 33}',
                       "--hold", "600")  # fmt: skip
    assert code == 0 and agent(host, "web\n") == "ready 33%\n"
    txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
    assert txn["deadline"] >= out["deadline"] > txn["deadline"] - 1  # the hold is the host's
    helper(host, "weight", "--token", tk("w1"), "--weights", '{"web": "drain"}', "--hold", "5")
    assert agent(host, "web\n") == "drain\n"
    helper(host, "undo", "--token", tk("w1"), "--settle", "0", stdin="{}")
    assert agent(host, "web\n") == "ready 100%\n"


@pytest.mark.parametrize(
    "weights",
    ['{"api": 50}', '{"web": 0}', '{"web": 101}', '{"web": "up"}', '{"web": 5.5}', "[1]"],
)
def test_a_weight_the_transaction_cannot_give_is_refused(host: Path, weights: str) -> None:
    begin(host, tk("w2"), "sys-b", "--drain", "web")
    helper(host, "activate", "--token", tk("w2"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "weight", "--token", tk("w2"), "--weights", weights, "--hold", "5")
    assert code == fh.Exit.USAGE, out
    assert agent(host, "web\n") == "drain\n"


@pytest.mark.parametrize(
    "path", ["/run/systemd/private", "admin.sock", "/run/haproxy/../systemd/private.sock",
             "/run/haproxy/admin.sock/x", "/var/run/haproxy/admin.sock"],
)  # fmt: skip
def test_traffic_stat_connects_to_haproxys_sockets_only(host: Path, path: str) -> None:
    code, out = helper(host, "traffic-stat", "--socket", path)
    assert code == fh.Exit.USAGE and "/run/haproxy/" in out["error"], out


def test_recover_puts_back_what_no_transaction_holds(host: Path) -> None:
    (host / "run/fleet/traffic").mkdir(parents=True)
    (host / "run/fleet/traffic/web").write_text("drain\n")
    code, out = helper(host, "recover")
    assert code == 0 and out["recovered"] is None and out["undrained"] == ["web"]
    assert agent(host, "web\n") == "ready 100%\n"
