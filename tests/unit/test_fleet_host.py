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
