"""fleet-host, the host's half, on its own: records, the transaction file, boot entries,
and whole transactions against stand-ins for systemd and Nix (the lab tests run it for
real)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
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
case "$*" in  # FAKE_WATCHING: the dead-man switches that run
  list-units*fleet-watch-*)
    for u in $FAKE_WATCHING; do echo "$u.service loaded active running x"; done ;;
esac
exit 0
"""
FAKE_SYSTEMD_RUN = """#!/bin/sh
echo "systemd-run $*" >> "$FLEET_HOST_ROOT/calls"
case "$*" in
  *--unit=fleet-watch-*)
    if [ -n "$FAIL_WATCHER" ]; then echo "Failed to start transient service" >&2; exit 1; fi ;;
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


def helper(
    host: Path,
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
    program: Path | None = None,
):
    """fleet-host on ``host``: the source run as a script, or ``program`` (a launcher)."""
    environ = dict(os.environ, FLEET_HOST_ROOT=str(host), **(env or {}))
    environ["PATH"] = f"{host.parent / 'bin'}:{environ['PATH']}"
    command = [str(program)] if program else [sys.executable, str(HELPER)]
    proc = subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else None)


def begin_args(host: Path, token: str, target: str = "sys-b", *extra: str) -> list[str]:
    return [
        "begin", "--token", token, "--holder", json.dumps({"release": token[:6]}),
        "--base", json.dumps({"release": token[:6], "host": "h"}), "--mode", "switch",
        "--target", str(host / "store" / target), "--deadline", "30", "--confirm", "20",
        *extra,
    ]  # fmt: skip


def begin(host: Path, token: str, target: str = "sys-b", *extra: str):
    return helper(host, *begin_args(host, token, target, *extra))


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


def test_run_is_never_a_root_shell_through_sudo(host: Path, deploy_user, tmp_path: Path) -> None:
    """`fleet exec` runs `fleet-host run` as the ssh user; through the deploy user's sudo
    rule it would run any command as root."""
    ran = tmp_path / "ran"
    code, _ = helper(host, "run", "--", "touch", str(ran), env=deploy_user)
    assert code == fh.Exit.USAGE and not ran.exists()
    # Not through sudo: the command runs, until it ends (the session stays open meanwhile).
    environ = {k: v for k, v in os.environ.items() if k != "SUDO_UID"}
    proc = subprocess.Popen([sys.executable, str(HELPER), "run", "--", "touch", str(ran)],
                            stdin=subprocess.PIPE, env=environ)  # fmt: skip
    try:
        assert proc.wait(timeout=30) == 0 and ran.exists()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()


SUBCOMMANDS = next(
    a for a in fh.parser()._actions if isinstance(a, argparse._SubParsersAction)
).choices
# Every option that takes seconds, as the parser would take it.
SECONDS_OPTIONS = [
    ("probe-tcp", "--port", "1", "--timeout"),
    ("settle", "--seconds"),
    ("health", "--seconds"),
    (*begin_args(Path("/h"), tk("x"))[:-4], "--confirm", "1", "--deadline"),
    (*begin_args(Path("/h"), tk("x"))[:-2], "--confirm"),
    (*begin_args(Path("/h"), tk("x")), "--health"),
    (*begin_args(Path("/h"), tk("x")), "--confirm-timeout"),
    ("activate", "--token", tk("x"), "--confirm", "1", "--health"),
    ("activate", "--token", tk("x"), "--health", "1", "--confirm"),
    ("undo", "--token", tk("x"), "--settle"),
    ("reboot", "--token", tk("x"), "--boot-timeout"),
    ("gc", "--token", tk("x"), "--holder", "{}", "--deadline"),
    ("weight", "--token", tk("x"), "--weights", "{}", "--hold"),
    ("agent", "--timeout"),
    ("traffic-stat", "--timeout"),
    ("prom-query", "--port", "1", "--query", "up", "--timeout"),
    ("prom-alerts", "--port", "1", "--timeout"),
]


def test_every_number_a_caller_gives_is_checked() -> None:
    """No option is a bare float or int (NaN, infinities, any size): each has a type that
    bounds it, save the generation numbers that only pick among the profile's."""
    unchecked = {
        (name, action.dest)
        for name, sub in SUBCOMMANDS.items()
        for action in sub._actions
        if action.type in (float, int)
    }
    assert unchecked == {("begin", "generation"), ("gc", "delete")}
    taking_seconds = {
        (name, action.dest)
        for name, sub in SUBCOMMANDS.items()
        for action in sub._actions
        if action.type is fh.seconds_arg
    }
    assert taking_seconds == {(a[0], dest(a[-1])) for a in SECONDS_OPTIONS}


def dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


@pytest.mark.parametrize("argv", SECONDS_OPTIONS, ids=lambda a: f"{a[0]}{a[-1]}")
def test_a_time_is_finite_and_bounded(argv: tuple[str, ...]) -> None:
    """An infinite or enormous deadline is a dead-man switch that never fires and a lock
    held forever; NaN compares false with every time; a negative one has passed."""
    parse = fh.parser().parse_args
    for good in ("0", "2.5", "604800"):
        assert getattr(parse([*argv, good]), dest(argv[-1])) == float(good)
    for bad in ("nan", "inf", "-inf", "-1", "604801", "1e400", "x", ""):
        with pytest.raises(SystemExit) as exit_:
            parse([*argv, bad])
        assert exit_.value.code == fh.Exit.USAGE, bad


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999999999999999999", "x"])
def test_probe_tcp_takes_a_port(port: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        fh.parser().parse_args(["probe-tcp", f"--port={port}"])
    assert exit_.value.code == fh.Exit.USAGE


DEEP = "[" * 40 + "]" * 40  # deeper than any record the tool writes
ABYSS = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit
# Each way a caller hands JSON in: the option that carries it (or stdin), and a step.
BEGIN = ["begin", "--token", tk("j"), "--holder", "{}", "--base", "{}", "--mode", "switch",
         "--target", "/h/store/sys-b", "--deadline", "30", "--confirm", "20"]  # fmt: skip
JSON_INPUTS = [
    ("--holder", BEGIN),
    ("--base", BEGIN),
    ("stdin", [*BEGIN, "--secrets"]),
    ("--holder", ["gc", "--token", tk("j"), "--holder", "{}"]),
    ("--weights", ["weight", "--token", tk("j"), "--weights", "{}", "--hold", "5"]),
    ("--holder", ["maintenance", "on", "--holder", "{}"]),
    ("stdin", ["commit", "--token", tk("j")]),
    ("stdin", ["undo", "--token", tk("j")]),
    ("stdin", ["record"]),
]


def answer(
    paths: fh.Paths, argv: list[str], stdin: bytes, monkeypatch, capsys
) -> tuple[int, dict[str, object]]:
    """One step in this process (for what fails before it runs a program)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = fh.run_command(paths, fh.parser().parse_args(argv))
    return code, json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize(("where", "argv"), JSON_INPUTS, ids=[f"{a[0]}{w}" for w, a in JSON_INPUTS])
@pytest.mark.parametrize(
    "payload",
    ["[1]", '"x"', DEEP, ABYSS, "{", "\udcff"],
    ids=["list", "string", "deep", "abyss", "torn", "not-utf8"],
)
def test_json_a_caller_hands_in_is_bounded_and_changes_nothing(
    host: Path, where: str, argv: list[str], payload: str, monkeypatch, capsys
) -> None:
    """Whatever the argument or stdin holds (not an object, nested past what any reader
    can parse again, not JSON, not UTF-8), the step is refused before it changes anything:
    kept, it would crash the dead-man switch, the agent or every later step."""
    if "--secrets" in argv and payload == "[1]":
        payload = "{}"  # the secrets are a list
    stdin = payload.encode(errors="surrogateescape") if where == "stdin" else b""
    if where != "stdin":
        argv = [*argv]
        argv[argv.index(where) + 1] = payload
    code, out = answer(fh.Paths(host), argv, stdin, monkeypatch, capsys)
    assert code == fh.Exit.USAGE and out["ok"] is False, out
    assert not (host / "var/lib/fleet").exists()


@pytest.mark.parametrize("command", ["commit", "undo", "record"])
def test_a_record_larger_than_a_mebibyte_is_refused(
    host: Path, command: str, monkeypatch, capsys
) -> None:
    argv = [command, *(["--token", tk("big")] if command != "record" else [])]
    record = json.dumps({"message": "x" * fh.INPUT_MAX}).encode()
    code, out = answer(fh.Paths(host), argv, record, monkeypatch, capsys)
    assert code == fh.Exit.USAGE and "MiB" in str(out["error"])
    assert not (host / "var/lib/fleet").exists()


def test_stdin_is_read_no_further_than_its_bound(monkeypatch) -> None:
    import io

    raw = io.BytesIO(b"y" * 100)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
    with pytest.raises(fh.Failure) as failure:
        fh.read_input("secrets", limit=10)
    assert failure.value.code == fh.Exit.USAGE and raw.tell() <= 11 + 8192


DEPLOYED = '{"release": "%s", "action": "deploy", "result": "deployed", "time": "%s"'


@pytest.mark.parametrize(
    ("line", "last", "present", "absent"),
    [  # a record parsed but nested too deep to keep, and one past the recursion limit
        ('{"release": "d", "x": ' + "[" * 100 + "]" * 100 + "}", "r1", 'release="r1"',
         'release="d"'),
        ('{"release": "d", "x": ' + ABYSS + "}", "r1", 'release="r1"', 'release="d"'),
        ((DEPLOYED % ("n", "2027-01-15T07:00:00Z"))
         + ', "timings": {"huge": 1' + "0" * 400 + ', "ok": 2}}', "n",
         'fleet_phase_duration_seconds{phase="ok"} 2', 'phase="huge"'),
        (DEPLOYED % ("t", "9999-12-31T23:59:59-23:59") + "}", "t", 'release="t"',
         "fleet_release_timestamp_seconds"),
    ],
    ids=["deep", "abyss", "huge-number", "time-out-of-range"],
)  # fmt: skip
def test_no_record_breaks_the_steps_or_the_metrics_that_read_them(
    host: Path, line: str, last: str, present: str, absent: str
) -> None:
    """A deploy user may append records: none may break `state` (every deploy reads it),
    `records`, or the metrics every step and the timer write."""
    path = host / "var/lib/fleet/releases.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(record_line(1) + line + "\n")
    paths = fh.Paths(host)
    text = fh.metrics_text(paths, AT)
    assert present in text and absent not in text
    found = fh.cmd_records(paths, argparse.Namespace())
    assert found["unreadable"] == (last == "r1")
    code, out = helper(host, "state")
    assert code == 0 and out["lastRecord"]["release"] == last, out


def test_a_maintenance_record_too_deep_to_read_still_drains(host: Path) -> None:
    paths = fh.Paths(host)
    paths.maintenance.parent.mkdir(parents=True)
    paths.maintenance.write_text('{"reason": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert fh.agent_answer(paths, "web") == "drain"


@pytest.mark.parametrize("command", ["begin", "gc"])
@pytest.mark.parametrize("token", [tk("held"), tk("held")[:16] + "0" * 16])
def test_a_token_that_names_the_held_transaction_takes_nothing_over(
    host: Path, command: str, token: str
) -> None:
    """Its dead-man switch and roots are named by the token: a new transaction under it
    would stop the held one's switch, then fail to start its own, and drop the lock with
    nothing left to undo what the held one changed."""
    assert begin(host, tk("held"))[0] == 0
    txn = host / "var/lib/fleet/txn.json"
    if command == "gc":
        txn.write_text(json.dumps(json.loads(txn.read_text()) | {"mode": "gc"}))
    before = txn.read_text()
    (host / "calls").unlink()
    args = (begin_args(host, token) if command == "begin"
            else ["gc", "--token", token, "--holder", "{}"])  # fmt: skip
    code, out = helper(host, *args, "--take-over",
                       env={"FAKE_WATCHING": f"fleet-watch-{tk('held')[:16]}"})  # fmt: skip
    assert code == fh.Exit.HELD and "new one" in out["error"], out
    assert txn.read_text() == before
    calls = host / "calls"
    assert not calls.exists() or "stop" not in calls.read_text()


def test_a_transaction_taken_over_leaves_no_root_behind(host: Path) -> None:
    assert begin(host, tk("old"))[0] == 0
    code, out = helper(host, *begin_args(host, tk("new")), "--take-over",
                       env={"FAKE_WATCHING": f"fleet-watch-{tk('old')[:16]}"})  # fmt: skip
    assert code == 0 and out["begun"], out
    roots = sorted(p.name for p in (host / "nix/var/nix/gcroots/fleet").iterdir())
    assert roots == [f"recorded-{tk('new')[:16]}", f"target-{tk('new')[:16]}"]
    assert json.loads((host / "var/lib/fleet/txn.json").read_text())["taken_over"] == [tk("old")]


@pytest.mark.parametrize("take_over", [False, True])
def test_a_switch_that_cannot_be_armed_leaves_the_host_as_it_was(
    host: Path, take_over: bool
) -> None:
    """No begin without its dead-man switch; and a transaction being taken over stays
    held, drained and rooted as it was, its own switch still armed."""
    txn = host / "var/lib/fleet/txn.json"
    traffic = host / "run/fleet/traffic"
    roots = host / "nix/var/nix/gcroots/fleet"
    if take_over:
        assert begin(host, tk("old"), "sys-b", "--drain", "web")[0] == 0
    before = (txn.read_text() if txn.exists() else None,
              sorted(p.name for p in traffic.iterdir()) if traffic.exists() else [],
              sorted(p.name for p in roots.iterdir()) if roots.exists() else [])  # fmt: skip
    (host / "calls").unlink(missing_ok=True)
    watching = f"fleet-watch-{tk('old')[:16]}"
    code, out = helper(
        host, *begin_args(host, tk("new")), "--drain", "web", "--drain", "api",
        *(["--take-over"] if take_over else []),
        env={"FAIL_WATCHER": "1", "FAKE_WATCHING": watching if take_over else ""},
    )  # fmt: skip
    assert code == fh.Exit.FAILED and "dead-man switch" in out["error"], out
    after = (txn.read_text() if txn.exists() else None,
             sorted(p.name for p in traffic.iterdir()) if traffic.exists() else [],
             sorted(p.name for p in roots.iterdir()) if roots.exists() else [])  # fmt: skip
    assert after == before
    assert f"stop --no-block {watching}" not in (host / "calls").read_text()


def test_the_path_not_the_number_names_the_system(host: Path) -> None:
    """The signature or the generation check is made on the path: a generation number
    that names another system must not put that one in the profile."""
    code, _ = begin(host, tk("num"), "sys-b", "--generation", "1")  # generation 1 is sys-a
    assert code == 0
    helper(host, "activate", "--token", tk("num"), "--health", "5", "--confirm", "5")
    code, out = helper(host, "commit", "--token", tk("num"), stdin="{}")
    assert code == 0 and out["new"]["number"] == 2, out
    assert os.path.realpath(host / "nix/var/nix/profiles/system").endswith("sys-b")
    assert "--switch-generation" not in (host / "calls").read_text()


def test_a_release_id_reaches_the_switch_unit_as_one_printable_line(host: Path) -> None:
    holder = json.dumps({"release": "r\n-p ExecStart=/bin/sh\udcff"})
    args = begin_args(host, tk("desc"))
    args[args.index("--holder") + 1] = holder
    code, out = helper(host, *args)
    assert code == 0 and out["begun"], out
    assert "release r?-p ExecStart=/bin/sh? " in (host / "calls").read_text()


@pytest.mark.parametrize("writer", ["write_whole", "append_record", "host_lock"])
def test_the_host_writes_through_no_symlink(tmp_path: Path, writer: str) -> None:
    """Its folders are root's; should one ever be writable by another user, a link planted
    where the host writes must not make root write elsewhere."""
    paths = fh.Paths(tmp_path / "host")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    if writer == "write_whole":
        paths.state_dir.mkdir(parents=True)
        (paths.state_dir / f".txn.json.{os.getpid()}").symlink_to(elsewhere)
        fh.write_whole(paths.txn, "{}\n")
        assert paths.txn.read_text() == "{}\n"
    elif writer == "append_record":
        paths.state_dir.mkdir(parents=True)
        paths.records.symlink_to(elsewhere)
        assert fh.append_record(paths, {"release": "r"}) is not None
    else:
        paths.run_dir.mkdir(parents=True)
        paths.flock.symlink_to(elsewhere)
        with pytest.raises(OSError), fh.host_lock(paths, wait=0):
            pass
    assert elsewhere.read_text() == "untouched"


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


@pytest.mark.parametrize("when", ["before-reading", "before-answering"])
def test_a_balancer_that_resets_the_connection_fails_no_unit(host: Path, when: str) -> None:
    """HAProxy restarting mid-check resets the agent's connection: the per-connection unit
    must still end cleanly, or the failed unit fails the host's next health check."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "agent", "--timeout", "5"], stdin=ours, stdout=ours,
        stderr=subprocess.PIPE, env=dict(os.environ, FLEET_HOST_ROOT=str(host)),
    )  # fmt: skip
    ours.close()
    if when == "before-answering":
        theirs.sendall(b"web\n")
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    theirs.close()  # a reset, not an orderly close
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


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
    [
        '{"api": 50}',
        '{"web": 0}',
        '{"web": 101}',
        '{"web": "up"}',
        '{"web": 5.5}',
        "[1]",
        '{"web": true}',
    ],
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


# -- metrics: node exporter's textfile, from the host's own state ------------------------

AT = 1_800_000_000.0  # 2027-01-15T08:00:00Z
HELP_AND_TYPE = {
    "fleet_generation_running": "gauge",
    "fleet_generation_current": "gauge",
    "fleet_generation_drift": "gauge",
    "fleet_release_info": "gauge",
    "fleet_release_timestamp_seconds": "gauge",
    "fleet_last_success_timestamp_seconds": "gauge",
    "fleet_rollbacks_total": "counter",
    "fleet_last_rollback_timestamp_seconds": "gauge",
    "fleet_phase_duration_seconds": "gauge",
    "fleet_lock_held": "gauge",
    "fleet_lock_held_seconds": "gauge",
    "fleet_transaction_open": "gauge",
    "fleet_maintenance": "gauge",
    "fleet_metrics_timestamp_seconds": "gauge",
}


def samples(host: Path, at: float = AT) -> list[str]:
    """The textfile's samples; every family present has its HELP and TYPE lines first."""
    text = fh.metrics_text(fh.Paths(host), at)
    assert text.endswith("\n")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert f"# TYPE {name} {HELP_AND_TYPE[name]}" in lines[:i], name
            assert any(x.startswith(f"# HELP {name} ") for x in lines[:i]), name
    return [line for line in lines if not line.startswith("#")]


def records(host: Path, *items: dict[str, object]) -> None:
    path = host / "var/lib/fleet/releases.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")


def on_generation_2(host: Path, running: str = "sys-b") -> None:
    """Generation 2 (sys-b) is the profile's current one; the host runs ``running``."""
    profiles = host / "nix/var/nix/profiles"
    (profiles / "system-2-link").symlink_to(host / "store/sys-b")
    (profiles / "system").unlink()
    (profiles / "system").symlink_to("system-2-link")
    (host / "run/current-system").unlink()
    (host / "run/current-system").symlink_to(host / "store" / running)


FREE = [
    "fleet_lock_held 0",
    "fleet_lock_held_seconds 0",
    "fleet_transaction_open 0",
    "fleet_maintenance 0",
    "fleet_metrics_timestamp_seconds 1800000000",
]


def test_metrics_of_a_fresh_host(host: Path) -> None:
    text = fh.metrics_text(fh.Paths(host), AT + 0.25)
    assert text == "".join(
        f"# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        for name, kind, value, help in [
            ("fleet_generation_running", "gauge", "1", "Generation of the system profile the "
             "host runs; no sample when it runs a system in no generation."),
            ("fleet_generation_current", "gauge", "1", "The system profile's current "
             "generation: the one the host should run and boots."),
            ("fleet_generation_drift", "gauge", "0", "1 when the running system is not the "
             "profile's current generation (a change under way, a --boot deploy awaiting its "
             "reboot, or a change by hand), else 0."),
            ("fleet_rollbacks_total", "counter", "0", "Release records that rolled back: "
             "action rollback (fleet rollback) or result rolled-back (an undone change)."),
            ("fleet_lock_held", "gauge", "0", "1 while a transaction (gc included) holds the "
             "host's deploy lock, else 0."),
            ("fleet_lock_held_seconds", "gauge", "0", "How long the deploy lock has been "
             "held; 0 when it is free."),
            ("fleet_transaction_open", "gauge", "0", "1 while a change of system is under way "
             "and not committed (the host may still undo it by itself), else 0."),
            ("fleet_maintenance", "gauge", "0", "1 while the whole host is drained for "
             "maintenance (fleet drain), else 0."),
            ("fleet_metrics_timestamp_seconds", "gauge", "1800000000.25", "When fleet-host "
             "wrote these metrics."),
        ]
    )  # fmt: skip


def test_metrics_after_a_deploy(host: Path) -> None:
    on_generation_2(host)
    timings = {"activate": 0.5, "connect": 0.1, "copy": 2, "health": 1.25}
    records(host, {"release": "r1", "action": "deploy", "result": "deployed",
                   "time": "2027-01-15T07:00:00+00:00", "timings": timings})  # fmt: skip
    assert samples(host) == [
        "fleet_generation_running 2",
        "fleet_generation_current 2",
        "fleet_generation_drift 0",
        'fleet_release_info{release="r1",action="deploy",result="deployed"} 1',
        "fleet_release_timestamp_seconds 1799996400",
        "fleet_last_success_timestamp_seconds 1799996400",
        "fleet_rollbacks_total 0",
        'fleet_phase_duration_seconds{phase="activate"} 0.5',
        'fleet_phase_duration_seconds{phase="connect"} 0.1',
        'fleet_phase_duration_seconds{phase="copy"} 2',
        'fleet_phase_duration_seconds{phase="health"} 1.25',
        *FREE,
    ]


def test_metrics_after_rollbacks(host: Path) -> None:
    """An undone change and a `fleet rollback` both count; a drain is no release."""
    records(
        host,
        {"release": "r1", "action": "deploy", "result": "deployed",
         "time": "2027-01-15T06:00:00+00:00"},
        {"release": "r2", "action": "deploy", "result": "rolled-back", "phase": "health",
         "time": "2027-01-15T07:00:00+00:00", "timings": {"health": 5.1, "rollback": 0.6}},
        {"release": "r3", "action": "rollback", "result": "deployed",
         "time": "2027-01-15T07:30:00+00:00"},
        {"release": "r4", "action": "drain", "result": "drained",
         "time": "2027-01-15T07:45:00+00:00"},
    )  # fmt: skip
    assert samples(host) == [
        "fleet_generation_running 1",
        "fleet_generation_current 1",
        "fleet_generation_drift 0",
        'fleet_release_info{release="r3",action="rollback",result="deployed"} 1',
        "fleet_release_timestamp_seconds 1799998200",
        "fleet_last_success_timestamp_seconds 1799998200",
        "fleet_rollbacks_total 2",
        "fleet_last_rollback_timestamp_seconds 1799998200",
        *FREE,
    ]
    records(host, {"release": "r5", "action": "deploy", "result": "rolled-back",
                   "time": "2027-01-15T07:50:00Z", "timings": {"lock": 0.1}})  # fmt: skip
    assert samples(host)[3:9] == [
        'fleet_release_info{release="r5",action="deploy",result="rolled-back"} 1',
        "fleet_release_timestamp_seconds 1799999400",
        "fleet_last_success_timestamp_seconds 1799998200",
        "fleet_rollbacks_total 3",
        "fleet_last_rollback_timestamp_seconds 1799999400",
        'fleet_phase_duration_seconds{phase="lock"} 0.1',
    ]


def test_metrics_of_a_drifted_host(host: Path) -> None:
    on_generation_2(host, running="sys-a")  # runs generation 1; the profile says 2
    assert samples(host)[:3] == [
        "fleet_generation_running 1",
        "fleet_generation_current 2",
        "fleet_generation_drift 1",
    ]
    (host / "store/sys-c").mkdir()
    (host / "run/current-system").unlink()
    (host / "run/current-system").symlink_to(host / "store/sys-c")  # in no generation
    assert samples(host)[:2] == ["fleet_generation_current 2", "fleet_generation_drift 1"]


def test_metrics_of_a_held_lock(host: Path) -> None:
    code, _ = begin(host, tk("m1"))
    assert code == 0
    txn_file = host / "var/lib/fleet/txn.json"
    txn = json.loads(txn_file.read_text())
    assert abs(txn["began"] - fh.now()) < 30
    txn["began"] = AT - 42.5
    txn_file.write_text(json.dumps(txn))
    assert samples(host)[-5:] == [
        "fleet_lock_held 1",
        "fleet_lock_held_seconds 42.5",
        "fleet_transaction_open 1",
        "fleet_maintenance 0",
        "fleet_metrics_timestamp_seconds 1800000000",
    ]
    # Past the commit point, or a gc: the lock is held, but no change is left to undo.
    for key, value in (("state", "committed"), ("mode", "gc")):
        txn_file.write_text(json.dumps(txn | {key: value}))
        assert samples(host)[-5:-2] == [
            "fleet_lock_held 1",
            "fleet_lock_held_seconds 42.5",
            "fleet_transaction_open 0",
        ]
    # A record from before `began`: held since at least its last write.
    del txn["began"]
    txn_file.write_text(json.dumps(txn))
    os.utime(txn_file, (AT - 7, AT - 7))
    assert samples(host)[-4] == "fleet_lock_held_seconds 7"
    txn_file.write_text("{torn")  # unreadable: nobody can begin, so held all the same
    os.utime(txn_file, (AT - 3, AT - 3))
    assert samples(host)[-5:-2] == [
        "fleet_lock_held 1", "fleet_lock_held_seconds 3", "fleet_transaction_open 1"]  # fmt: skip


def test_metrics_of_maintenance(host: Path) -> None:
    helper(host, "maintenance", "on", "--holder", json.dumps({"reason": "disk"}))
    assert "fleet_maintenance 1" in samples(host)
    assert "fleet_rollbacks_total 0" in samples(host)  # a drain is neither release nor rollback


def test_metrics_escape_what_a_record_says(host: Path) -> None:
    """Release ids, results and phases come from operators: a quote, a backslash or a
    newline stays inside its label; a message never reaches the file at all."""
    records(host, {
        "release": 'r"1\n# TYPE fleet_lock_held counter', "action": "deploy\\x",
        "result": "rolled-back", "message": 'bad"\nfleet_lock_held 1',
        "time": "not a time", "timings": {'he"al\\th\n': 1.5, "word": "x", "nan": float("nan"),
                                          "flag": True},
    })  # fmt: skip
    lines = samples(host)
    assert lines[3:7] == [
        'fleet_release_info{release="r\\"1\\n# TYPE fleet_lock_held counter",'
        'action="deploy\\\\x",result="rolled-back"} 1',
        "fleet_rollbacks_total 1",
        'fleet_phase_duration_seconds{phase="he\\"al\\\\th\\n"} 1.5',
        "fleet_lock_held 0",
    ]
    assert sum(line.startswith("fleet_lock_held ") for line in lines) == 1
    assert "bad" not in fh.metrics_text(fh.Paths(host), AT)


def test_each_step_rewrites_the_metrics(host: Path) -> None:
    prom = host / "var/lib/fleet-metrics/fleet.prom"
    begin(host, tk("m2"))
    assert "fleet_lock_held 1" in prom.read_text().splitlines()
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert stat.S_IMODE(prom.parent.stat().st_mode) == 0o755
    helper(host, "activate", "--token", tk("m2"), "--health", "5", "--confirm", "5")
    assert "fleet_generation_drift 1" in prom.read_text()  # running the new, not yet current
    timings = {"connect": 0.1, "lock": 0.2, "activate": 0.3, "health": 0.4}
    helper(host, "commit", "--token", tk("m2"), stdin=json.dumps({"timings": timings}))
    text = prom.read_text()
    assert "fleet_lock_held 0" in text and "fleet_generation_current 2" in text
    assert 'fleet_phase_duration_seconds{phase="health"} 0.4' in text
    # No temporary left: the metrics, and where their reading of the records stopped.
    assert sorted(p.name for p in prom.parent.iterdir()) == [".releases-read.json", "fleet.prom"]


def test_an_undo_keeps_the_timings_the_tool_sent(host: Path) -> None:
    begin(host, tk("m3"))
    helper(host, "undo", "--token", tk("m3"), "--settle", "0",
           stdin=json.dumps({"phase": "health", "timings": {"health": 2.5}}))  # fmt: skip
    [record] = [json.loads(x) for x in (host / "var/lib/fleet/releases.jsonl").open()]
    assert record["timings"] == {"health": 2.5} and record["result"] == "rolled-back"
    text = (host / "var/lib/fleet-metrics/fleet.prom").read_text()
    assert 'fleet_phase_duration_seconds{phase="health"} 2.5' in text


def test_metrics_are_replaced_whole(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector sees the old file or the new one, never part of one: at the rename,
    the new text is complete in a temporary file beside it, which the collector skips."""
    paths = fh.Paths(host)
    fh.write_metrics(paths, AT - 60)
    old = paths.metrics.read_text()
    seen: list[tuple[str, str, str, int]] = []
    real_replace = os.replace

    def replace(src: str, dst: Path) -> None:
        seen.append((os.path.dirname(src), Path(src).read_text(), Path(dst).read_text(),
                     stat.S_IMODE(os.stat(src).st_mode)))  # fmt: skip
        assert not Path(src).name.endswith(".prom")  # node exporter reads *.prom only
        real_replace(src, dst)

    monkeypatch.setattr(fh.os, "replace", replace)
    fh.write_metrics(paths, AT)
    [(folder, new, before, mode)] = seen
    assert folder == str(paths.metrics.parent) and before == old and mode == 0o644
    assert new == paths.metrics.read_text() == fh.metrics_text(paths, AT)

    def refuse(src: str, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fh.os, "replace", refuse)
    with pytest.raises(OSError):
        fh.write_metrics(paths, AT + 60)
    assert paths.metrics.read_text() == new
    assert [p.name for p in paths.metrics.parent.iterdir()] == ["fleet.prom"]


def test_a_step_succeeds_when_metrics_cannot_be_written(host: Path) -> None:
    (host / "var/lib").mkdir(parents=True)
    (host / "var/lib/fleet-metrics").write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, str(HELPER), *begin_args(host, tk("m4"))],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, FLEET_HOST_ROOT=str(host),
                 PATH=f"{host.parent / 'bin'}:{os.environ['PATH']}"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["begun"]
    [line] = proc.stderr.splitlines()
    assert line.startswith("fleet-host: metrics not written: ")
    assert (host / "var/lib/fleet/txn.json").exists()
    code, out = helper(host, "metrics")  # asked for on its own, it is the step's failure
    assert code == fh.Exit.FAILED and not out["ok"]


# -- Prometheus, asked on the host for the tool -----------------------------------------


@dataclass
class FakePrometheus:
    """A tiny HTTP server on 127.0.0.1: each request's path, one canned answer."""

    port: int
    paths: list[str] = field(default_factory=list)
    status: int = 200
    body: bytes = b'{"status": "success", "data": {"resultType": "vector", "result": []}}'
    delay: float = 0.0


@pytest.fixture()
def prometheus() -> Iterator[FakePrometheus]:
    import http.server
    import threading
    import time

    class QuietServer(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that gave up (the point of some tests) is no error

    fake = FakePrometheus(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.paths.append(self.path)
            time.sleep(fake.delay)
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(fake.body)

        def log_message(self, *_: object) -> None:
            pass

    server = QuietServer(("127.0.0.1", 0), Handler)
    fake.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield fake
    server.shutdown()
    server.server_close()


def test_prom_query_asks_prometheus_and_prints_its_answer(
    host: Path, prometheus: FakePrometheus
) -> None:
    port = str(prometheus.port)
    code, out = helper(host, "prom-query", "--port", port, "--query", 'up{job="a b"} > 0',
                       "--time", "2027-01-15T08:00:00Z")  # fmt: skip
    assert code == 0, out
    assert out == {"ok": True, "status": "success",
                   "data": {"resultType": "vector", "result": []}}  # fmt: skip
    assert prometheus.paths == [
        "/api/v1/query?query=up%7Bjob%3D%22a+b%22%7D+%3E+0&time=2027-01-15T08%3A00%3A00Z"
    ]
    code, out = helper(host, "prom-alerts", "--port", port)
    assert code == 0 and out["status"] == "success"
    assert prometheus.paths[-1] == "/api/v1/alerts"


def test_prometheus_errors_are_one_line_failures(host: Path, prometheus: FakePrometheus) -> None:
    port = str(prometheus.port)
    prometheus.status = 400
    prometheus.body = b'{"status": "error", "errorType": "bad_data", "error": "parse error"}'
    code, out = helper(host, "prom-query", "--port", port, "--query", "up{")
    assert code == fh.Exit.FAILED and out["errorType"] == "bad_data"
    assert out["error"] == f"127.0.0.1:{port}/api/v1/query: HTTP 400: bad_data: parse error"
    prometheus.status, prometheus.body = 404, b"404 page not found"
    code, out = helper(host, "prom-alerts", "--port", port)
    assert code == fh.Exit.FAILED and "HTTP 404, not Prometheus's JSON" in out["error"]
    prometheus.status, prometheus.body = 200, b'{"status": "success", "data": "' + (
        b"x" * (5 << 20)) + b'"}'  # fmt: skip
    code, out = helper(host, "prom-query", "--port", port, "--query", "up")
    assert code == fh.Exit.FAILED and "larger than 4 MiB" in out["error"]


def test_a_prometheus_that_is_not_there_or_hangs_fails_in_time(
    host: Path, prometheus: FakePrometheus
) -> None:
    import socket
    import time

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = str(unused.getsockname()[1])
    code, out = helper(host, "prom-query", "--port", closed, "--query", "up")
    assert code == fh.Exit.FAILED and out["error"].endswith("Connection refused")
    prometheus.delay = 10
    started = time.monotonic()
    code, out = helper(host, "prom-alerts", "--port", str(prometheus.port), "--timeout", "0.5")
    assert code == fh.Exit.FAILED and "timed out" in out["error"]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("port", ["0", "65536", "x", "-1"])
def test_prom_query_takes_a_port_and_nothing_else(host: Path, port: str) -> None:
    code, _ = helper(host, "prom-query", f"--port={port}", "--query", "up")
    assert code == fh.Exit.USAGE


def record_line(n: int, **fields: object) -> str:
    record = {"release": f"r{n}", "action": "deploy", "result": "deployed",
              "time": "2026-11-25T00:00:00+00:00", "message": f"secret {n}", **fields}  # fmt: skip
    return json.dumps(record) + "\n"


def test_the_records_are_read_on_from_where_the_last_reading_stopped(host: Path) -> None:
    """A host deployed for years: every step rewrites the metrics, and must not parse the
    whole log each time."""
    paths = fh.Paths(host)
    paths.records.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.parent.mkdir(parents=True)
    paths.records.write_text("".join(record_line(n) for n in range(3)))
    first = fh.releases(paths)
    assert (first.rollbacks, first.last) == (0, {"release": "r2", "action": "deploy",
            "result": "deployed", "time": "2026-11-25T00:00:00+00:00"})  # fmt: skip
    # What was read is not read again: spoil it in place, same size, and it still counts.
    text = paths.records.read_text()
    paths.records.write_text(text.replace('"r0"', '"x0"'))
    with paths.records.open("a") as log:
        log.write(record_line(3, result="rolled-back") + record_line(4)[:20])  # the last, torn
    found = fh.releases(paths)
    assert found.rollbacks == 1 and found.last is not None and found.last["release"] == "r3"
    with paths.records.open("a") as log:
        log.write(record_line(4)[20:])
    assert fh.releases(paths).last == {**found.last, "release": "r4", "result": "deployed"}
    # Never the records' messages or operators, in a file anyone may read.
    assert "secret" not in (paths.metrics.parent / ".releases-read.json").read_text()


@pytest.mark.parametrize("change", ["replaced", "shorter", "garbage"])
def test_a_log_that_is_not_the_one_read_is_read_from_the_start(host: Path, change: str) -> None:
    paths = fh.Paths(host)
    paths.records.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.parent.mkdir(parents=True)
    paths.records.write_text(record_line(0, result="rolled-back") + record_line(1))
    assert fh.releases(paths).rollbacks == 1
    seen = paths.metrics.parent / ".releases-read.json"
    if change == "replaced":  # a new file where the old one was, longer
        new = paths.records.with_name("new")
        new.write_text("".join(record_line(n) for n in range(5, 9)))
        os.replace(new, paths.records)
    elif change == "shorter":  # same file, rewritten shorter
        with paths.records.open("r+") as log:
            log.truncate(0)
            log.write(record_line(7))
    else:
        seen.write_text('{"inode": "x", "offset": [], "releases": 3}')
    found = fh.releases(paths)
    expected = {"replaced": ("r8", 0), "shorter": ("r7", 0), "garbage": ("r1", 1)}[change]
    assert found.last is not None and (found.last["release"], found.rollbacks) == expected


def test_a_step_parses_only_the_records_added_since_the_last(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = fh.Paths(host)
    paths.records.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.parent.mkdir(parents=True)
    paths.records.write_text(record_line(0) * 10_000)
    fh.releases(paths)
    with paths.records.open("a") as log:
        log.write(record_line(1))
    parsed: list[str] = []
    real = fh.parse_record
    monkeypatch.setattr(fh, "parse_record", lambda line: parsed.append(line) or real(line))
    assert fh.releases(paths).last == {"release": "r1", "action": "deploy", "result": "deployed",
                                        "time": "2026-11-25T00:00:00+00:00"}  # fmt: skip
    assert parsed == [record_line(1).rstrip("\n")]


# The binary cache's two commands: what reaches Nix's command line, and who may sign.
FAKE_NIX_STORE = """#!/bin/sh
echo "nix-store $*" >> "$FLEET_HOST_ROOT/calls"
for last; do :; done
case "$*" in
  *--check-validity*) for p; do case "$p" in /*) [ -e "$p" ] || echo "$p" ;; esac; done ;;
  *) echo "${REALISE:-}" >&2; [ -z "${FAIL:-}" ] && echo "$last" ;;
esac
"""
HASHED = "0" * 32


@pytest.fixture()
def cache_host(host: Path) -> dict[str, str]:
    """A host whose running system serves a binary cache, with a store of hashed names."""
    _script(host.parent / "bin/nix", FAKE_NIX)
    _script(host.parent / "bin/nix-store", FAKE_NIX_STORE)
    key = host / "cache-key"
    key.write_text("fleet-cache-1:secret")
    manifest = {"cache": {"directory": str(host / "cache"), "secretKeyFile": str(key)}}
    (host / "store/sys-a/etc/fleet").mkdir(parents=True)
    (host / "store/sys-a/etc/fleet/manifest.json").write_text(json.dumps(manifest))
    (host / "store" / f"{HASHED}-system").mkdir()
    return {"NIX_STORE_DIR": str(host / "store")}


@pytest.mark.parametrize(
    "args",
    [
        ["fetch", "--cache", "http://192.0.2.1:5080", "/etc/passwd"],
        ["fetch", "--cache", "http://192.0.2.1:5080", "--option"],
        ["fetch", "--cache", "http://192.0.2.1:5080", "STORE/../../etc/shadow"],
        ["fetch", "--cache", "http://192.0.2.1:5080", "STORE/short-name"],
        ["fetch", "--cache", "http://192.0.2.1:5080", f"STORE/{HASHED}-a b"],
        ["fetch", "--cache", "file:///etc", f"STORE/{HASHED}-system"],
        ["fetch", "--cache", "http://192.0.2.1:5080/x?secret-key=/etc/k", f"STORE/{HASHED}-s"],
        ["fetch", "--cache", "http://a b:1", f"STORE/{HASHED}-system"],
        ["fetch", "--cache", "http://192.0.2.1:5080", f"STORE/{HASHED}-system.drv"],  # built
        ["publish", "--", "--to"],
        ["publish", f"STORE/{HASHED}-system", "/root/.ssh/id_ed25519"],
    ],
)
def test_the_cache_commands_take_store_paths_and_cache_urls_only(
    host: Path, cache_host: dict[str, str], args: list[str]
) -> None:
    store = cache_host["NIX_STORE_DIR"]
    code, _ = helper(host, *(a.replace("STORE", store) for a in args), env=cache_host)
    assert code == fh.Exit.USAGE
    assert not (host / "calls").exists()  # nothing reached Nix


def test_publish_needs_a_system_that_serves_a_cache(host: Path, cache_host) -> None:
    (host / "store/sys-a/etc/fleet/manifest.json").write_text("{}")
    path = f"{cache_host['NIX_STORE_DIR']}/{HASHED}-system"
    code, out = helper(host, "publish", path, env=cache_host)
    assert code == fh.Exit.USAGE and "serves no binary cache" in out["error"]


def test_a_deploy_user_may_not_have_an_unsigned_closure_signed_by_the_cache(
    host: Path, cache_host: dict[str, str]
) -> None:
    """The cache's signature is trusted by every host: it must never launder a path."""
    path = f"{cache_host['NIX_STORE_DIR']}/{HASHED}-system"
    env = cache_host | {"SUDO_UID": "1500", "SUDO_USER": "deploy"}
    code, out = helper(host, "publish", path, env=env)
    assert code == fh.Exit.FAILED and "signed by no key this host trusts" in out["error"]
    assert "nix copy" not in (host / "calls").read_text()
    Path(path, "signed").touch()
    code, out = helper(host, "publish", path, env=env)
    assert code == 0 and out["published"] == 1, out
    calls = (host / "calls").read_text()
    assert f"copy --to file://{host / 'cache'}?secret-key={host / 'cache-key'}" in calls


def test_fetch_fails_when_the_cache_cannot_serve_and_counts_what_it_fetched(
    host: Path, cache_host: dict[str, str]
) -> None:
    path = f"{cache_host['NIX_STORE_DIR']}/{HASHED}-missing"
    env = cache_host | {"REALISE": "error: don't know how to build these paths:", "FAIL": "1"}
    code, out = helper(host, "fetch", "--cache", "http://192.0.2.1:5080", path, env=env)
    assert code == fh.Exit.FAILED and "192.0.2.1:5080: error: don't know" in out["error"]
    calls = (host / "calls").read_text()
    assert "--option substituters http://192.0.2.1:5080" in calls
    assert "--option fallback false" in calls  # never built on the host
    env = cache_host | {"REALISE": "this path will be fetched (0.50 MiB download, 1 MiB unpacked):"}
    code, out = helper(host, "fetch", "--cache", "http://192.0.2.1:5080", path, env=env)
    assert code == 0 and out["fetched"] == 1 and out["downloadBytes"] == 524288, out


# -- one call: begin, activate, and the checks the host makes itself ----------------------


def declare_checks(host: Path, system: str, checks: list[dict[str, object]]) -> None:
    manifest = host / "store" / system / "etc/fleet/manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"checks": checks}))


def http_check(port: int, **changes: object) -> dict[str, object]:
    return {"name": "web", "service": None, "type": "http", "port": port, "path": "/health",
            "expectStatus": 200, "expectBody": "ok", "timeout": 2, "interval": 0.1,
            "retries": 2} | changes  # fmt: skip


def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when this returns


ACTIVATE = ("--activate", "--checks", "--health", "10", "--confirm-timeout", "5")


def test_begin_activates_and_proves_in_one_call(host: Path, prometheus: FakePrometheus) -> None:
    prometheus.body = b"ok"
    tcp = {"name": "port", "service": None, "type": "tcp", "port": prometheus.port,
           "timeout": 1, "interval": 0.1, "retries": 1}  # fmt: skip
    declare_checks(host, "sys-b", [http_check(prometheus.port), tcp])
    code, out = begin(host, tk("one"), "sys-b", *ACTIVATE)
    assert code == 0 and out["begun"] and out["recorded"]["number"] == 1
    activation = out["activation"]
    assert activation["switchExit"] == 0 and activation["settled"] is True
    assert os.path.realpath(host / "run/current-system").endswith("sys-b")
    health = activation["health"]
    assert health["ok"] is True
    assert [(c["name"], c["message"]) for c in health["checks"]] == [
        ("web", "HTTP 200"),
        ("port", "connected"),
    ]
    assert prometheus.paths == ["/health"]
    txn = json.loads((host / "var/lib/fleet/txn.json").read_text())
    assert txn["state"] == "activated"
    code, out = helper(host, "commit", "--token", tk("one"), stdin="{}")
    assert code == 0 and out["committed"]


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [(503, b"ok", "HTTP 503, expected 200"), (200, b"nope", "the body lacks 'ok'")],
)
def test_a_failing_check_is_reported_in_its_own_words(
    host: Path, prometheus: FakePrometheus, status: int, body: bytes, words: str
) -> None:
    prometheus.status, prometheus.body = status, body
    declare_checks(host, "sys-b", [http_check(prometheus.port)])
    code, out = begin(host, tk("bad"), "sys-b", *ACTIVATE)
    assert code == 0
    [check] = out["activation"]["health"]["checks"]
    assert not check["ok"] and check["attempts"] == 2 and words in check["message"]
    assert not out["activation"]["health"]["ok"]
    # The transaction is the tool's to undo: it was begun and activated.
    code, out = helper(host, "undo", "--token", tk("bad"), stdin="{}")
    assert code == 0 and os.path.realpath(host / "run/current-system").endswith("sys-a")


def test_a_closed_port_fails_its_check(host: Path) -> None:
    port = closed_port()
    tcp = {"name": "port", "service": None, "type": "tcp", "port": port, "timeout": 1,
           "interval": 0.1, "retries": 1}  # fmt: skip
    declare_checks(host, "sys-b", [http_check(port, name="web"), tcp])
    code, out = begin(host, tk("closed"), "sys-b", *ACTIVATE)
    assert code == 0
    messages = {c["name"]: c["message"] for c in out["activation"]["health"]["checks"]}
    assert "refused" in messages["web"].lower() and "refused" in messages["port"].lower()


def test_a_command_check_is_left_to_the_tool(host: Path) -> None:
    """A command runs as the ssh user, not as root: the host makes no check of that system."""
    command = {"name": "cmd", "service": None, "type": "command", "command": ["true"],
               "timeout": 1, "interval": 0.1, "retries": 1}  # fmt: skip
    declare_checks(host, "sys-b", [http_check(closed_port()), command])
    code, out = begin(host, tk("cmd"), "sys-b", *ACTIVATE)
    assert code == 0 and "health" not in out["activation"]
    assert [c["name"] for c in out["activation"]["checks"]] == ["web", "cmd"]


def test_a_failed_switch_is_begun_and_proves_nothing(host: Path) -> None:
    declare_checks(host, "sys-b", [http_check(closed_port())])
    code, out = helper(host, *begin_args(host, tk("fail"), "sys-b", *ACTIVATE),
                       env={"FAIL_SWITCH": "4"})  # fmt: skip
    assert code == 0 and out["begun"] and out["activation"]["switchExit"] == 4
    assert "health" not in out["activation"]
    assert (host / "var/lib/fleet/txn.json").exists()


def test_an_unchanged_host_proves_its_running_system_in_begin(
    host: Path, prometheus: FakePrometheus
) -> None:
    prometheus.body = b"ok"
    declare_checks(host, "sys-a", [http_check(prometheus.port)])
    code, out = begin(host, tk("same"), "sys-a", *ACTIVATE)
    assert code == 0 and out["noop"] and "activation" not in out
    assert out["running"]["number"] == 1 and out["running"]["path"].endswith("sys-a")
    assert out["settled"] is True and out["health"]["ok"] is True
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_health_proves_the_running_system(host: Path, prometheus: FakePrometheus) -> None:
    prometheus.body = b"ok"
    declare_checks(host, "sys-a", [http_check(prometheus.port)])
    code, out = helper(host, "health", "--seconds", "5")
    assert code == 0 and out["health"]["ok"] and out["failedUnits"] == []
    assert out["checks"][0]["name"] == "web"


def test_activating_in_begin_needs_the_timeouts(host: Path) -> None:
    code, out = begin(host, tk("usage"), "sys-b", "--activate")
    assert code == fh.Exit.USAGE and "--health" in out["error"]
    assert not (host / "var/lib/fleet/txn.json").exists()


def test_an_option_a_helper_does_not_know_is_refused_before_anything(host: Path) -> None:
    """What the tool takes for a helper from before that option: asked again the old way."""
    environ = dict(os.environ, FLEET_HOST_ROOT=str(host))
    proc = subprocess.run([sys.executable, str(HELPER), *begin_args(host, tk("old"), "sys-b"),
                           "--no-such-option"], capture_output=True, text=True, env=environ,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and "usage:" in proc.stderr and not proc.stdout
    assert not (host / "var/lib/fleet/txn.json").exists()


# -- the launcher, as the lab builds it ---------------------------------------------------

LAB_BUILDER = Path(__file__).parents[2] / "fleet" / "lab" / "flake" / "build-fleet-host.sh"
LAB_PYTHON = "/usr/bin/python3"  # the lab hosts' Python, which the builder compiles with
needs_lab_python = pytest.mark.skipif(
    not os.access(LAB_PYTHON, os.X_OK), reason=f"no {LAB_PYTHON} to build a lab system with"
)


NIX_PACKAGE = Path(__file__).parents[2] / "modules" / "fleet-host-package.nix"


def _launcher_and_compile(text: str, python: str) -> list[str]:
    """The lines of a builder that compile the module and write the launcher, the
    interpreter's path and the heredoc's delimiter made alike."""
    lines = [line.strip().replace(python, "PYTHON") for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if "-m compileall" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("sys.exit("))
    return [line.replace('"$module"', '"$libdir/fleet_host.py"') for line in lines[start : end + 1]
            if line and (line.startswith("#!") or not line.startswith("#"))
            and line != "EOF"]  # fmt: skip


def test_the_lab_builds_the_launcher_as_nixos_does() -> None:
    """The lab's hosts must run fleet-host as NixOS hosts do: the same compilation and
    the same launcher (its isolating flags above all), only the interpreter's path
    differs."""
    nix = _launcher_and_compile(NIX_PACKAGE.read_text(), "${python3}/bin/python3")
    lab = _launcher_and_compile(LAB_BUILDER.read_text(), LAB_PYTHON)
    # A lab system has NixOS's sw/ at its top: $out/sw/bin is the package's $out/bin.
    assert nix == [line.replace("<<END", "<<EOF").replace("$out/sw/", "$out/") for line in lab]
    assert "#!PYTHON -BIS" in nix


@pytest.fixture()
def launcher(tmp_path: Path) -> Path:
    """sw/bin/fleet-host of a lab system, made by the lab's own builder."""
    out = tmp_path / "system"
    subprocess.run(
        ["/bin/sh", "-e", str(LAB_BUILDER)],
        env={"PATH": "/usr/bin:/bin", "hostHelper": str(HELPER), "out": str(out)},
        check=True,
        timeout=60,
    )
    return out / "sw" / "bin" / "fleet-host"


def lab_python(code: str, env: dict[str, str] | None = None, *args: str) -> str:
    """What a line of Python prints, run by the lab's Python."""
    result = subprocess.run(
        [LAB_PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def run_launcher(
    launcher: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(launcher), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        timeout=60,
        check=False,
    )


@needs_lab_python
def test_the_launcher_runs_the_module_from_its_bytecode(launcher: Path) -> None:
    module = launcher.parents[1] / "lib" / "fleet-host" / "fleet_host.py"
    assert module.read_text() == HELPER.read_text()
    tag = lab_python("import sys; print(sys.implementation.cache_tag)")
    pyc = (module.parent / "__pycache__" / f"fleet_host.{tag}.pyc").read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 0b01  # hash-based, never checked
    # The source is not even read: the store's files never change.
    module.chmod(0o644)
    module.write_text('raise SystemExit("compiled from the source")\n')
    result = run_launcher(launcher, "version")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "protocol": fh.PROTOCOL}


@needs_lab_python
def test_nothing_in_the_callers_environment_stands_in_for_the_module(
    launcher: Path, tmp_path: Path
) -> None:
    """fleet-host runs as root: nothing a caller has, in a PYTHONPATH, a user site, a
    pycache prefix, a Python home or the working folder, may run in it."""
    hostile = tmp_path / "hostile"
    env = {"PYTHONPATH": str(hostile), "PYTHONUSERBASE": str(hostile),
           "PYTHONPYCACHEPREFIX": str(hostile), "PYTHONHOME": str(hostile),
           "PYTHONSTARTUP": str(hostile / "fleet_host.py")}  # fmt: skip
    prefixed = {"PYTHONPYCACHEPREFIX": str(hostile)}
    user_site = Path(lab_python("import site; print(site.getusersitepackages())",
                                {"PYTHONUSERBASE": str(hostile)}))  # fmt: skip
    assert user_site.is_relative_to(hostile)
    for folder in (hostile, user_site):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("fleet_host.py", "sitecustomize.py", "usercustomize.py"):
            (folder / name).write_text('raise SystemExit("imported the caller\'s " + __file__)\n')
        (folder / "hostile.pth").write_text('import sys; sys.exit("ran the caller\'s .pth")\n')
    # Bytecode where that prefix would have Python look for the module's.
    module = launcher.parents[1] / "lib" / "fleet-host" / "fleet_host.py"
    lab_python(
        "import importlib.util, py_compile, sys; py_compile.compile(sys.argv[1], "
        "importlib.util.cache_from_source(sys.argv[2]), "
        "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)",
        prefixed,
        str(hostile / "fleet_host.py"),
        str(module),
    )
    result = run_launcher(launcher, "version", cwd=hostile, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


@needs_lab_python
def test_the_launcher_is_the_program_a_transaction_records(
    host: Path, launcher: Path, tmp_path: Path
) -> None:
    """The dead-man switch runs the helper its transaction names: the launcher, by its own
    path, not the link it was called by (/run/current-system/sw/bin/fleet-host)."""
    link = tmp_path / "current-system" / "sw" / "bin" / "fleet-host"
    link.parent.mkdir(parents=True)
    link.symlink_to(launcher)
    code, out = helper(host, *begin_args(host, tk("l1")), program=link)
    assert code == 0 and out["begun"], out
    assert json.loads((host / "var/lib/fleet/txn.json").read_text())["helper"] == str(launcher)
    assert f"{launcher} watch --token {tk('l1')}" in (host / "calls").read_text()
    # Its exit codes are the program's own: a token that holds nothing is fenced.
    fenced = ("activate", "--token", tk("l2"), "--health", "5", "--confirm", "5")
    code, out = helper(host, *fenced, program=link)
    assert code == fh.Exit.FENCED and not out["ok"]
    result = run_launcher(launcher, "no-such-command")
    assert result.returncode == fh.Exit.USAGE and "usage: fleet-host" in result.stderr


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
@pytest.mark.parametrize("lines", [0, 1, 49, 50, 51, 300])
def test_the_newest_records_are_read_from_the_end(tmp_path: Path, block: int, lines: int) -> None:
    path = tmp_path / "releases.jsonl"
    text = [json.dumps({"n": n, "pad": "x" * (n % 13)}) for n in range(lines)]
    path.write_text("".join(f"{line}\n" for line in text))
    assert fh.last_lines(path, 50, block) == text[-50:]
    assert fh.last_lines(tmp_path / "none", 50) == []
