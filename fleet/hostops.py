"""One host's operations: each is one call of the host's own program, ``fleet-host``.

The host owns every change as a transaction (docs/transaction.md): its record, its
deadline and its undo live there, so this side only starts, drives and commits it. Each
call is one ssh round trip with a quoted argument list; the answer is one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeGuard

from fleet.errors import FleetError, InventoryError, printable
from fleet.inventory import Check, parse_checks
from fleet.models import Generation
from fleet.process import Result
from fleet.ssh import Remote

# The running system's helper; a transaction uses its target's, which was just copied.
RUNNING_HELPER = "/run/current-system/sw/bin/fleet-host"
PROTOCOL = 1


def helper_of(system: str) -> str:
    return f"{system}/sw/bin/fleet-host"


def new_token() -> str:
    return secrets.token_hex(16)


class HelperError(FleetError):
    """fleet-host answered with a failure; ``data`` is its JSON answer."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class HelperMissing(HelperError):
    """The named fleet-host is not on the host (a system built before it existed)."""


class HelperUsage(HelperError):
    """fleet-host refused its arguments before doing anything (argparse): one from before
    the subcommand or option existed. Safe to ask again the older way."""


class Malformed(HelperError):
    """fleet-host answered, but not in its protocol's shape (a broken or foreign program,
    a wrong type, a number out of range): that host's error, never a crash of the command
    or of the other hosts' work. Whether it acted is unknown."""


class LockHeld(HelperError):
    pass


class Fenced(HelperError):
    """The transaction is no longer ours: taken over, or already ended."""


class Expired(HelperError):
    """The deadline passed and the host undid the change itself."""


_ERRORS: dict[int, type[HelperError]] = {3: LockHeld, 4: Fenced, 5: Expired}


def describe_holder(holder: Any) -> str:
    """A lock holder in one line, whatever the host sent (never trusted as text)."""
    if isinstance(holder, str):
        try:
            holder = parse_json(holder)
        except ValueError:
            return printable(repr(holder))
    if not isinstance(holder, dict):
        return printable(repr(holder))
    return printable(
        f"{holder.get('operator', '?')} since {holder.get('since', '?')} "
        f"({holder.get('action', '?')} of release {holder.get('release', '?')})"
    )


# Generation numbers and times as a host names them: whole, finite and in range, never a
# bool (JSON's true is Python's 1) nor a string.
LATEST_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can show


def is_count(value: Any) -> TypeGuard[int]:
    """A generation number: an int of at least 1, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_real(value: Any) -> TypeGuard[int | float]:
    """A finite number, not a bool (nor an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _real(value: Any) -> float:
    if not is_real(value):
        raise ValueError(f"not a finite number: {printable(repr(value), 40)}")
    return float(value)


def _count(value: Any) -> int:
    if not is_count(value):
        raise ValueError(f"not a generation number: {printable(repr(value), 40)}")
    return value


def _epoch(value: Any) -> int:
    if not is_real(value) or not 0 <= value <= LATEST_EPOCH:
        raise ValueError(f"not a time: {printable(repr(value), 40)}")
    return int(value)


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    """``data[key]``, a list (absent or null: empty)."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{key} is not a list")
    return value


def _texts(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(printable(str(v)) for v in _list(data, key))


@contextlib.contextmanager
def shape(name: str, command: str) -> Iterator[None]:
    """Reading a host's answer: one of another shape is that host's Malformed error."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        why = printable(str(exc) or type(exc).__name__)
        message = f"{name}: fleet-host {command}: an answer of another shape: {why}"
        raise Malformed(message) from None


@dataclass(frozen=True)
class Declared:
    """The checks a system declares in its own manifest, which prove that generation.

    ``manifest`` False: the system has none (plain nixos-rebuild, or from before the
    fleet): its units alone prove it. ``problem``: the manifest's checks are unreadable,
    which fails the proof rather than dropping them."""

    checks: tuple[Check, ...] = ()
    manifest: bool = False
    problem: str | None = None

    def names(self) -> list[str] | None:
        return [c.name for c in self.checks] if self.manifest else None


def declared(raw: Any, where: str) -> Declared:
    if raw is None:
        return Declared()
    try:
        return Declared(parse_checks(raw, where), manifest=True)
    except InventoryError as exc:
        return Declared(manifest=True, problem=printable(str(exc)))


@dataclass(frozen=True)
class GenerationInfo:
    number: int
    created: int  # seconds since the epoch
    path: str


@dataclass(frozen=True)
class Txn:
    """The host's transaction, as the host reports it."""

    token: str
    holder: dict[str, Any]
    mode: str
    state: str
    deadline: float
    recorded: Generation | None
    target: Generation | None
    abandoned: bool

    @property
    def release(self) -> str:
        return printable(str(self.holder.get("release", "?")))


class BreachKind(StrEnum):
    ABANDONED = "abandoned-transaction"
    NO_SYSTEM = "no-system"
    NOT_CURRENT = "running-not-current"
    BOOT_ENTRY = "boot-entry"
    ORPHAN_SWITCH = "orphan-switch"
    FAILED_UNITS = "failed-units"
    MISSING_SECRETS = "missing-secrets"
    ORPHAN_DRAIN = "orphan-drain"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class Breach:
    """A way a host breaks the safety invariant, and the command that repairs it."""

    kind: BreachKind
    message: str
    repair: str

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message, "repair": self.repair}


@dataclass(frozen=True)
class HostState:
    current: int | None  # the profile's current generation number
    running: str | None
    booted: str | None
    generations: tuple[GenerationInfo, ...]
    txn: Txn | None = None
    watchers: tuple[str, ...] = ()  # dead-man switches running on the host
    failed_units: tuple[str, ...] = field(default=())
    last_release: dict[str, Any] | None = None  # the host's newest release record
    boot_entry: str | None = None  # the boot loader's default, where it can be read
    host_time: float | None = field(default=None, compare=False)
    # "service/name" of each secret the running system declares that is not on the host
    missing_secrets: tuple[str, ...] = ()
    # "service/name" of each secret delivered to the host (only a helper that delivers
    # secrets reports any)
    held_secrets: tuple[str, ...] = ()
    declared: Declared = field(default_factory=Declared)  # the running system's checks
    # service -> what the host's agent answers for it, where a transaction changed it
    traffic: Mapping[str, str] = field(default_factory=dict)
    maintenance: Mapping[str, Any] | None = None  # an operator's drain of the whole host

    def path_of(self, number: int | None) -> str | None:
        return next((g.path for g in self.generations if g.number == number), None)

    @property
    def current_path(self) -> str | None:
        return self.path_of(self.current)

    @property
    def lock(self) -> str | None:
        return describe_holder(self.txn.holder) if self.txn else None

    def running_generation(self) -> Generation | None:
        """The generation the host runs: the current one when paths agree, else the newest match."""
        if self.running is None:
            return None
        if self.current_path == self.running:
            return Generation(self.current, self.running)
        numbers = [g.number for g in self.generations if g.path == self.running]
        return Generation(max(numbers) if numbers else None, self.running)

    @property
    def pending_reboot(self) -> bool:
        """A ``--boot`` deploy waits for the next boot: its record says so, no change runs."""
        last = self.last_release or {}
        new = last.get("new") or {}
        return (
            self.txn is None
            and last.get("result") == "pending-reboot"
            and isinstance(new, dict)
            and new.get("path") == self.current_path
            and self.running != self.current_path
        )

    def breaches(self, name: str) -> list[Breach]:
        """Every way this host breaks the invariant; a live transaction is not one."""
        found: list[Breach] = []
        txn = self.txn
        if txn is not None and txn.abandoned:
            found.append(
                Breach(
                    BreachKind.ABANDONED,
                    f"abandoned {txn.mode} transaction of release {txn.release} "
                    f"({describe_holder(txn.holder)}), state {txn.state}",
                    f"fleet recover {name}",
                )
            )
        if txn is not None:
            return found  # the transaction's own resolution decides the rest
        if self.running is None:
            found.append(Breach(BreachKind.NO_SYSTEM, "runs no system", f"fleet deploy {name}"))
            return found
        if self.running != self.current_path and not self.pending_reboot:
            where = self.running_generation()
            what = (
                f"generation #{where.number}"
                if where and where.number is not None
                else "a system in no generation"
            )
            found.append(
                Breach(
                    BreachKind.NOT_CURRENT,
                    f"runs {what}, but the profile's current is #{self.current}",
                    f"fleet deploy {name} (or fleet rollback {name})",
                )
            )
        if (
            self.boot_entry is not None
            and self.current_path is not None
            and self.boot_entry != self.current_path
        ):
            found.append(
                Breach(
                    BreachKind.BOOT_ENTRY,
                    "the boot loader's default is not the profile's current generation",
                    f"fleet deploy {name}",
                )
            )
        if self.watchers:
            found.append(
                Breach(
                    BreachKind.ORPHAN_SWITCH,
                    f"dead-man switch armed with no transaction: {', '.join(self.watchers)}",
                    f"fleet recover {name}",
                )
            )
        if self.traffic:
            # Only a transaction drains or weighs, and its end puts them back.
            found.append(
                Breach(
                    BreachKind.ORPHAN_DRAIN,
                    "out of rotation with no transaction: "
                    + ", ".join(f"{s} {w}" for s, w in sorted(self.traffic.items())),
                    f"fleet recover {name}",
                )
            )
        if self.failed_units:
            found.append(
                Breach(
                    BreachKind.FAILED_UNITS,
                    f"failed units: {', '.join(self.failed_units)}",
                    f"fleet rollback {name}, or repair the units",
                )
            )
        if self.missing_secrets:
            found.append(
                Breach(
                    BreachKind.MISSING_SECRETS,
                    f"secrets missing: {', '.join(self.missing_secrets)}",
                    f"fleet deploy {name} (it delivers them), or provide them by hand "
                    "where they are not the tool's to upload",
                )
            )
        return found


# What a host may name as a system: a store path, nothing an option parser could take for
# an option (rollback passes it to nix-copy-closure on the operator's machine).
_STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[0-9A-Za-z+._?=-]+")


def store_path(value: Any) -> str | None:
    """``value`` if it is a store path, else None: the host's word is checked, not trusted."""
    return value if isinstance(value, str) and _STORE_PATH.fullmatch(value) else None


def generation(data: Any) -> Generation | None:
    """A generation a host names (``{"number", "path"}``), checked: None unless its path is
    a store path; its number None unless it is a generation number. A host's generations
    reach command lines (``--target``, ``--generation``) and the operator's terminal."""
    if not isinstance(data, dict) or store_path(data.get("path")) is None:
        return None
    number = data.get("number")
    return Generation(number if is_count(number) else None, data["path"])


def _generation_info(entry: Any) -> GenerationInfo | None:
    number, created, path = entry
    if store_path(path) is None:
        return None
    return GenerationInfo(_count(number), _epoch(created), path)


def parse_state(data: dict[str, Any]) -> HostState:
    """``fleet-host state``'s answer; one of another shape raises ValueError or TypeError
    (``HostOps.state`` makes that the host's Malformed error)."""
    txn_data = data.get("txn")
    txn = None
    if isinstance(txn_data, dict):
        holder = txn_data.get("holder")
        txn = Txn(
            token=str(txn_data.get("token", "")),
            holder=holder if isinstance(holder, dict) else {},
            mode=printable(str(txn_data.get("mode", "?"))),
            state=printable(str(txn_data.get("state", "?"))),
            deadline=_real(txn_data.get("deadline") or 0),
            recorded=generation(txn_data.get("recorded")),
            target=generation(txn_data.get("target")),
            abandoned=bool(data.get("abandoned")),
        )
    own = f"fleet-watch-{txn.token[:16]}" if txn else None
    last = data.get("lastRecord")
    now = data.get("now")
    infos = (_generation_info(entry) for entry in _list(data, "generations"))
    return HostState(
        current=data.get("current") if is_count(data.get("current")) else None,
        running=store_path(data.get("running")),
        booted=store_path(data.get("booted")),
        generations=tuple(g for g in infos if g is not None),
        txn=txn,
        watchers=tuple(printable(str(w)) for w in _list(data, "watchers") if w != own),
        failed_units=_texts(data, "failedUnits"),
        last_release=last if isinstance(last, dict) else None,
        boot_entry=store_path(data.get("bootEntry")),
        host_time=float(now) if is_real(now) else None,
        missing_secrets=tuple(
            printable(f"{m.get('service')}/{m.get('name')}")
            for m in _list(data, "missingSecrets")
            if isinstance(m, dict)
        ),
        held_secrets=_texts(data, "heldSecrets"),
        declared=declared(data.get("checks"), "the running system's manifest"),
        traffic={
            printable(str(k)): printable(str(v)) for k, v in (data.get("traffic") or {}).items()
        }
        if isinstance(data.get("traffic"), dict)
        else {},
        maintenance=data.get("maintenance") if isinstance(data.get("maintenance"), dict) else None,
    )


def clock(epoch: Any) -> str:
    """A host's deadline as a time of day; "?" for what is no time (it may say anything)."""
    if not is_real(epoch) or not 0 <= epoch <= LATEST_EPOCH:
        return "?"
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")


@dataclass(frozen=True)
class Activation:
    switch_exit: int
    output: str
    settled: bool
    failed_units: tuple[str, ...]
    deadline: float
    declared: Declared = field(default_factory=Declared)  # the activated system's checks
    command: str | None = None  # the call, for an operator to run again (a failed switch)
    # The host's own run of those checks (fleet-host's "health"), when it made them all;
    # None: the tool makes them.
    health: dict[str, Any] | None = None
    seconds: float | None = None  # the switch and settling, as the host timed them

    @classmethod
    def parse(cls, data: dict[str, Any], command: str | None = None) -> Activation:
        """An activation's answer; one of another shape raises ValueError, KeyError or
        TypeError (within ``shape``, the host's Malformed error)."""
        health = data.get("health")
        seconds = data.get("seconds")
        switch_exit = data["switchExit"]
        if not isinstance(switch_exit, int) or isinstance(switch_exit, bool):
            raise ValueError("switchExit is not an exit code")
        return cls(
            switch_exit=switch_exit,
            output=str(data.get("output", "")),
            settled=bool(data.get("settled")),
            failed_units=_texts(data, "failedUnits"),
            deadline=_real(data["deadline"]),
            declared=declared(data.get("checks"), "the new system's manifest"),
            health=health if isinstance(health, dict) else None,
            seconds=float(seconds) if is_real(seconds) and seconds >= 0 else None,
            command=command,
        )


class HostOps:
    """The host's program, called over one host's ssh connection."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    @property
    def name(self) -> str:
        return self.remote.name

    def call(
        self,
        command: str,
        *args: str,
        helper: str = RUNNING_HELPER,
        input: str | None = None,
        fresh: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``fleet-host COMMAND ARGS`` as root; its JSON answer, or the matching error
        (which carries the call as a command line: ``FleetError.command``)."""
        argv = self.argv(command, *args, helper=helper)
        result = self.remote.run(argv, check=False, fresh=fresh, input=input, timeout=timeout)
        try:
            return self._answer(command, argv[argv.index(command) - 1], result)
        except HelperError as exc:
            exc.command = self.remote.command_line(argv)
            raise

    def argv(self, command: str, *args: str, helper: str = RUNNING_HELPER) -> list[str]:
        """The remote argument list of ``fleet-host COMMAND ARGS``."""
        # A deploy user other than root acts through sudo, which allows it the running
        # system's helper alone (docs/security.md); that helper drives every step.
        if self.remote.endpoint.user != "root":
            return ["sudo", "-n", RUNNING_HELPER, command, *args]
        return [helper, command, *args]

    def command_line(self, command: str, *args: str, helper: str = RUNNING_HELPER) -> str:
        """``fleet-host COMMAND ARGS`` on this host, as a line an operator can paste."""
        return self.remote.command_line(self.argv(command, *args, helper=helper))

    def _answer(self, command: str, helper: str, result: Result) -> dict[str, Any]:
        lines = result.stdout.strip().splitlines()
        try:
            data = parse_json(lines[-1]) if lines else None
        except ValueError as exc:
            data, refused = None, printable(str(exc))
        else:
            refused = "not a JSON object"
        if lines and result.returncode == 0 and not isinstance(data, dict):
            raise Malformed(f"{self.name}: fleet-host {command}: no JSON answer: {refused}")
        if not isinstance(data, dict):
            if result.returncode == 127 or "command not found" in result.stderr:
                raise HelperMissing(f"{self.name}: {helper} is missing: the host has no fleet-host")
            if result.returncode == 2 and "usage:" in result.stderr:
                raise HelperUsage(f"{self.name}: fleet-host {command}: {result.last_error_line()}")
            raise HelperError(
                f"{self.name}: fleet-host {command} failed (exit {result.returncode}): "
                f"{result.last_error_line()}"
            )
        if result.returncode != 0 or not data.get("ok"):
            error = _ERRORS.get(result.returncode, HelperError)
            raise error(f"{self.name}: {printable(str(data.get('error', 'failed')))}", data)
        return data

    def state(self, *, fresh: bool = False, timeout: float | None = None) -> HostState:
        data = self.call("state", fresh=fresh, timeout=timeout)
        with shape(self.name, "state"):
            return parse_state(data)

    def begin(
        self,
        token: str,
        holder: dict[str, Any],
        base: dict[str, Any],
        mode: str,
        target: Generation,
        deadline: float,
        confirm: float,
        take_over: bool = False,
        secrets: Sequence[dict[str, str]] | None = None,
        drain: Sequence[str] = (),
        health: float | None = None,
        activate: float | None = None,
    ) -> dict[str, Any]:
        """Take the lock and arm the switch; the answer has ``noop`` or ``recorded``, and
        ``helper`` when the transaction's helper is not the target's.

        ``health`` (the health timeout): the host also proves the system it ends on, in
        the same call: with ``activate`` (the confirm timeout), it activates the target
        at once and makes the new system's checks (``activation``, as ``activate``
        answers); with nothing to change, it proves the running system (``health``). A
        helper from before these options is asked the older way.

        ``drain``: services whose instance here the host's agent takes out of rotation
        until the transaction ends, however it ends.

        ``secrets`` (service, name, base64 data), when given, are all the secrets the host
        is declared to get: delivered under the lock over the call's stdin (never on a
        command line); any other the host holds is removed once the change is committed.
        """
        args = [
            "--token",
            token,
            "--holder",
            json.dumps(holder, sort_keys=True),
            "--base",
            json.dumps(base, sort_keys=True),
            "--mode",
            mode,
            "--target",
            target.path,
            "--deadline",
            f"{deadline:g}",
            "--confirm",
            f"{confirm:g}",
        ]
        if target.number is not None:
            args += ["--generation", str(target.number)]
        if take_over:
            args.append("--take-over")
        for service in drain:
            args += ["--drain", service]
        given = json.dumps(list(secrets)) if secrets is not None else None
        newer = []
        if health is not None:
            newer += ["--checks", "--health", f"{health:g}"]
        if activate is not None:
            newer += ["--activate", "--confirm-timeout", f"{activate:g}"]
        delivering = ["--secrets"] if secrets is not None else []
        # The newest form first; a helper that refuses an option (one from before it)
        # refused it before doing anything, so the older form is asked next.
        variants = [[*args, *newer, *delivering]]
        if newer:
            variants.append([*args, *delivering])
        if secrets is not None and not secrets:
            variants.append(args)  # nothing to deliver: a helper from before secrets
        try:
            for variant in variants[:-1]:
                with contextlib.suppress(HelperUsage):
                    return self._begin(variant, target, given)
            return self._begin(variants[-1], target, given)
        except LockHeld as exc:
            holder_text = describe_holder(exc.data.get("holder"))
            held = LockHeld(
                f"{self.name}: deploy lock held by {holder_text}, whose dead-man switch "
                f"resolves it by {clock(exc.data.get('deadline'))}; to take its transaction "
                "over now, use --break-lock",
                exc.data,
            )
            held.command = exc.command
            raise held from None

    def _begin(self, args: list[str], target: Generation, given: str | None) -> dict[str, Any]:
        given = given if "--secrets" in args else None
        try:
            return self.call("begin", *args, helper=helper_of(target.path), input=given)
        except HelperMissing:
            # A target from before fleet-host (a rollback to an old generation): the
            # running system's helper drives the transaction instead.
            return self.call("begin", *args, input=given) | {"helper": RUNNING_HELPER}

    def weight(
        self, helper: str, token: str, weights: Mapping[str, int | str], hold: float
    ) -> float:
        """Give the activated new system its share of traffic per drained service (a
        percent of its weight, or "drain"); the host's new deadline."""
        data = self.call(
            "weight", "--token", token, "--weights", json.dumps(dict(weights), sort_keys=True),
            "--hold", f"{hold:g}", helper=helper,
        )  # fmt: skip
        with shape(self.name, "weight"):
            return _real(data["deadline"])

    def activate(self, helper: str, token: str, health: float, confirm: float) -> Activation:
        """Activate and settle; the host also makes the new system's checks when it can."""
        args = ["--token", token, "--health", f"{health:g}", "--confirm", f"{confirm:g}"]
        try:
            data = self.call("activate", *args, "--checks", helper=helper)
            line = self.command_line("activate", *args, "--checks", helper=helper)
        except HelperUsage:  # a helper from before --checks
            data = self.call("activate", *args, helper=helper)
            line = self.command_line("activate", *args, helper=helper)
        with shape(self.name, "activate"):
            return Activation.parse(data, line)

    def health(self, seconds: float) -> dict[str, Any]:
        """Settle, failed units, and the running system's checks made by the host when it
        can make them all (``health``; else the tool makes them): one round trip."""
        return self.call("health", "--seconds", f"{max(1.0, seconds):g}")

    def commit(self, helper: str, token: str, record: dict[str, Any]) -> dict[str, Any]:
        """Over a new connection: a new system that locks out new sessions is not committed."""
        return self.call(
            "commit",
            "--token",
            token,
            helper=helper,
            fresh=True,
            input=json.dumps(record, sort_keys=True),
        )

    def undo(
        self, helper: str, token: str, record: dict[str, Any], settle: float
    ) -> dict[str, Any]:
        return self.call(
            "undo",
            "--token",
            token,
            "--settle",
            f"{settle:g}",
            helper=helper,
            input=json.dumps(record, sort_keys=True),
        )

    def reboot(self, helper: str, token: str, boot_timeout: float) -> dict[str, Any]:
        return self.call(
            "reboot", "--token", token, "--boot-timeout", f"{boot_timeout:g}", helper=helper
        )

    def recover(self, force: bool = False, why: str = "") -> dict[str, Any]:
        return self.call("recover", *(["--force"] if force else []), "--why", why)

    def settle(self, seconds: float) -> tuple[bool, tuple[str, ...]]:
        """Wait for systemd's job queue to drain; (settled, failed units)."""
        data = self.call("settle", "--seconds", f"{max(1.0, seconds):g}")
        with shape(self.name, "settle"):
            return bool(data.get("settled")), _texts(data, "failedUnits")

    def gc(
        self, token: str, holder: dict[str, Any], delete: Sequence[int], take_over: bool
    ) -> dict[str, Any]:
        args = ["--token", token, "--holder", json.dumps(holder, sort_keys=True)]
        if take_over:
            args.append("--take-over")
        data = self.call("gc", *args, *map(str, delete))
        with shape(self.name, "gc"):
            data["deleted"] = [_count(n) for n in _list(data, "deleted")]
        return data

    def records(self) -> list[dict[str, Any]]:
        """The host's release records, oldest first; unreadable lines are passed over."""
        data = self.call("records")
        with shape(self.name, "records"):
            return [r for r in _list(data, "records") if isinstance(r, dict)]

    def append_record(self, record: dict[str, Any]) -> str | None:
        """Add a record (a correction); the error if it could not be written."""
        data = self.call("record", input=json.dumps(record, sort_keys=True))
        error = data.get("recordError")
        return printable(str(error)) if error else None

    def prom_query(
        self, port: int, query: str, at: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """A PromQL query to the host's own Prometheus (127.0.0.1:PORT), asked on the host
        over the ssh connection: Prometheus's JSON answer (``status``, ``data``). The
        round trip is bounded: a measurement that hangs would hang the rollout."""
        args = [f"--port={port}", f"--query={query}", *([f"--time={at}"] if at else [])]
        return _without_ok(self.call("prom-query", *args, timeout=timeout))

    def prom_alerts(self, port: int, timeout: float | None = None) -> dict[str, Any]:
        """The alerts of the host's own Prometheus, as its /api/v1/alerts answers;
        ``timeout`` bounds the whole round trip (a hung host must not hang the caller)."""
        return _without_ok(self.call("prom-alerts", f"--port={port}", timeout=timeout))

    def running_closure(self) -> list[str]:
        """The running system's closure: store paths only (their names reach the
        operator's terminal)."""
        result = self.remote.run(["nix-store", "-qR", "/run/current-system"], check=False)
        if not result.ok:
            raise FleetError(f"{self.name}: nix-store -qR: {result.last_error_line()}")
        paths = result.stdout.split()
        odd = next((p for p in paths if store_path(p) is None), None)
        if odd is not None:
            raise Malformed(f"{self.name}: nix-store -qR named no store path: {printable(odd, 80)}")
        return paths


def _without_ok(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "ok"}


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is no JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{printable(text, 40)} is beyond a float's range")
    return value


def parse_json(line: str) -> Any:
    """A host's JSON answer, as RFC 8259 has it: no NaN or Infinity (Python's own JSON
    would take them, and then write a document no other reader takes), no number out of
    a float's range; nesting too deep for the parser is a ValueError too."""
    try:
        return json.loads(line, parse_constant=_refuse, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
