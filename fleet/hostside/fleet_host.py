#!/usr/bin/env python3
"""fleet-host: the host's half of fleet's protocol (docs/transaction.md).

Every change to the host is one transaction whose record, deadline and undo live here,
on the host, so that whatever happens to the operator's machine or the link, the host
ends on a system its profile names. Subcommands print one JSON document on stdout.

Kept in every generation (``$system/sw/bin/fleet-host``); stdlib only. The tool paths
below are substituted at build time on NixOS; left as placeholders they are looked up on
PATH (the lab).
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import IO, Any

SYSTEMCTL = "@systemctl@"
SYSTEMD_RUN = "@systemd_run@"
NIX_ENV = "@nix_env@"
NIX_STORE = "@nix_store@"
NIX = "@nix@"
BOOTCTL = "@bootctl@"

PROTOCOL = 1
TXN_VERSION = 1
# An unwatched transaction, or one this long past its deadline, is abandoned.
GRACE = 10.0
FLOCK_WAIT = 300.0  # an undo in progress holds the lock for a switch's length
SETTLE_POLL = 0.2
# The switch sleeps until the deadline in the record, waking this often to re-read it (a
# later deadline extends it; a record that names another token ends it).
WATCH_POLL = 5.0
OUTPUT_TAIL = 4000
# What a caller hands in (an argument's or stdin's JSON) is kept in root's files and read
# back by every later step, the dead-man switch and the agent: bounded in size and depth.
INPUT_MAX = 1 << 20
SECRETS_INPUT_MAX = 32 << 20  # all of a host's secrets, each at most SECRET_MAX
JSON_DEPTH = 32
# The longest time a caller may name: every deadline stays finite, so the dead-man switch
# always fires, and no lock outlives its holder by more than that.
SECONDS_MAX = 7 * 86400.0


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    HELD = 3
    FENCED = 4
    EXPIRED = 5


class State:
    BEGUN = "begun"
    ACTIVATING = "activating"
    ACTIVATED = "activated"
    REBOOTING = "rebooting"
    BOOTED = "booted"
    COMMITTED = "committed"


MODES = ("switch", "boot", "reboot", "gc")


def tool(placeholder: str, name: str) -> str:
    if not placeholder.startswith("@"):
        return placeholder
    found = shutil.which(name) or shutil.which(
        name, path="/run/current-system/sw/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    )
    return found or name


@dataclass(frozen=True)
class Paths:
    """Where the host keeps things; ``FLEET_HOST_ROOT`` moves all of it (tests only)."""

    root: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("FLEET_HOST_ROOT", "/")))

    def _p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def profile(self) -> Path:
        return self._p("/nix/var/nix/profiles/system")

    @property
    def state_dir(self) -> Path:
        return self._p("/var/lib/fleet")

    @property
    def txn(self) -> Path:
        return self.state_dir / "txn.json"

    @property
    def records(self) -> Path:
        return self.state_dir / "releases.jsonl"

    @property
    def secrets(self) -> Path:
        """Where uploaded secrets live: root-only, on disk, so that they survive a reboot."""
        return self.state_dir / "secrets"

    @property
    def run_dir(self) -> Path:
        return self._p("/run/fleet")

    @property
    def flock(self) -> Path:
        return self.run_dir / "host.lock"

    @property
    def traffic(self) -> Path:
        """What the agent tells the balancers per service ("drain", "ready N%"); in /run,
        so that no boot starts drained, and written only by transactions, whose finish and
        undo (the dead-man switch's too) remove what they wrote."""
        return self.run_dir / "traffic"

    @property
    def maintenance(self) -> Path:
        """An operator's drain of the whole host (`fleet drain`): on disk, it outlives a
        reboot until `fleet undrain`."""
        return self.state_dir / "maintenance.json"

    @property
    def metrics(self) -> Path:
        """node exporter's textfile (its collector reads ``*.prom`` in this folder)."""
        return self._p("/var/lib/fleet-metrics/fleet.prom")

    @property
    def gcroots(self) -> Path:
        return self._p("/nix/var/nix/gcroots/fleet")

    @property
    def current_system(self) -> Path:
        return self._p("/run/current-system")

    @property
    def booted_system(self) -> Path:
        return self._p("/run/booted-system")

    @property
    def lab_boot(self) -> Path:
        return self._p("/boot/lab")

    @property
    def loader_conf(self) -> Path:
        return self._p("/boot/loader/loader.conf")


class Failure(Exception):
    def __init__(self, code: Exit, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


# -- small helpers ----------------------------------------------------------------------


def now() -> float:
    return time.time()


def run(argv: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run([tool(SYSTEMCTL, "systemctl"), *args])


def readlink(path: Path) -> str | None:
    try:
        return os.path.realpath(path) if path.is_symlink() or path.exists() else None
    except OSError:
        return None


def generation_number(name: str) -> int | None:
    """``system-42-link`` -> 42."""
    parts = name.removeprefix("system-").split("-")
    ok = len(parts) == 2 and parts[0].isdigit() and parts[1] == "link"
    return int(parts[0]) if ok else None


def write_whole(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    """Replace a file whole: temporary file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # one a crashed step of the same pid left
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.write(fd, text.encode() if isinstance(text, str) else text)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def relink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def tail(text: str, limit: int = OUTPUT_TAIL) -> str:
    return text[-limit:]


def seconds_arg(text: str) -> float:
    """A duration: NaN, infinities, negatives and years would leave a deadline that never
    comes (or already passed), a switch that never fires, a wait that never ends."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= SECONDS_MAX):
        raise argparse.ArgumentTypeError(f"seconds: a number from 0 to {SECONDS_MAX:g}")
    return value


def nesting(value: Any) -> int:
    """How deeply JSON data nests (a scalar: 0), counted without recursion."""
    deepest, level = 0, [value]
    while any(isinstance(x, (dict, list)) for x in level):
        deepest += 1
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]  # fmt: skip
    return deepest


def loads(text: str, what: str, limit: int = INPUT_MAX) -> Any:
    """A caller's JSON; too large, too deep or not JSON is a usage error, before anything."""
    if len(text) > limit:
        raise Failure(Exit.USAGE, f"{what}: larger than {limit >> 20} MiB")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Failure(Exit.USAGE, f"{what}: not JSON: {str(exc)[:200]}") from None
    if nesting(data) > JSON_DEPTH:
        raise Failure(Exit.USAGE, f"{what}: nested deeper than {JSON_DEPTH}")
    return data


def json_object(text: str, what: str) -> dict[str, Any]:
    data = loads(text, what)
    if not isinstance(data, dict):
        raise Failure(Exit.USAGE, f"{what}: expected a JSON object")
    return data


def read_input(what: str, limit: int = INPUT_MAX) -> str:
    """stdin, at most ``limit`` bytes: nobody makes root hold more in memory."""
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise Failure(Exit.USAGE, f"{what}: more than {limit >> 20} MiB on stdin")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise Failure(Exit.USAGE, f"{what}: not UTF-8") from None


# -- the host's state -------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    number: int | None
    path: str

    def json(self) -> dict[str, Any]:
        return {"number": self.number, "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Generation | None:
        return None if not data else cls(data.get("number"), data["path"])


def generations(paths: Paths) -> list[tuple[int, int, str]]:
    """(number, created, path) of every generation of the system profile."""
    found = []
    folder = paths.profile.parent
    for link in folder.glob("system-*-link") if folder.is_dir() else []:
        number = generation_number(link.name)
        if number is None:
            continue
        try:
            created = int(link.lstat().st_mtime)
        except OSError:
            continue
        found.append((number, created, os.path.realpath(link)))
    return sorted(found)


def current_number(paths: Paths) -> int | None:
    try:
        return generation_number(os.readlink(paths.profile))
    except OSError:
        return None


def number_of(paths: Paths, path: str) -> int | None:
    """The generation that holds ``path``: the current one if it does, else the newest."""
    current = current_number(paths)
    numbers = [n for n, _, p in generations(paths) if p == path]
    if current in numbers:
        return current
    return max(numbers) if numbers else None


def boot_entry(paths: Paths) -> str | None:
    """The system the boot loader starts by default, where that can be read."""
    if paths.lab_boot.is_dir():
        return readlink(paths.lab_boot / "default")
    try:
        text = paths.loader_conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "default" and value.strip().startswith("nixos-generation-"):
            number = value.strip().removeprefix("nixos-generation-").split(".")[0].split("-")[0]
            if number.isdigit():
                link = paths.profile.parent / f"system-{number}-link"
                return readlink(link)
    return None


def failed_units() -> list[str]:
    out = systemctl("list-units", "--failed", "--plain", "--no-legend", "--full").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def watchers() -> dict[str, str]:
    """Dead-man switches on this host: unit name -> active state."""
    out = systemctl(
        "list-units", "--all", "--plain", "--no-legend", "--full", "fleet-watch-*"
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(".service"):
            found[parts[0].removesuffix(".service")] = parts[2]
    return found


def last_lines(path: Path, count: int, block: int = 1 << 16) -> list[str]:
    """The file's last ``count`` lines, read from its end: every step reads the newest
    records, and a host deployed for years must not read all of them each time."""
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            start, data = end, b""
            while start > 0 and data.count(b"\n") <= count:
                start = max(0, start - block)
                handle.seek(start)
                data = handle.read(end - start)
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return lines[-count:] if start == 0 else lines[1:][-count:]  # the first may be cut


def last_record(paths: Paths) -> dict[str, Any] | None:
    """The newest record of a change of system (a drain or undrain changes none)."""
    for line in reversed(last_lines(paths.records, 50)):
        record = parse_record(line)
        if record is not None and changes_system(record):
            return record
    return None


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def parse_record(line: str) -> dict[str, Any] | None:
    """One line of the records; None for one no reader could take (not an object, or
    nested deeper than any record the tool writes: parsing it again would recurse too far)."""
    try:
        loaded = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return loaded if isinstance(loaded, dict) and nesting(loaded) <= JSON_DEPTH else None


# -- the transaction record -------------------------------------------------------------


@dataclass
class Txn:
    token: str
    holder: dict[str, Any]
    mode: str
    recorded: dict[str, Any]
    target: dict[str, Any] | None
    state: str
    deadline: float
    confirm: float
    helper: str
    base: dict[str, Any] = field(default_factory=dict)  # release fields for records
    record: dict[str, Any] | None = None  # the record to append on finishing
    switch_unit: str | None = None
    taken_over: list[str] = field(default_factory=list)
    boot_id: str = ""  # the boot it belongs to: `boot` acts only on earlier boots' ones
    restart: list[str] = field(default_factory=list)  # units whose secrets changed
    prune: list[str] = field(default_factory=list)  # "service/name" declared no more
    # The newest generation number before it began: an undo deletes the generations it
    # added, so that a later `rollback` never lands on one that was never current.
    newest: int | None = None
    drained: list[str] = field(default_factory=list)  # services taken out of rotation
    began: float = 0.0  # when the lock was taken, by this host's clock (0: not recorded)
    version: int = TXN_VERSION

    @property
    def watch_unit(self) -> str:
        return watch_unit(self.token)

    def json(self) -> dict[str, Any]:
        return asdict(self)


def boot_id(paths: Paths) -> str:
    """This boot's identity: a random file in /run, which every boot starts empty (the
    kernel's boot_id would not change when a container reboots)."""
    marker = paths.run_dir / "boot-id"
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        value = os.urandom(8).hex()
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
        return value


def watch_unit(token: str) -> str:
    return f"fleet-watch-{token[:16]}"


def read_txn(paths: Paths) -> Txn | None:
    try:
        data = json.loads(paths.txn.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise Failure(Exit.FAILED, f"{paths.txn} is unreadable ({exc}): repair by hand") from exc
    known = set(Txn.__dataclass_fields__)
    return Txn(**{k: v for k, v in data.items() if k in known})


def write_txn(paths: Paths, txn: Txn) -> None:
    write_whole(paths.txn, json.dumps(txn.json(), sort_keys=True) + "\n")


def drop_txn(paths: Paths, txn: Txn) -> None:
    """Release the lock. If the disk refuses even that, the switch keeps retrying."""
    try:
        paths.txn.unlink(missing_ok=True)
    except OSError as exc:
        raise Failure(Exit.FAILED, f"the lock could not be released: {exc}") from exc
    for name in ("recorded", "target"):
        (paths.gcroots / f"{name}-{txn.token[:16]}").unlink(missing_ok=True)
    if os.environ.get("FLEET_HOST_WATCHER") != txn.token:
        systemctl("stop", "--no-block", f"{txn.watch_unit}.service")


def abandoned(txn: Txn, units: dict[str, str] | None = None) -> bool:
    """Nobody will resolve it: its switch is not running, or it is long past its deadline."""
    units = watchers() if units is None else units
    if txn.state == State.REBOOTING:  # the boot resolves it; until then it is in flight
        return now() > txn.deadline + GRACE
    return units.get(txn.watch_unit) not in ("active", "activating") or (
        now() > txn.deadline + GRACE
    )


@contextlib.contextmanager
def host_lock(paths: Paths, wait: float = FLOCK_WAIT) -> Iterator[None]:
    """Serialise changes to the record; the kernel drops it if its holder dies."""
    paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(paths.flock, flags, 0o600), "w") as handle:
        end = now() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if now() > end:
                    raise Failure(Exit.FAILED, "the host is busy (an undo is running)") from None
                time.sleep(0.1)
        yield


def token_arg(text: str) -> str:
    """Tokens name units and files: hex only."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", text):
        raise argparse.ArgumentTypeError("a token is 16 to 64 lowercase hex digits")
    return text


def ours(paths: Paths, token: str) -> Txn:
    txn = read_txn(paths)
    if txn is None or txn.token != token:
        holder = txn.holder if txn else None
        raise Failure(
            Exit.FENCED,
            "the deploy lock is no longer this transaction's"
            + (" (taken over)" if txn else " (it was released)"),
            holder=holder,
        )
    return txn


# -- switching --------------------------------------------------------------------------


def switch(system: str, action: str, unit: str | None = None) -> tuple[int, str]:
    """``system``/bin/switch-to-configuration ACTION under systemd-run, so that a lost
    session cannot kill it midway; (exit code, what it printed)."""
    unit = unit or f"fleet-switch-{os.urandom(4).hex()}"
    script = Path(system) / "bin/switch-to-configuration"
    if not script.exists():
        return 1, f"{script} does not exist"
    result = run(
        [
            tool(SYSTEMD_RUN, "systemd-run"),
            "--quiet",
            "--wait",
            "--collect",
            "--pipe",
            "--service-type=exec",
            f"--unit={unit}",
            "-E",
            "LOCALE_ARCHIVE",
            str(script),
            action,
        ]
    )
    return result.returncode, tail(result.stdout + result.stderr)


def settle(seconds: float) -> tuple[bool, list[str]]:
    """Wait for systemd's job queue to drain; (settled, failed units)."""
    end = now() + seconds
    settled = True
    while seconds > 0 and systemctl("list-jobs", "--no-legend").stdout.strip():
        if now() >= end:
            settled = False
            break
        time.sleep(SETTLE_POLL)
    return settled, failed_units()


def set_profile(paths: Paths, target: Generation) -> int | None:
    """Make ``target`` the profile's current generation; its number."""
    # By number only when that generation is the target: the caller names both.
    if target.number is not None and (target.number, target.path) in (
        (n, p) for n, _, p in generations(paths)
    ):
        argv = ["--switch-generation", str(target.number)]
    else:
        argv = ["--set", target.path]
    result = run([tool(NIX_ENV, "nix-env"), "-p", str(paths.profile), *argv])
    if result.returncode != 0:
        raise Failure(Exit.FAILED, f"nix-env {' '.join(argv)}: {last_line(result.stderr)}")
    number = current_number(paths)
    if number is None or os.path.realpath(paths.profile) != target.path:
        raise Failure(Exit.FAILED, f"the profile does not name {target.path} after nix-env")
    return number


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def root(paths: Paths, name: str, token: str, path: str) -> None:
    relink(paths.gcroots / f"{name}-{token[:16]}", path)


def set_oneshot(paths: Paths, target: Generation) -> None:
    """Boot ``target`` once at the next boot, leaving the default entry alone."""
    if paths.lab_boot.is_dir():
        relink(paths.lab_boot / "oneshot", target.path)
        return
    entry = f"nixos-generation-{target.number}.conf"
    if target.number is None or not (paths.root / "boot/loader/entries" / entry).exists():
        raise Failure(
            Exit.FAILED,
            "--reboot needs a boot loader with one-time entries (systemd-boot): "
            f"no boot entry {entry}",
        )
    result = run([tool(BOOTCTL, "bootctl"), "set-oneshot", entry])
    if result.returncode != 0:
        raise Failure(Exit.FAILED, f"bootctl set-oneshot {entry}: {last_line(result.stderr)}")


def clear_oneshot(paths: Paths) -> None:
    if paths.lab_boot.is_dir():
        (paths.lab_boot / "oneshot").unlink(missing_ok=True)
    elif Path(tool(BOOTCTL, "bootctl")).exists() or shutil.which("bootctl"):
        run([tool(BOOTCTL, "bootctl"), "set-oneshot", ""])


# -- records ----------------------------------------------------------------------------


def append_record(paths: Paths, record: dict[str, Any]) -> str | None:
    """Append one whole line, or nothing at all; the error, if the record was not written."""
    line = json.dumps(record, sort_keys=True) + "\n"
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(paths.records, flags, 0o600)
    except OSError as exc:
        return f"{paths.records}: {exc.strerror}"
    try:
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line  # a torn or foreign last line must not swallow this one
        data = line.encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(28, "short write")
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        return f"{paths.records}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def host_name() -> str:
    return os.uname().nodename


def compose(txn: Txn, result: str, new: Generation | None, phase: str | None,
            message: str | None) -> dict[str, Any]:  # fmt: skip
    record = dict(txn.base)
    record.update(
        {
            "host": record.get("host") or host_name(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "previous": txn.recorded,
            "new": new.json() if new else None,
            "result": result,
            "phase": phase,
            "message": message,
        }
    )
    return record


# -- the transaction's moves ------------------------------------------------------------


def undo(paths: Paths, txn: Txn, *, result: str, phase: str | None, message: str | None,
         settle_seconds: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """Put everything back on the recorded generation; idempotent, so a crash midway is
    finished by the next one. Runs under the host lock."""
    recorded = Generation.from_json(txn.recorded)
    assert recorded is not None
    out: dict[str, Any] = {
        "undone": True,
        "recorded": txn.recorded,
        "checks": declared_checks(recorded.path),
    }
    if txn.switch_unit:
        systemctl("stop", f"{txn.switch_unit}.service")
    if txn.mode == "reboot":
        clear_oneshot(paths)
    if txn.mode != "gc":
        running = readlink(paths.current_system)
        if txn.mode != "boot" or running != recorded.path:
            code, output = switch(recorded.path, "test")
            settled, failed = settle(settle_seconds)
            out.update(switch_exit=code, output=output, settled=settled, failed_units=failed)
        profile_now = os.path.realpath(paths.profile) if paths.profile.exists() else None
        number = current_number(paths)
        if profile_now != recorded.path or (
            recorded.number is not None and number != recorded.number
        ):
            try:
                set_profile(paths, recorded)
            except Failure as exc:
                out["profile_error"] = str(exc)
        added = added_generations(paths, txn)
        if added and "profile_error" not in out:
            out["deleted"] = added
            deleting = run([tool(NIX_ENV, "nix-env"), "-p", str(paths.profile),
                            "--delete-generations", *map(str, added)])  # fmt: skip
            if deleting.returncode != 0:
                out["profile_error"] = f"nix-env --delete-generations: {last_line(deleting.stderr)}"
        if added or boot_entry(paths) != recorded.path:  # the menu lists them no more
            code, output = switch(recorded.path, "boot")
            if code != 0:
                out["boot_error"] = f"exit {code}: {last_line(output)}"
    if txn.mode != "gc":
        out["record_error"] = append_record(paths, compose(txn, result, recorded, phase, message))
    undrain(paths, txn)
    drop_txn(paths, txn)
    return out


def undrain(paths: Paths, txn: Txn) -> None:
    """Back in rotation: what the transaction drained or weighted."""
    for service in txn.drained:
        (paths.traffic / service).unlink(missing_ok=True)


def added_generations(paths: Paths, txn: Txn) -> list[int]:
    """The generations this transaction put in the profile: newer than any before it, of its
    target, and not current (the lock kept anyone else from adding one)."""
    if txn.newest is None or txn.target is None:
        return []
    current = current_number(paths)
    return [n for n, _, p in generations(paths)
            if n > txn.newest and p == txn.target["path"] and n != current]  # fmt: skip


def finish(paths: Paths, txn: Txn) -> dict[str, Any]:
    """After the commit point: append the record and drop the lock; idempotent."""
    record = txn.record or compose(txn, "deployed", Generation.from_json(txn.target), None, None)
    error = append_record(paths, record)
    prune_secrets(paths, txn.prune)
    undrain(paths, txn)
    drop_txn(paths, txn)
    return {"finished": True, "record_error": error, "record": record}


def expire(paths: Paths, txn: Txn, why: str, settle_seconds: float = 60.0) -> dict[str, Any]:
    """What the dead-man switch does: finish a committed transaction, undo any other."""
    if txn.state == State.COMMITTED:
        return finish(paths, txn) | {"action": "finished"}
    done = undo(
        paths,
        txn,
        result="rolled-back",
        phase=txn.state,
        message=why,
        settle_seconds=settle_seconds,
    )
    return done | {"action": "undone"}


def start_watcher(paths: Paths, txn: Txn) -> None:
    release = printable(txn.holder.get("release"))  # the caller's: one line, ASCII
    env = [f"--setenv=FLEET_HOST_WATCHER={txn.token}"]
    if "FLEET_HOST_ROOT" in os.environ:
        env.append(f"--setenv=FLEET_HOST_ROOT={os.environ['FLEET_HOST_ROOT']}")
    result = run(
        [
            tool(SYSTEMD_RUN, "systemd-run"),
            "--quiet",
            f"--unit={txn.watch_unit}",
            f"--description=fleet dead-man switch of release {release}",
            "-p",
            "CollectMode=inactive-or-failed",
            "-p",
            "Restart=on-failure",
            "-p",
            "RestartSec=2",
            *env,
            txn.helper,
            "watch",
            "--token",
            txn.token,
        ]
    )
    if result.returncode != 0:
        raise Failure(Exit.FAILED, f"starting the dead-man switch: {last_line(result.stderr)}")


def printable(value: Any, limit: int = 80) -> str:
    """A caller's value as a unit's text: printable ASCII, short."""
    return re.sub(r"[^\x20-\x7e]", "?", str(value))[:limit]


def state_json(paths: Paths) -> dict[str, Any]:
    txn = read_txn(paths)
    units = watchers()
    running = readlink(paths.current_system)
    return {
        "protocol": PROTOCOL,
        "current": current_number(paths),
        "running": running,
        "booted": readlink(paths.booted_system),
        "bootEntry": boot_entry(paths),
        "generations": [list(g) for g in generations(paths)],
        "txn": txn.json() if txn else None,
        "abandoned": abandoned(txn, units) if txn else False,
        "watchers": sorted(u for u, s in units.items() if s in ("active", "activating")),
        "failedUnits": failed_units(),
        "lastRecord": last_record(paths),
        "missingSecrets": missing_secrets(running),
        "heldSecrets": undeclared_secrets(paths, []),
        "checks": declared_checks(running),
        "traffic": traffic_files(paths),
        "maintenance": maintenance(paths),
        "now": now(),
    }


def helper_path() -> str:
    return os.path.realpath(sys.argv[0])


# -- traffic ----------------------------------------------------------------------------

SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
HAPROXY_SOCKET = re.compile(r"/run/haproxy/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.sock")
AGENT_WORD = re.compile(r"drain|ready(?: (?:\d{1,3})%)?")
# HAProxy's `show stat` columns the tool reads.
STAT_FIELDS = {"pxname": "backend", "svname": "server", "status": "status", "weight": "weight",
               "scur": "sessions", "check_status": "check", "agent_status": "agent",
               "lastchg": "lastChange"}  # fmt: skip


def traffic_files(paths: Paths) -> dict[str, str]:
    """service -> what the agent answers for it, where a transaction changed it."""
    folder = paths.traffic
    found = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if SERVICE_NAME.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                found[entry.name] = entry.read_text().strip()
    return found


def maintenance(paths: Paths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.maintenance.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {"reason": "unreadable maintenance record"}  # drained all the same
    readable = isinstance(data, dict) and nesting(data) <= JSON_DEPTH
    return data if readable else {"reason": "unreadable maintenance record"}


def agent_answer(paths: Paths, request: str) -> str:
    """HAProxy's agent check asks for one service; the host answers whether it is in
    rotation. Anything unknown is "ready 100%": the balancer's own health check still
    decides whether the instance is up."""
    if maintenance(paths) is not None:
        return "drain"
    service = request.strip()
    if not SERVICE_NAME.fullmatch(service):
        return "ready 100%"
    try:
        word = (paths.traffic / service).read_text().strip()
    except OSError:
        return "ready 100%"
    return word if AGENT_WORD.fullmatch(word) else "ready 100%"


# How long a command of `fleet exec` has to end after SIGTERM before SIGKILL.
RUN_GRACE = 5.0


def cmd_run(argv: list[str]) -> int:
    """`fleet exec`'s command, ended with its session. ssh without a terminal passes no
    signal on, so the operator's Ctrl-C (or a cut link) reaches the host only as the end
    of this program's stdin, which the tool holds open (and empty) while it waits. The
    command gets /dev/null as its stdin and its own process group, which is ended as a
    whole: SIGTERM, then SIGKILL after RUN_GRACE seconds. Exit code: the command's
    (128 + N for signal N, as a shell says), or 127 when it cannot be started."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("fleet-host run: no command", file=sys.stderr)
        return Exit.USAGE
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        print(f"fleet-host run: {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    watching = True
    while child.poll() is None:
        if not watching:
            time.sleep(0.2)
            continue
        try:
            readable, _, _ = select.select([sys.stdin], [], [], 0.2)
            ended = bool(readable) and not os.read(sys.stdin.fileno(), 4096)
        except (OSError, ValueError):
            ended = True
        if ended:
            watching = False
            print("fleet-host run: the session ended: stopping the command", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(RUN_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
    code = child.returncode
    return 128 - code if code < 0 else code


def cmd_agent(paths: Paths, args: argparse.Namespace) -> None:
    """One agent check: a line in (the service), a line out. Run per connection by the
    fleet-agent socket, so that systemd, not a daemon of ours, holds the port. A balancer
    that resets the connection (a restart, say) is no failure: a failed unit per check
    would fail the host's next health check."""
    request = b""
    with contextlib.suppress(OSError):
        ready, _, _ = select.select([sys.stdin.buffer], [], [], args.timeout)
        if ready:
            request = os.read(sys.stdin.fileno(), 256)
    answer = agent_answer(paths, request.decode(errors="replace").split("\n", 1)[0])
    with contextlib.suppress(OSError):  # unbuffered: nothing left to fail at exit
        os.write(sys.stdout.fileno(), (answer + "\n").encode())


def cmd_traffic_stat(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """The balancer's view, from HAProxy's runtime API (a root-only unix socket)."""
    # Only HAProxy's runtime directory: root may connect to any socket, and whoever may
    # run this (a deploy user, through sudo) must not pick which.
    if not HAPROXY_SOCKET.fullmatch(args.socket):
        raise Failure(Exit.USAGE, f"--socket {args.socket!r}: a socket in /run/haproxy/")
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(args.timeout)
            conn.connect(str(paths._p(args.socket)))
            conn.sendall(b"show stat\n")
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise Failure(Exit.FAILED, f"{args.socket}: {exc.strerror or exc}") from exc
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise Failure(Exit.FAILED, f"{args.socket}: not HAProxy's statistics")
    header = lines[0][2:].split(",")
    rows = []
    for line in lines[1:]:
        fields = dict(zip(header, line.split(","), strict=False))
        if not line or fields.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        row: dict[str, Any] = {name: fields.get(key, "") for key, name in STAT_FIELDS.items()}
        for number in ("weight", "sessions", "lastChange"):
            row[number] = int(row[number]) if row[number].isdigit() else None
        rows.append(row)
    return {"servers": rows}


def cmd_maintenance(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Take the whole host out of rotation, or put it back: an operator's act, recorded."""
    with host_lock(paths):
        before = maintenance(paths)
        holder = json_object(args.holder or "{}", "--holder")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        kept = {k: holder[k] for k in ("operator", "reason", "release") if k in holder}
        if args.action == "on":
            record = {"time": stamp} | kept
            write_whole(paths.maintenance, json.dumps(record, sort_keys=True) + "\n", 0o644)
        else:
            paths.maintenance.unlink(missing_ok=True)
        # In the host's release records, beside its deploys: who took it out and why.
        on = args.action == "on"
        error = append_record(paths, kept | {
            "action": "drain" if on else "undrain", "host": host_name(), "time": stamp,
            "result": "drained" if on else "undrained"})  # fmt: skip
        return {"before": before, "maintenance": maintenance(paths), "record_error": error}


# -- metrics ----------------------------------------------------------------------------
# node exporter's textfile, derived from nothing but the host's own state, so that it can
# never disagree with the host. docs/transaction.md names the metrics.


@dataclass(frozen=True)
class Metric:
    """One family of the textfile: (labels, value) samples; none leaves it out whole."""

    name: str
    kind: str
    help: str
    samples: tuple[tuple[dict[str, str], float], ...]


def label_value(text: str) -> str:
    """Escaped as Prometheus's text format wants: backslash, double quote, newline."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(round(value, 3))


def exposition(metrics: list[Metric]) -> str:
    lines = []
    for metric in metrics:
        if metric.samples:
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        for labels, value in metric.samples:
            inner = ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())
            lines.append(f"{metric.name}{{{inner}}}" if inner else metric.name)
            lines[-1] += f" {sample_value(value)}"
    return "\n".join(lines) + "\n"


def epoch(text: Any) -> float | None:
    """A record's ISO 8601 time in seconds since the epoch (no zone: UTC)."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return calendar.timegm(when.utctimetuple()) + when.microsecond / 1e6
    except (ValueError, OverflowError):  # year 9999 in a zone west of UTC, say
        return None


def changes_system(record: dict[str, Any]) -> bool:
    """A release record of a change of system: a drain or an undrain changes none."""
    return record.get("action") not in ("drain", "undrain")


def rolled_back(record: dict[str, Any]) -> bool:
    return record.get("action") == "rollback" or record.get("result") == "rolled-back"


@dataclass
class Releases:
    """What the release records say, newest of each kind."""

    last: dict[str, Any] | None = None  # of a change of system
    success: dict[str, Any] | None = None  # result deployed
    rollback: dict[str, Any] | None = None
    rollbacks: int = 0


# What the metrics keep of a record: never its message or its operator.
KEPT = ("release", "action", "result", "time", "timings")


def fold(found: Releases, record: dict[str, Any] | None) -> None:
    if record is None:
        return
    kept = {k: record[k] for k in KEPT if k in record}
    if changes_system(record):
        found.last = kept
    if record.get("result") == "deployed":
        found.success = kept
    if rolled_back(record):
        found.rollbacks += 1
        found.rollback = kept


def releases(paths: Paths) -> Releases:
    """What the records say, read on from where the last reading stopped (kept beside the
    metrics, the one folder their writer may write): the log only grows, by whole lines,
    and a host deployed for years must not parse all of it at every step."""
    seen = paths.metrics.with_name(".releases-read.json")
    try:
        size, inode = paths.records.stat().st_size, paths.records.stat().st_ino
    except OSError:
        return Releases()
    try:
        with paths.records.open("rb") as log:
            found, offset = resumed(seen, log, inode, size)
            log.seek(offset)
            data = log.read()
    except OSError:
        return Releases()
    whole = data.rfind(b"\n") + 1  # a line still being appended is read next time
    if whole == 0:
        return found
    for line in data[:whole].decode(errors="replace").splitlines():
        fold(found, parse_record(line))
    if seen.parent.is_dir():  # made by write_metrics, readable by the node exporter
        end = offset + whole
        mark = data[max(0, whole - 64) : whole].hex()
        text = json.dumps({"inode": inode, "offset": end, "mark": mark, "releases": asdict(found)})
        with contextlib.suppress(OSError):
            publish(seen, text)
    return found


def resumed(seen: Path, log: IO[bytes], inode: int, size: int) -> tuple[Releases, int]:
    """Where the last reading of this very log stopped, and what it had found: checked by
    the file's inode and the bytes just before that point, else the start."""
    try:
        saved = json.loads(seen.read_text())
        offset, mark, kept = saved["offset"], saved["mark"], saved["releases"]
        ok = saved["inode"] == inode and isinstance(offset, int) and 0 < offset <= size
        found = Releases(**kept) if ok and isinstance(kept, dict) else None
        bytes.fromhex(mark)
    except (OSError, ValueError, TypeError, KeyError):
        return Releases(), 0  # none yet, or unreadable
    if (
        found is None
        or not isinstance(found.rollbacks, int)
        or not all(
            r is None or isinstance(r, dict) for r in (found.last, found.success, found.rollback)
        )
    ):
        return Releases(), 0
    expected = bytes.fromhex(mark) if isinstance(mark, str) else b""
    log.seek(max(0, offset - len(expected)))
    if not expected or log.read(len(expected)) != expected:
        return Releases(), 0  # another log where the old one was
    return found, offset


def durations(record: dict[str, Any] | None) -> tuple[tuple[dict[str, str], float], ...]:
    """The phases the tool timed, from a record that has them (older ones do not)."""
    timings = record.get("timings") if record else None
    if not isinstance(timings, dict):
        return ()
    found = ((phase, number(seconds)) for phase, seconds in timings.items())
    return tuple(({"phase": str(phase)}, value) for phase, value in found if value is not None)


def number(value: Any) -> float | None:
    """A record's number as a sample; None for a bool, NaN, an infinity or an integer
    too large for a float, which no sample can say."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def lock_facts(paths: Paths, at: float) -> tuple[int, float, int]:
    """(the deploy lock held, for how many seconds, a change under way not committed)."""
    try:
        txn = read_txn(paths)
        change = txn is not None and txn.mode != "gc" and txn.state != State.COMMITTED
    except Failure:  # unreadable: it holds the lock all the same, and may hold a change
        txn, change = None, True
    if txn is None and not change:
        return 0, 0.0, 0
    began = txn.began if txn is not None and txn.began else None
    if began is None:  # a record from before `began`: it was written since the lock was taken
        try:
            began = paths.txn.stat().st_mtime
        except OSError:
            began = at
    return 1, max(0.0, at - began), int(change)


def metrics_text(paths: Paths, at: float) -> str:
    running = readlink(paths.current_system)
    found = releases(paths)
    last = found.last
    held, held_for, change = lock_facts(paths, at)

    def one(value: float | None) -> tuple[tuple[dict[str, str], float], ...]:
        return () if value is None else (({}, value),)

    info = {k: "" if last.get(k) is None else str(last.get(k))
            for k in ("release", "action", "result")} if last else {}  # fmt: skip
    return exposition([
        Metric("fleet_generation_running", "gauge", "Generation of the system profile the "
               "host runs; no sample when it runs a system in no generation.",
               one(number_of(paths, running) if running else None)),
        Metric("fleet_generation_current", "gauge", "The system profile's current generation: "
               "the one the host should run and boots.", one(current_number(paths))),
        Metric("fleet_generation_drift", "gauge", "1 when the running system is not the "
               "profile's current generation (a change under way, a --boot deploy awaiting "
               "its reboot, or a change by hand), else 0.",
               one(int(running is None or running != readlink(paths.profile)))),
        Metric("fleet_release_info", "gauge", "The newest release record of a change of "
               "system (drains left out): its release, action and result.",
               ((info, 1),) if last else ()),
        Metric("fleet_release_timestamp_seconds", "gauge", "When the newest release record "
               "of a change of system was written.",
               one(epoch(last.get("time")) if last else None)),
        Metric("fleet_last_success_timestamp_seconds", "gauge", "When the newest release "
               "record whose result is deployed was written.",
               one(epoch(found.success.get("time")) if found.success else None)),
        Metric("fleet_rollbacks_total", "counter", "Release records that rolled back: action "
               "rollback (fleet rollback) or result rolled-back (an undone change).",
               one(found.rollbacks)),
        Metric("fleet_last_rollback_timestamp_seconds", "gauge", "When the newest release "
               "record that rolled back was written.",
               one(epoch(found.rollback.get("time")) if found.rollback else None)),
        Metric("fleet_phase_duration_seconds", "gauge", "Seconds per phase of the newest "
               "release record of a change of system, as the tool timed them.",
               durations(last)),
        Metric("fleet_lock_held", "gauge", "1 while a transaction (gc included) holds the "
               "host's deploy lock, else 0.", one(held)),
        Metric("fleet_lock_held_seconds", "gauge", "How long the deploy lock has been held; "
               "0 when it is free.", one(held_for)),
        Metric("fleet_transaction_open", "gauge", "1 while a change of system is under way "
               "and not committed (the host may still undo it by itself), else 0.", one(change)),
        Metric("fleet_maintenance", "gauge", "1 while the whole host is drained for "
               "maintenance (fleet drain), else 0.", one(int(maintenance(paths) is not None))),
        Metric("fleet_metrics_timestamp_seconds", "gauge", "When fleet-host wrote these "
               "metrics.", one(at)),
    ])  # fmt: skip


def write_metrics(paths: Paths, at: float | None = None) -> Path:
    """Replace the textfile whole (a temporary file in its folder, then a rename): the
    collector never reads half of one. No fsync: the next step or the timer rewrites it."""
    text = metrics_text(paths, now() if at is None else at)
    folder = paths.metrics.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)  # node exporter reads it as a user of its own
    publish(paths.metrics, text)
    return paths.metrics


def publish(path: Path, text: str) -> None:
    """Replace a world-readable file whole (a temporary file in its folder, then a rename),
    without fsync: the next step or the timer rewrites it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refresh_metrics(paths: Paths) -> None:
    """After a step: best effort, one line on stderr at worst; the step's outcome stands."""
    try:
        write_metrics(paths)
    except Exception as exc:
        with contextlib.suppress(OSError):
            print(f"fleet-host: metrics not written: {exc}", file=sys.stderr)


def cmd_metrics(paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    return {"written": str(write_metrics(paths))}


# -- Prometheus, for the tool: asked here, so that nothing but ssh needs to be open ------

PROM_MAX = 4 << 20


def prom_get(port: int, path: str, params: dict[str, str], timeout: float) -> dict[str, Any]:
    """Prometheus's JSON answer to GET 127.0.0.1:PORT/PATH, bounded in time and size; an
    error answer fails with Prometheus's own words."""
    import http.client  # here: every other step starts without it
    import urllib.parse

    where = f"127.0.0.1:{port}{path}"
    end = time.monotonic() + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    chunks: list[bytes] = []
    try:
        target = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        conn.request("GET", target, headers={"Accept": "application/json"})
        response = conn.getresponse()
        while chunk := response.read1(65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > PROM_MAX:
                raise Failure(Exit.FAILED, f"{where}: an answer larger than {PROM_MAX >> 20} MiB")
            if time.monotonic() > end:
                raise Failure(Exit.FAILED, f"{where}: no whole answer within {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        raise Failure(Exit.FAILED, f"{where}: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        conn.close()
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise Failure(Exit.FAILED, f"{where}: HTTP {response.status}, not Prometheus's JSON")
    if response.status != 200 or data.get("status") != "success":
        why = f"{data.get('errorType', 'error')}: {data.get('error', 'no reason given')}"
        raise Failure(Exit.FAILED, f"{where}: HTTP {response.status}: {why}"[:500],
                      errorType=data.get("errorType"))  # fmt: skip
    return data


def cmd_prom_query(_paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    params = {"query": args.query} | ({"time": args.time} if args.time else {})
    return prom_get(args.port, "/api/v1/query", params, args.timeout)


def cmd_prom_alerts(_paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    return prom_get(args.port, "/api/v1/alerts", {}, args.timeout)


def port_arg(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError("a port is a number from 1 to 65535")
    return int(text)


# -- secrets ----------------------------------------------------------------------------

SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
SECRET_MAX = 1 << 20


@dataclass(frozen=True)
class Secret:
    service: str
    name: str
    data: bytes


def parse_secrets(text: str) -> list[Secret]:
    """``[{"service", "name", "data": base64}]``; names are checked here, since they
    become file names under the secrets folder."""
    raw = loads(text, "secrets", SECRETS_INPUT_MAX) if text.strip() else []
    if not isinstance(raw, list):
        raise Failure(Exit.USAGE, "secrets: expected a JSON list")
    found = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise Failure(Exit.USAGE, "secrets: expected objects")
        service, name, data = entry.get("service"), entry.get("name"), entry.get("data")
        for what, value in (("service", service), ("name", name)):
            if not isinstance(value, str) or not SECRET_NAME.fullmatch(value):
                raise Failure(Exit.USAGE, f"secrets: bad {what} {str(value)[:80]!r}")
        if not isinstance(data, str):
            raise Failure(Exit.USAGE, f"secrets: {service}/{name}: no data")
        try:
            decoded = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise Failure(Exit.USAGE, f"secrets: {service}/{name}: not base64") from exc
        if len(decoded) > SECRET_MAX:
            raise Failure(Exit.USAGE, f"secrets: {service}/{name}: larger than 1 MiB")
        found.append(Secret(str(service), str(name), decoded))
    return found


def deliver_secrets(paths: Paths, secrets: list[Secret]) -> list[str]:
    """Write the secrets that differ, each whole, root-only; the services whose changed."""
    changed: list[str] = []
    for secret in secrets:
        folder = paths.secrets / secret.service
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / secret.name
        try:
            same = path.read_bytes() == secret.data
        except FileNotFoundError:
            same = False
        if not same:
            write_whole(path, secret.data, 0o600)
            if secret.service not in changed:
                changed.append(secret.service)
    return changed


def undeclared_secrets(paths: Paths, secrets: list[Secret]) -> list[str]:
    """The delivered secrets ("service/name") that ``secrets``, the whole declaration of
    the host's uploads, no longer names."""
    kept = {f"{s.service}/{s.name}" for s in secrets}
    found = (
        f"{f.parent.name}/{f.name}"
        for f in paths.secrets.glob("*/*")
        if not f.name.startswith(".")  # write_whole's temporary files
    )
    return sorted(name for name in found if name not in kept)


def prune_secrets(paths: Paths, names: list[str]) -> None:
    """Remove secrets no system in use loads any more (best effort: a leftover is harmless)."""
    for name in names:
        service, _, secret = name.partition("/")
        if SECRET_NAME.fullmatch(service) and SECRET_NAME.fullmatch(secret):
            with contextlib.suppress(OSError):
                (paths.secrets / service / secret).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (paths.secrets / service).rmdir()  # only if empty


def manifest(system: str | None) -> dict[str, Any]:
    """The fleet manifest a system carries (its services' units, its secrets), or {}."""
    try:
        loaded = json.loads((Path(system or "/") / "etc/fleet/manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def declared_checks(system: str | None) -> list[Any] | None:
    """The health checks a system declares, from its own manifest: a generation is proven
    by its own checks, not by today's declaration. None: the system has no manifest (one
    from before the fleet, or from plain nixos-rebuild), proven by its units alone."""
    found = manifest(system)
    checks = found.get("checks") if found else None
    return checks if isinstance(checks, list) else None


def units_of(system: str | None, services: list[str]) -> list[str]:
    declared = manifest(system).get("services") or {}
    units = []
    for service in services:
        unit = (declared.get(service) or {}).get("unit") if isinstance(declared, dict) else None
        if isinstance(unit, str) and unit:
            units.append(unit)
    return units


def restart_stale(units: list[str], since: float) -> list[str]:
    """Restart the running units among ``units`` that were not (re)started since
    ``since`` (a monotonic time): a switch that restarted one already gave it its secret."""
    restarted = []
    for unit in units:
        shown = systemctl("show", "--property=ActiveState,ActiveEnterTimestampMonotonic", unit)
        props = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
        entered = int(props.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
        if props.get("ActiveState") == "active" and entered < since:
            systemctl("try-restart", unit)
            restarted.append(unit)
    return restarted


def missing_secrets(system: str | None) -> list[dict[str, str]]:
    """The running system's declared secrets that are not on the host."""
    missing = []
    for entry in manifest(system).get("secrets") or []:
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and not os.path.exists(path):
            missing.append({k: str(entry.get(k)) for k in ("service", "name", "path")})
    return missing


# -- health checks the host makes itself ------------------------------------------------
# HTTP and TCP checks reach the host's own loopback: made here, in the step that needs
# them, they cost the tool no ssh channel and no round trip of their own. A command check
# runs as the ssh user, not as root, so the tool makes those (and then every check of that
# system, concurrently, as it always did).

HTTP_MAX = 4 << 20  # read at most this much of an answer


def host_checks(raw: Any) -> list[dict[str, Any]] | None:
    """The declared checks when this host can make every one itself, else None (the tool
    makes them). No manifest: no check, the units alone prove the system."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        return None
    for check in raw:
        if not isinstance(check, dict) or check.get("type") not in ("http", "tcp"):
            return None
        numbers = (check.get("timeout"), check.get("interval"))
        port, retries = check.get("port"), check.get("retries")
        if not (
            isinstance(check.get("name"), str)
            and all(isinstance(n, (int, float)) and n >= 0 for n in numbers)
            and isinstance(port, int) and 0 < port < 65536
            and isinstance(retries, int) and retries >= 1
        ):  # fmt: skip
            return None
        if check["type"] == "http" and not (
            isinstance(check.get("path"), str)
            and isinstance(check.get("expectStatus"), int)
            and isinstance(check.get("expectBody"), (str, type(None)))
        ):
            return None
    return raw


def probe_http(check: dict[str, Any]) -> tuple[bool, str]:
    """GET 127.0.0.1:PORT/PATH as the tool's own probe asks it; its verdict, in its words."""
    port, timeout = check["port"], float(check["timeout"])
    request = http_request(check["path"], port)
    end = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(request)
            while size < HTTP_MAX:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                conn.settimeout(left)
                data = conn.recv(65536)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
    except TimeoutError:
        return False, f"no answer within {timeout:g} s"
    except OSError as exc:
        return False, f"127.0.0.1:{port}: {exc.strerror or exc}"
    out = b"".join(chunks)
    if not out:
        return False, "connection closed without an answer"
    return http_verdict(out, check["expectStatus"], check.get("expectBody"))


def http_request(path: str, port: int) -> bytes:
    """An HTTP check's request: the same whether the host or the tool sends it."""
    return (
        f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
        "User-Agent: fleet\r\nConnection: close\r\n\r\n"
    ).encode()


def http_verdict(out: bytes, status: int, body: str | None) -> tuple[bool, str]:
    """An HTTP check's verdict on the whole answer ``out``: the status, and the body
    holding ``body`` when one is expected."""
    head, _, content = out.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return False, f"not an HTTP answer: {status_line[:80]!r}"
    got = int(parts[1])
    if got != status:
        return False, f"HTTP {got}, expected {status}"
    if body and body not in content.decode(errors="replace"):
        return False, f"HTTP {got} but the body lacks {body!r}"
    return True, f"HTTP {got}"


def probe_tcp(check: dict[str, Any]) -> tuple[bool, str]:
    try:
        with socket.create_connection(("127.0.0.1", check["port"]), timeout=check["timeout"]):
            return True, "connected"
    except OSError as exc:
        return False, f"127.0.0.1:{check['port']}: {exc.strerror or exc}"


def run_check(check: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Retry until it passes, runs out of retries, or the next try would start after the
    deadline (a monotonic time): the tool's own rule."""
    probe = probe_http if check["type"] == "http" else probe_tcp
    message = "not attempted"
    for attempt in range(1, check["retries"] + 1):
        ok, message = probe(check)
        if ok or attempt == check["retries"] or time.monotonic() + check["interval"] > deadline:
            return {"name": check["name"], "ok": ok, "attempts": attempt, "message": message}
        time.sleep(check["interval"])
    return {"name": check["name"], "ok": False, "attempts": check["retries"], "message": message}


def run_checks(checks: list[dict[str, Any]], deadline: float) -> dict[str, Any]:
    """Every check at once; the verdict and each check's result, in declaration order."""
    import threading  # here: only the steps that check health need it

    started = time.monotonic()
    results: list[dict[str, Any]] = [{}] * len(checks)

    def one(index: int) -> None:
        results[index] = run_check(checks[index], deadline)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(checks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "ok": all(r.get("ok") for r in results),
        "checks": results,
        "seconds": round(time.monotonic() - started, 3),
    }


def prove_running(paths: Paths, seconds: float) -> dict[str, Any]:
    """What the tool asks of a system that runs already: systemd settled within
    ``seconds`` with no failed unit, then the system's own checks, within the same time.
    ``health`` is None when the tool must make the checks itself."""
    deadline = time.monotonic() + seconds
    running = readlink(paths.current_system)
    declared = declared_checks(running)
    settled, failed = settle(seconds)
    out: dict[str, Any] = {"settled": settled, "failedUnits": failed, "checks": declared}
    checks = host_checks(declared)
    if checks is not None and settled and not failed:
        out["health"] = run_checks(checks, deadline)
    return out


# -- who may ask for what --------------------------------------------------------------

# Nix's own variable; sudo's reset environment never carries a deploy user's value.
STORE_DIR = os.environ.get("NIX_STORE_DIR", "/nix/store")
# What only the host itself runs: the dead-man switch (from its transient unit) and the
# boot recovery (from its unit at boot).
INTERNAL = ("watch", "boot")


def caller_uid() -> int:
    """The user who asked: the deploy user when sudo ran us, else whoever we run as.

    sudo sets SUDO_UID itself, and the host's sudo rule lets no caller set the environment.
    """
    sudo_uid = os.environ.get("SUDO_UID", "")
    return int(sudo_uid) if sudo_uid.isdigit() else os.getuid()


def check_trusted(paths: Paths, target: str) -> None:
    """A deploy user other than root may only switch to a system root could have chosen:
    a generation of the system profile, or a store path signed by a key Nix trusts.

    Any local user can build a store path with a ``bin/switch-to-configuration`` of their
    own, so that a path is in the store proves nothing; its signature does (docs/security.md).
    """
    if caller_uid() == 0:
        return
    if target in (p for _, _, p in generations(paths)):
        return
    store = os.path.dirname(target)
    if store != STORE_DIR or os.path.realpath(target) != target:
        raise Failure(Exit.USAGE, f"{target!r} is not a path in {STORE_DIR}")
    nix = [tool(NIX, "nix"), "--extra-experimental-features", "nix-command"]
    # Nix counts a content-addressed path as valid whoever added it (`nix-store --add`
    # needs no trust), so only an input-addressed system's signatures say who made it.
    info = run([*nix, "path-info", "--json", "--", target], timeout=120)
    try:
        found = json.loads(info.stdout) if info.returncode == 0 else None
    except ValueError:
        found = None
    entries = list(found.values()) if isinstance(found, dict) else found
    if not entries or not isinstance(entries[0], dict):
        raise Failure(Exit.FAILED, f"{target}: cannot read its store information")
    signed = not entries[0].get("ca") and (
        run(
            [*nix, "store", "verify", "--no-contents", "--sigs-needed", "1", "--", target],
            timeout=120,
        ).returncode
        == 0
    )
    if not signed:
        raise Failure(
            Exit.FAILED,
            f"{target} is signed by no key this host trusts; a deploy user other than root "
            "may only switch to signed systems or to generations of the system profile",
        )


# -- subcommands ------------------------------------------------------------------------


def cmd_state(paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    return state_json(paths)


def cmd_begin(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """begin; with ``--activate``, the activation right after it, in the same call (nothing
    happens between them unless the tool drains first); with ``--checks``, the checks of
    the system activated, or of the running one when there is nothing to change."""
    if (args.activate or args.checks) and args.health is None:
        raise Failure(Exit.USAGE, "--activate and --checks need --health")
    if args.activate and args.confirm_timeout is None:
        raise Failure(Exit.USAGE, "--activate needs --confirm-timeout")
    started = time.monotonic()
    out = begin(paths, args)
    if out.get("noop"):
        if args.checks:
            out |= prove_running(paths, args.health)
        return out
    out["seconds"] = round(time.monotonic() - started, 3)
    if args.activate:
        begun = {"begun": True, "recorded": out.get("recorded")}
        try:
            out["activation"] = activate(
                paths, args.token, args.health, args.confirm_timeout, args.checks
            )
        except Failure as exc:
            exc.extra.update(begun)
            raise
        except OSError as exc:
            why = f"{exc.filename or ''}: {exc.strerror or exc}"
            raise Failure(Exit.FAILED, f"activation: {why}", **begun) from exc
    return out


def begin(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    holder = json_object(args.holder, "--holder")
    base = json_object(args.base, "--base") if args.base else {}
    secrets = parse_secrets(read_input("secrets", SECRETS_INPUT_MAX)) if args.secrets else []
    target = Generation(args.generation, args.target) if args.target else None
    out: dict[str, Any] = {}
    with host_lock(paths):
        existing = read_txn(paths)
        refuse_held_token(existing, args.token)
        inherited: Txn | None = None
        if (
            existing is not None
            and args.take_over
            and existing.state != State.COMMITTED
            and existing.mode != "gc"
            and not abandoned(existing)
        ):
            # Taken over: its recorded generation stays the rollback target. Its switch,
            # if still running, finishes first (switch-to-configuration serialises itself).
            inherited = existing
        else:
            out.update(resolve_existing(paths, args.take_over))
        if target is not None and not (Path(target.path) / "bin/switch-to-configuration").exists():
            raise Failure(Exit.FAILED, f"{target.path} is not on the host (was it collected?)")
        if target is not None:
            check_trusted(paths, target.path)
        running = readlink(paths.current_system)
        if running is None:
            raise Failure(Exit.FAILED, "the host runs no system (/run/current-system)")
        if (
            inherited is None
            and target is not None
            and args.mode == "switch"
            and running == target.path
            and os.path.realpath(paths.profile) == target.path
        ):
            # Nothing to switch; a rotated secret still reaches the units that load it.
            changed = deliver_secrets(paths, secrets)
            restarted = restart_stale(units_of(running, changed), since=float("inf"))
            if args.secrets:
                prune_secrets(paths, undeclared_secrets(paths, secrets))
            checks = declared_checks(running)
            here = {"path": running, "number": number_of(paths, running)}
            return out | {"noop": True, "restarted": restarted, "checks": checks, "running": here}
        changed = deliver_secrets(paths, secrets)
        # Removed once the new system is committed, when no running system loads them (a
        # `boot` leaves them for the system that runs until the reboot).
        prune = undeclared_secrets(paths, secrets) if args.secrets and args.mode != "boot" else []
        recorded = (
            inherited.recorded
            if inherited is not None
            else {"path": running, "number": number_of(paths, running)}
        )
        txn = Txn(
            token=args.token,
            holder=holder,
            mode=args.mode,
            recorded=recorded,
            target=target.json() if target else None,
            state=State.BEGUN,
            deadline=now() + args.deadline,
            confirm=args.confirm,
            helper=helper_path(),
            base=base,
            taken_over=[*inherited.taken_over, inherited.token] if inherited else [],
            boot_id=boot_id(paths),
            # A switch restarts what loads a changed secret; a boot or reboot starts anew.
            restart=units_of(target.path, changed) if target and args.mode == "switch" else [],
            prune=prune,
            newest=(
                inherited.newest
                if inherited is not None and inherited.newest is not None
                else max((n for n, _, _ in generations(paths)), default=0)
            ),
            # A boot changes nothing that runs: nothing to take out of rotation.
            drained=sorted(
                set(inherited.drained if inherited else [])
                | (set(args.drain) if args.mode != "boot" else set())
            ),
            began=now(),
        )
        write_txn(paths, txn)
        for service in txn.drained:  # after the record names them: undo finds them all
            write_whole(paths.traffic / service, "drain\n", 0o644)
        try:
            try:
                root(paths, "recorded", txn.token, str(recorded["path"]))
                if target is not None:
                    root(paths, "target", txn.token, target.path)
            except OSError as exc:
                raise Failure(Exit.FAILED, f"rooting the systems: {exc}") from exc
            # A taken-over transaction's switch keeps running until this one's runs: the
            # change it guards is never left without one.
            start_watcher(paths, txn)
        except Failure:
            unbegin(paths, txn, inherited)
            raise
        if inherited is not None:
            systemctl("stop", "--no-block", f"{inherited.watch_unit}.service")
            for name in ("recorded", "target"):  # rooted under the new token now
                (paths.gcroots / f"{name}-{inherited.token[:16]}").unlink(missing_ok=True)
            why = f"taken over by release {holder.get('release')}"
            append_record(paths, compose(inherited, "taken-over", None, inherited.state, why))
        return out | {"begun": True, "recorded": recorded}


def unbegin(paths: Paths, txn: Txn, inherited: Txn | None) -> None:
    """A begin that could not root its systems or arm its switch leaves the host as it
    found it: no lock of its own, nothing drained by it, and a transaction it was taking
    over held again as it was, its own switch still armed to undo its change."""
    kept = set(inherited.drained) if inherited is not None else set()
    for service in set(txn.drained) - kept:
        (paths.traffic / service).unlink(missing_ok=True)
    if inherited is None:
        drop_txn(paths, txn)
        return
    write_txn(paths, inherited)
    for name in ("recorded", "target"):
        (paths.gcroots / f"{name}-{txn.token[:16]}").unlink(missing_ok=True)
    systemctl("stop", "--no-block", f"{txn.watch_unit}.service")


def refuse_held_token(existing: Txn | None, token: str) -> None:
    """A new transaction's token must be new: one that names the held transaction's
    dead-man switch and roots would take them over as its own, or stop them."""
    if existing is not None and existing.token[:16] == token[:16]:
        raise Failure(
            Exit.HELD,
            "the deploy lock is held under this token: a new transaction needs a new one",
            holder=existing.holder,
            deadline=existing.deadline,
        )


def activate(paths: Paths, token: str, health: float, confirm: float,
             checks: bool = False) -> dict[str, Any]:  # fmt: skip
    """``switch-to-configuration test`` of the transaction's target, settle; with
    ``checks``, then the new system's own checks (when the host can make them all), within
    the health timeout from the start of activation."""
    with host_lock(paths):
        txn = ours(paths, token)
        if txn.state not in (State.BEGUN, State.ACTIVATED) or txn.target is None:
            raise Failure(Exit.FAILED, f"cannot activate in state {txn.state}")
        txn.state = State.ACTIVATING
        txn.deadline = now() + health + confirm
        txn.switch_unit = f"fleet-switch-{os.urandom(4).hex()}"
        write_txn(paths, txn)
    started, since = now(), time.monotonic()
    code, output = switch(txn.target["path"], "test", txn.switch_unit)
    restarted = restart_stale(txn.restart, since) if code == 0 else []
    settled, failed = settle(max(1.0, health - (now() - started)))
    with host_lock(paths):
        current = read_txn(paths)
        if current is None or current.token != txn.token:
            raise Failure(
                Exit.EXPIRED,
                "the dead-man switch fired during activation",
                switch_exit=code,
                output=output,
            )
        current.state = State.ACTIVATED
        current.switch_unit = None
        write_txn(paths, current)
    declared = declared_checks(txn.target["path"])
    out = {
        "switchExit": code,
        "output": output,
        "settled": settled,
        "failedUnits": failed,
        "deadline": current.deadline,
        "started": started,
        "restarted": restarted,
        "checks": declared,
        "seconds": round(time.monotonic() - since, 3),
    }
    runnable = host_checks(declared) if checks else None
    if runnable is not None and code == 0 and settled and not failed:
        out["health"] = run_checks(runnable, since + health)
    return out


def cmd_activate(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    return activate(paths, args.token, args.health, args.confirm, args.checks)


def cmd_weight(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """A canary's share of traffic: the activated new system gets the weights given per
    drained service ("drain" takes it out again), until the transaction ends. The hold is
    the host's to bound: its deadline moves to now + hold + the confirm time."""
    weights = loads(args.weights, "--weights")
    if not isinstance(weights, dict):
        raise Failure(Exit.USAGE, "--weights: a JSON object of service -> percent or drain")
    with host_lock(paths):
        txn = ours(paths, args.token)
        if txn.state != State.ACTIVATED:
            raise Failure(Exit.FAILED, f"cannot weigh a transaction in state {txn.state}")
        for service, weight in weights.items():
            if service not in txn.drained:
                raise Failure(Exit.USAGE, f"{service!r} is not drained by this transaction")
            percent = isinstance(weight, int) and not isinstance(weight, bool)
            if weight != "drain" and not (percent and 1 <= weight <= 100):
                raise Failure(Exit.USAGE, f"{service}: weight {weight!r}: 1 to 100, or drain")
        txn.deadline = now() + args.hold + txn.confirm
        write_txn(paths, txn)
        for service, weight in weights.items():
            word = "drain" if weight == "drain" else f"ready {weight}%"
            write_whole(paths.traffic / service, word + "\n", 0o644)
        return {"deadline": txn.deadline, "weights": weights}


def cmd_commit(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    record = json_object(read_input("the record") or "{}", "the record")
    with host_lock(paths):
        txn = ours(paths, args.token)
        if now() > txn.deadline and txn.state != State.COMMITTED:
            done = undo(
                paths,
                txn,
                result="rolled-back",
                phase="confirm",
                message="not confirmed before its deadline",
            )
            raise Failure(Exit.EXPIRED, "the deadline passed: the host undid the change", **done)
        target = Generation.from_json(txn.target)
        assert target is not None
        wanted = {"switch": State.ACTIVATED, "boot": State.BEGUN, "reboot": State.BOOTED}
        if txn.state != State.COMMITTED:
            if txn.state != wanted.get(txn.mode):
                raise Failure(Exit.FAILED, f"cannot commit a {txn.mode} in state {txn.state}")
            try:
                number = set_profile(paths, target)
                if txn.mode != "reboot" or readlink(paths.current_system) == target.path:
                    code, output = switch(target.path, "boot")
                    if code != 0:
                        raise Failure(
                            Exit.FAILED,
                            f"boot entry not installed (exit {code}): {last_line(output)}",
                        )
                new = Generation(number, target.path)
                # The tool may call a committed switch a rollback (a fleet-wide revert) and
                # name what ran before the release; the host fills in what it knows.
                asked = record.get("result")
                result = (
                    "pending-reboot"
                    if txn.mode == "boot"
                    else asked
                    if asked in ("deployed", "rolled-back")
                    else "deployed"
                )
                txn.record = compose(txn, result, new, None, None) | record | {
                    "new": new.json(), "result": result}  # fmt: skip
                txn.record.setdefault("previous", txn.recorded)
                txn.state = State.COMMITTED
                txn.deadline = now() + txn.confirm
                write_txn(paths, txn)  # the commit point
            except (Failure, OSError) as exc:
                txn.state = State.ACTIVATED
                done = undo(paths, txn, result="rolled-back", phase="persist", message=str(exc))
                raise Failure(Exit.FAILED, f"not persisted: {exc}", **done) from exc
        done = finish(paths, txn)
        return {"committed": True, "new": txn.record["new"] if txn.record else None} | done


def cmd_undo(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    record = json_object(read_input("the record") or "{}", "the record")
    with host_lock(paths):
        txn = ours(paths, args.token)
        if txn.state == State.COMMITTED:
            raise Failure(Exit.FAILED, "the transaction is committed; roll back instead")
        kept = ("phase", "message", "timings")  # the tool's view of what failed, and when
        txn.base = txn.base | {k: v for k, v in record.items() if k in kept}
        return undo(
            paths,
            txn,
            result="rolled-back",
            phase=record.get("phase"),
            message=record.get("message"),
            settle_seconds=args.settle,
        )


def cmd_reboot(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Put the target in the profile, boot it once, and reboot; the default entry stays."""
    with host_lock(paths):
        txn = ours(paths, args.token)
        target = Generation.from_json(txn.target)
        if txn.mode != "reboot" or target is None or txn.state != State.BEGUN:
            raise Failure(Exit.FAILED, f"cannot reboot a {txn.mode} in state {txn.state}")
        try:
            number = set_profile(paths, target)
            recorded = Generation.from_json(txn.recorded)
            assert recorded is not None
            code, output = switch(recorded.path, "boot")  # entries for all, default recorded
            if code != 0:
                raise Failure(
                    Exit.FAILED, f"boot entries not installed (exit {code}): {last_line(output)}"
                )
            target = Generation(number, target.path)
            set_oneshot(paths, target)
        except Failure as exc:
            done = undo(paths, txn, result="rolled-back", phase="reboot", message=str(exc))
            raise Failure(Exit.FAILED, str(exc), **done) from exc
        txn.target = target.json()
        txn.state = State.REBOOTING
        txn.deadline = now() + args.boot_timeout
        write_txn(paths, txn)
    systemctl("reboot", "--no-block")
    return {"rebooting": True, "deadline": txn.deadline}


def cmd_watch(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    while True:
        txn = read_txn(paths)
        if txn is None or txn.token != args.token or txn.state == State.REBOOTING:
            return {"watching": False}
        remaining = txn.deadline - now()
        if remaining > 0:
            time.sleep(min(WATCH_POLL, remaining))
            continue
        with host_lock(paths):
            txn = read_txn(paths)
            if txn is None or txn.token != args.token or now() < txn.deadline:
                continue
            return expire(paths, txn, "not confirmed before its deadline")


def cmd_recover(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    with host_lock(paths):
        txn = read_txn(paths)
        if txn is None:
            # Drains and weights belong to transactions: with none, nothing holds them.
            orphans = sorted(traffic_files(paths))
            for service in orphans:
                (paths.traffic / service).unlink(missing_ok=True)
            return {"recovered": None, "undrained": orphans}
        if not args.force and not abandoned(txn) and txn.state != State.COMMITTED:
            raise Failure(
                Exit.HELD,
                "a live transaction holds the lock",
                holder=txn.holder,
                deadline=txn.deadline,
            )
        return {"recovered": expire(paths, txn, "recovered: " + (args.why or "abandoned"))}


def cmd_boot(paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    """At boot: a reboot transaction that booted its target waits for its proof; anything
    else a crash left is undone before its commit point and finished after it."""
    with host_lock(paths):
        txn = read_txn(paths)
        if txn is None:
            return {"recovered": None}
        if txn.boot_id == boot_id(paths):
            # Started again in the same boot (a switch starts it if it is not active):
            # this boot's transactions belong to their holders.
            return {"recovered": None, "live": txn.token[:16]}
        booted = readlink(paths.booted_system) or readlink(paths.current_system)
        target = Generation.from_json(txn.target)
        if txn.mode == "reboot" and txn.state == State.REBOOTING:
            if target is not None and booted == target.path:
                txn.state = State.BOOTED
                txn.boot_id = boot_id(paths)
                txn.deadline = now() + txn.confirm
                write_txn(paths, txn)
                start_watcher(paths, txn)
                return {"awaiting": "confirmation", "deadline": txn.deadline}
            why = "the one-time boot of the new generation did not happen"
            return {"recovered": expire(paths, txn, why, settle_seconds=0)}  # fmt: skip
        # At boot the queue holds this very unit's job and those that wait on it: the
        # switch's own blocking start is the settling there is.
        why = "the host restarted during the change"
        return {"recovered": expire(paths, txn, why, settle_seconds=0)}


def cmd_gc(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Delete generations and collect garbage under the deploy lock (a transaction with
    nothing to undo); the running, booted, current and boot-default systems stay."""
    holder = json_object(args.holder, "--holder")
    out: dict[str, Any] = {}
    with host_lock(paths):
        refuse_held_token(read_txn(paths), args.token)
        out.update(resolve_existing(paths, args.take_over))
        running = readlink(paths.current_system)
        txn = Txn(
            token=args.token,
            holder=holder,
            mode="gc",
            recorded={"path": running or "", "number": current_number(paths)},
            target=None,
            state=State.BEGUN,
            deadline=now() + args.deadline,
            confirm=0.0,
            helper=helper_path(),
            began=now(),
        )
        write_txn(paths, txn)
        start_watcher(paths, txn)
    try:
        protected = {
            current_number(paths),
            *(n for n, _, p in generations(paths)
              if p in (running, readlink(paths.booted_system), boot_entry(paths))),
        }  # fmt: skip
        victims = [n for n in args.delete if n not in protected]
        if victims:
            result = run(
                [
                    tool(NIX_ENV, "nix-env"),
                    "-p",
                    str(paths.profile),
                    "--delete-generations",
                    *map(str, victims),
                ]
            )
            if result.returncode != 0:
                raise Failure(
                    Exit.FAILED, f"nix-env --delete-generations: {last_line(result.stderr)}"
                )
        collected = run([tool(NIX_STORE, "nix-store"), "--gc"])
        if collected.returncode != 0:
            raise Failure(Exit.FAILED, f"nix-store --gc: {last_line(collected.stderr)}")
    finally:
        with host_lock(paths):
            if (current := read_txn(paths)) is not None and current.token == txn.token:
                drop_txn(paths, current)
    kept = sorted(p for p in protected if p is not None)
    summary = last_line(collected.stdout + collected.stderr)
    return out | {"deleted": victims, "kept": kept, "summary": summary}


def resolve_existing(paths: Paths, take_over: bool) -> dict[str, Any]:
    """Before a new transaction: finish a committed one, undo an abandoned one (or a live
    one, when told to take over a gc); refuse a live one."""
    existing = read_txn(paths)
    if existing is None:
        return {}
    if existing.state == State.COMMITTED:
        return {"recovered": finish(paths, existing) | {"action": "finished"}}
    if abandoned(existing) or (take_over and existing.mode == "gc"):
        return {"recovered": expire(paths, existing, "abandoned by its holder")}
    raise Failure(
        Exit.HELD, "the deploy lock is held", holder=existing.holder, deadline=existing.deadline
    )


def cmd_records(paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    lines = read_lines(paths.records)
    parsed = [parse_record(line) for line in lines]
    return {"records": [r for r in parsed if r is not None],
            "unreadable": sum(1 for r in parsed if r is None)}  # fmt: skip


def cmd_record(paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    text = read_input("the record")
    try:
        record = json_object(text, "the record")
    except Failure as exc:
        raise Failure(Exit.USAGE, f"a record is one JSON object on stdin ({exc})") from None
    return {"recordError": append_record(paths, record)}


def cmd_health(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    return prove_running(paths, args.seconds)


def cmd_settle(_paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    settled, failed = settle(args.seconds)
    return {"settled": settled, "failedUnits": failed}


def cmd_probe_tcp(_paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """A TCP check made here, on the host: a connection proven, not inferred from a timer."""
    try:
        with socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout):
            return {"connected": True}
    except OSError as exc:
        raise Failure(Exit.FAILED, f"127.0.0.1:{args.port}: {exc.strerror or exc}") from exc


# A binary cache's address as the inventory gives it: the tool passes it, the host asks it.
CACHE_URL = re.compile(r"http://[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}")
# A store path's name: Nix's base-32 hash, a dash, a name of Nix's characters.
STORE_NAME = re.compile(r"[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]{1,211}")
# A path in the manifest that goes into a store URL (``file://DIR?secret-key=FILE``).
SAFE_URL_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
# "these 3 paths will be fetched (0.52 MiB download, 2.01 MiB unpacked):", or "this path
# will be fetched (...)" (every Nix).
_WILL_FETCH = re.compile(
    r"(?:these (\d+) paths|this path) will be fetched \(([0-9.]+) MiB download"
)
FETCH_TIMEOUT = 1800.0


def store_path_arg(value: str) -> str:
    """A top-level store path, as Nix prints it: these reach Nix's command line."""
    name = os.path.basename(value)
    if (
        os.path.dirname(value) != STORE_DIR
        or not STORE_NAME.fullmatch(name)
        or ".." in value.split("/")
    ):
        raise argparse.ArgumentTypeError(f"{value!r} is not a path in {STORE_DIR}")
    return value


def output_path_arg(value: str) -> str:
    """A store path to substitute: never a derivation, which Nix would build (as root)."""
    if store_path_arg(value).endswith(".drv"):
        raise argparse.ArgumentTypeError(f"{value!r} is a derivation, not a system")
    return value


def cache_url_arg(value: str) -> str:
    if not CACHE_URL.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a binary cache's http://HOST:PORT")
    return value


def cmd_fetch(_paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Substitute a closure from the fleet's binary cache, and say what came from it.

    Only that cache is asked, with a short connect timeout, and a miss is not remembered
    (a path pushed a moment ago must be found); what it does not hold is the tool's to
    copy directly, so any failure is reported, never worked around here.
    """
    store = tool(NIX_STORE, "nix-store")
    options = ["--option", "substituters", args.cache,
               "--option", "narinfo-cache-negative-ttl", "0",
               "--option", "connect-timeout", "5",
               "--option", "download-attempts", "1",
               "--option", "fallback", "false"]  # fmt: skip
    started = now()
    try:
        # One Nix process: a path already valid is a no-op; one the cache cannot serve
        # (unreachable, or lacking part of the closure) fails at once, nothing built.
        fetched = run([store, "--realise", *options, "--", args.path], timeout=FETCH_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        why = f"no fetch from {args.cache} within {FETCH_TIMEOUT:g} s"
        raise Failure(Exit.FAILED, why) from exc
    if fetched.returncode != 0:
        raise Failure(Exit.FAILED, f"from {args.cache}: {last_line(fetched.stderr)}")
    found = _WILL_FETCH.search(fetched.stderr)
    return {
        "fetched": int(found.group(1) or 1) if found else 0,
        "downloadBytes": round(float(found.group(2)) * 1024 * 1024) if found else 0,
        "seconds": round(now() - started, 3),
    }


def cmd_publish(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Add closures of this host's store to the binary cache it serves, signed with its key.

    Where the cache lives and which key signs are the running system's (its manifest's
    ``cache``), never the caller's: nothing a deploy user passes picks a file root reads.
    """
    settings = manifest(str(paths.current_system)).get("cache")
    if not isinstance(settings, dict):
        raise Failure(Exit.USAGE, "this host's system serves no binary cache")
    directory, key = str(settings.get("directory", "")), str(settings.get("secretKeyFile", ""))
    for value in (directory, key):
        if not value.startswith("/") or not SAFE_URL_PATH.fullmatch(value):
            raise Failure(Exit.FAILED, f"the manifest's cache path {value!r} is not usable")
    if not Path(key).is_file():
        raise Failure(Exit.FAILED, f"the cache's signing key {key} is missing")
    store = tool(NIX_STORE, "nix-store")
    invalid = run([store, "--check-validity", "--print-invalid", "--", *args.paths])
    missing = invalid.stdout.split()
    if missing:
        raise Failure(Exit.FAILED, f"not in this host's store: {', '.join(missing)}")
    nix = [tool(NIX, "nix"), "--extra-experimental-features", "nix-command"]
    if caller_uid() != 0:
        # The cache's signature makes a path trusted on every host: a deploy user may only
        # have it put on what a trusted key signed already (check_trusted), closures whole.
        verify = [*nix, "store", "verify", "--no-contents", "--recursive", "--sigs-needed", "1"]
        if run([*verify, "--", *args.paths], timeout=600).returncode != 0:
            raise Failure(
                Exit.FAILED,
                "a path is signed by no key this host trusts; a deploy user other than root "
                "may only publish signed closures",
            )
    target = f"file://{directory}?secret-key={key}&compression=zstd"
    started = now()
    copied = run([*nix, "copy", "--to", target, "--", *args.paths], timeout=FETCH_TIMEOUT)
    if copied.returncode != 0:
        raise Failure(Exit.FAILED, f"nix copy to {directory}: {last_line(copied.stderr)}")
    return {"published": len(args.paths), "seconds": round(now() - started, 3)}


def cmd_version(_paths: Paths, _args: argparse.Namespace) -> dict[str, Any]:
    return {"protocol": PROTOCOL}


def service_arg(value: str) -> str:
    if not SERVICE_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a service name")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fleet-host", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help)

    command("state", "everything the tool reads about this host")
    command("version", "the protocol version")
    command("records", "the release records, oldest first")
    command("record", "append one release record (JSON on stdin)")
    command("boot", "resolve what a crash left (run at every boot)")
    probe = command("probe-tcp", "connect to 127.0.0.1:PORT (a TCP health check)")
    probe.add_argument("--port", type=port_arg, required=True)
    probe.add_argument("--timeout", type=seconds_arg, default=5.0)
    settle_ = command("settle", "wait for systemd's jobs; report failed units")
    settle_.add_argument("--seconds", type=seconds_arg, default=30.0)
    begin = command("begin", "take the lock, record the running system, arm the switch")
    begin.add_argument("--token", required=True, type=token_arg)
    begin.add_argument("--holder", required=True, help="JSON: release, operator, action")
    begin.add_argument("--base", default="", help="JSON: fields of the release records")
    begin.add_argument("--mode", choices=MODES[:3], required=True)
    begin.add_argument("--target", required=True)
    begin.add_argument("--generation", type=int, help="an existing generation to go back to")
    begin.add_argument("--deadline", type=seconds_arg, required=True, help="seconds to activation")
    begin.add_argument("--confirm", type=seconds_arg, required=True)
    begin.add_argument("--take-over", action="store_true")
    begin.add_argument(
        "--secrets", action="store_true", help="deliver the secrets given as JSON on stdin"
    )
    begin.add_argument(
        "--drain", action="append", default=[], type=service_arg,
        help="a service to take out of rotation until the transaction ends",
    )  # fmt: skip
    begin.add_argument("--activate", action="store_true", help="then activate, at once")
    begin.add_argument(
        "--health", type=seconds_arg, help="the health timeout (--activate, --checks)"
    )
    begin.add_argument("--confirm-timeout", type=seconds_arg, help="activation's confirm timeout")
    begin.add_argument("--checks", action="store_true", help="then make the system's checks")
    activate_ = command("activate", "switch-to-configuration test, settle, report")
    activate_.add_argument("--token", required=True, type=token_arg)
    activate_.add_argument("--health", type=seconds_arg, required=True)
    activate_.add_argument("--confirm", type=seconds_arg, required=True)
    activate_.add_argument("--checks", action="store_true", help="then make its checks")
    health = command("health", "settle, failed units, the running system's checks")
    health.add_argument("--seconds", type=seconds_arg, default=30.0)
    commit = command("commit", "profile, boot entry, commit, record, unlock")
    commit.add_argument("--token", required=True, type=token_arg)
    undo_ = command("undo", "back to the recorded generation, record, unlock")
    undo_.add_argument("--token", required=True, type=token_arg)
    undo_.add_argument("--settle", type=seconds_arg, default=60.0)
    reboot = command("reboot", "boot the target once and reboot")
    reboot.add_argument("--token", required=True, type=token_arg)
    reboot.add_argument("--boot-timeout", type=seconds_arg, required=True)
    watch = command("watch", "the dead-man switch (run by systemd)")
    watch.add_argument("--token", required=True, type=token_arg)
    recover = command("recover", "resolve an abandoned transaction")
    recover.add_argument("--force", action="store_true")
    recover.add_argument("--why", default="")
    gc = command("gc", "delete generations and collect garbage, under the lock")
    gc.add_argument("--token", required=True, type=token_arg)
    gc.add_argument("--holder", required=True)
    gc.add_argument("--deadline", type=seconds_arg, default=600.0)
    gc.add_argument("--take-over", action="store_true")
    gc.add_argument("delete", type=int, nargs="*")
    weight = command("weight", "give a canary its share of traffic, or drain it again")
    weight.add_argument("--token", required=True, type=token_arg)
    weight.add_argument("--weights", required=True, help="JSON: service -> percent | drain")
    weight.add_argument("--hold", type=seconds_arg, required=True, help="seconds until commit")
    agent = command("agent", "answer one HAProxy agent check (stdin: the service)")
    agent.add_argument("--timeout", type=seconds_arg, default=1.0)
    stat = command("traffic-stat", "the balancer's servers, from HAProxy's runtime API")
    stat.add_argument("--socket", default="/run/haproxy/admin.sock")
    stat.add_argument("--timeout", type=seconds_arg, default=5.0)
    maint = command("maintenance", "drain the whole host (on) or undrain it (off)")
    maint.add_argument("action", choices=["on", "off"])
    maint.add_argument("--holder", default="", help="JSON: operator, reason")
    command("metrics", "write node exporter's textfile of this host's deploy state")
    query = command("prom-query", "ask the Prometheus on 127.0.0.1:PORT; its JSON answer")
    query.add_argument("--port", required=True, type=port_arg)
    query.add_argument("--query", required=True, help="PromQL")
    query.add_argument("--time", default="", help="evaluation time (RFC 3339 or epoch)")
    query.add_argument("--timeout", type=seconds_arg, default=5.0)
    fetch = command("fetch", "substitute a closure from the fleet's binary cache")
    fetch.add_argument("--cache", required=True, type=cache_url_arg, help="http://HOST:PORT")
    fetch.add_argument("path", type=output_path_arg)
    publish = command("publish", "add closures to the binary cache this host serves")
    publish.add_argument("paths", type=store_path_arg, nargs="+")
    run_ = command("run", "run a command until it ends or this session does (fleet exec)")
    run_.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG]...")
    alerts = command("prom-alerts", "the alerts of the Prometheus on 127.0.0.1:PORT")
    alerts.add_argument("--port", required=True, type=port_arg)
    alerts.add_argument("--timeout", type=seconds_arg, default=5.0)
    return top


COMMANDS = {
    "state": cmd_state,
    "version": cmd_version,
    "settle": cmd_settle,
    "health": cmd_health,
    "probe-tcp": cmd_probe_tcp,
    "records": cmd_records,
    "record": cmd_record,
    "boot": cmd_boot,
    "begin": cmd_begin,
    "activate": cmd_activate,
    "commit": cmd_commit,
    "undo": cmd_undo,
    "reboot": cmd_reboot,
    "watch": cmd_watch,
    "recover": cmd_recover,
    "gc": cmd_gc,
    "traffic-stat": cmd_traffic_stat,
    "weight": cmd_weight,
    "maintenance": cmd_maintenance,
    "metrics": cmd_metrics,
    "prom-query": cmd_prom_query,
    "prom-alerts": cmd_prom_alerts,
    "fetch": cmd_fetch,
    "publish": cmd_publish,
}
# The steps that may change what the metrics say: each rewrites them as it ends.
REFRESHES = ("begin", "activate", "commit", "undo", "reboot", "watch", "recover", "boot",
             "gc", "record", "maintenance")  # fmt: skip


def emit(data: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the session may be gone: the work is done anyway
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    # A cut link hangs up the session; the step still runs to its end.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    args = parser().parse_args(argv)
    if args.command == "run":  # the operator's own command, as the ssh user: never JSON
        if os.geteuid() == 0 and caller_uid() != 0:
            # sudo lets a deploy user run this program as root: `run` would be a root shell.
            print("fleet-host run: runs as the ssh user, never through sudo", file=sys.stderr)
            return Exit.USAGE
        return cmd_run(args.argv)
    os.umask(0o077)
    paths = Paths.from_env()
    if args.command in INTERNAL and caller_uid() != 0:
        emit({"ok": False, "error": f"{args.command} is run by the host only", "code": 2})
        return Exit.USAGE
    if args.command == "agent":  # HAProxy's protocol, not ours: one line, never JSON
        cmd_agent(paths, args)
        return Exit.OK
    try:
        return run_command(paths, args)
    finally:
        if args.command in REFRESHES:  # after the answer, whatever it was: milliseconds
            refresh_metrics(paths)


def run_command(paths: Paths, args: argparse.Namespace) -> int:
    try:
        emit(COMMANDS[args.command](paths, args) | {"ok": True})
        return Exit.OK
    except Failure as exc:
        emit({"ok": False, "error": str(exc), "code": int(exc.code)} | exc.extra)
        print(f"fleet-host: {exc}", file=sys.stderr)
        return exc.code
    except json.JSONDecodeError as exc:
        emit({"ok": False, "error": f"bad JSON argument: {exc}", "code": int(Exit.USAGE)})
        return Exit.USAGE
    except OSError as exc:
        emit(
            {
                "ok": False,
                "error": f"{exc.filename or ''}: {exc.strerror or exc}",
                "code": int(Exit.FAILED),
            }
        )
        return Exit.FAILED


if __name__ == "__main__":
    sys.exit(main())
