"""One host's operations: state, lock, dead-man switch, activation, profile, release records.

Each operation is one ssh round trip: a constant POSIX shell script run as
``sh -c SCRIPT fleet ARG...``, so values only ever travel as quoted arguments.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetError
from fleet.models import Generation
from fleet.process import Result
from fleet.ssh import Remote

STATE = r"""
profile=/nix/var/nix/profiles/system
printf 'current=%s\n' "$(readlink "$profile" 2>/dev/null)"
printf 'running=%s\n' "$(readlink -f /run/current-system 2>/dev/null)"
printf 'booted=%s\n' "$(readlink -f /run/booted-system 2>/dev/null)"
for link in "$profile"-*-link; do
  [ -L "$link" ] || continue
  printf 'generation=%s %s %s\n' \
    "${link#"$profile"-}" "$(stat -c %Y "$link")" "$(readlink -f "$link")"
done
[ -e /run/fleet/deploy.lock ] && printf 'lock=%s\n' "$(cat /run/fleet/deploy.lock)"
records=/var/lib/fleet/releases.jsonl
[ -s "$records" ] && printf 'release=%s\n' "$(tail -n 1 "$records")"
systemctl list-units --plain --no-legend --full 'fleet-deadman-*.timer' | while read -r unit _; do
  printf 'deadman=%s\n' "${unit%.timer}"
done
systemctl list-units --failed --plain --no-legend --full | while read -r unit _; do
  printf 'failed=%s\n' "$unit"
done
exit 0
"""

# Take the lock atomically (a hard link either appears or does not), then report the state
# it was taken in, in the same round trip; exit 3 naming the holder if it is held.
LOCK = (
    r"""
mkdir -p /run/fleet
tmp=/run/fleet/deploy.lock.$$
printf '%s\n' "$1" > "$tmp"
if [ "$2" = break ]; then
  mv -f "$tmp" /run/fleet/deploy.lock
elif ln "$tmp" /run/fleet/deploy.lock 2>/dev/null; then
  rm -f "$tmp"
else
  rm -f "$tmp"
  printf 'holder=%s\n' "$(cat /run/fleet/deploy.lock)"
  exit 3
fi
"""
    + STATE
)

UNLOCK = r"""
[ "$(cat /run/fleet/deploy.lock 2>/dev/null)" = "$1" ] && rm -f /run/fleet/deploy.lock
exit 0
"""

# The dead-man switch ($3, a fresh unit name): a transient timer whose service re-activates
# the recorded generation $1 after $2 with nothing but that generation's own files, marks
# that it fired, and drops the lock. Switches left by a holder whose lock was broken go first.
ARM = r"""
systemctl stop 'fleet-deadman-*.timer' 2>/dev/null
mkdir -p /run/fleet
exec systemd-run --quiet --unit="$3" \
  --description="fleet dead-man switch: re-activate $1" \
  --on-active="$2" --timer-property=AccuracySec=100ms --timer-property=RemainAfterElapse=no \
  -p CollectMode=inactive-or-failed \
  -p ExecStartPre="$1/sw/bin/touch /run/fleet/$3.fired" \
  -p ExecStopPost="$1/sw/bin/rm -f /run/fleet/deploy.lock" \
  "$1/bin/switch-to-configuration" test
"""

# Disarm switch $1; exit 3 (after waiting for it to finish) if it had fired already.
DISARM = r"""
systemctl stop "$1.timer" 2>/dev/null
state=$(systemctl is-active "$1.service" 2>/dev/null)
if [ -e "/run/fleet/$1.fired" ] || [ "$state" = active ] || [ "$state" = activating ]; then
  while :; do
    case $(systemctl is-active "$1.service" 2>/dev/null) in
      active|activating|deactivating|reloading) sleep 0.2 ;;
      *) break ;;
    esac
  done
  rm -f "/run/fleet/$1.fired"
  exit 3
fi
exit 0
"""

# switch-to-configuration $1 $2 under systemd-run as unit $3: a dropped ssh session cannot
# kill it midway. Unit names are fresh each time: a finished one may not be collected yet.
ACTIVATE = r"""
mkdir -p /run/fleet
log="/run/fleet/$3.log"
systemd-run --quiet --unit="$3" --wait --collect --service-type=exec \
  -p StandardOutput="append:$log" -p StandardError="append:$log" \
  "$1/bin/switch-to-configuration" "$2"
rc=$?
cat "$log" >&2 2>/dev/null
rm -f "$log"
exit $rc
"""

# Append the release record on stdin, then release lock $1 if it is still ours.
RECORD_AND_UNLOCK = (
    r"""
mkdir -p /var/lib/fleet && cat >> /var/lib/fleet/releases.jsonl
"""
    + UNLOCK
)

# Persist: make $1 the profile's current generation (nix-env arguments after the first two),
# then install its boot entry under systemd-run as unit $2, as ACTIVATE does.
PERSIST = (
    r"""
path=$1 unit=$2
shift 2
nix-env -p /nix/var/nix/profiles/system "$@" >&2 || exit 1
printf 'profile=%s\n' "$(readlink /nix/var/nix/profiles/system)"
set -- "$path" boot "$unit"
"""
    + ACTIVATE
)

READ_RECORDS = r"""
cat /var/lib/fleet/releases.jsonl 2>/dev/null
exit 0
"""

# Delete generations "$@" of the system profile, then collect garbage.
COLLECT = r"""
if [ "$#" -gt 0 ]; then
  nix-env -p /nix/var/nix/profiles/system --delete-generations "$@" >&2 || exit $?
fi
nix-store --gc 2>&1 | tail -n 1
"""

CLOSURE = r"""
nix-store -qR "$(readlink -f /run/current-system)"
"""

SETTLE = r"""
end=$(( $(date +%s) + $1 ))
while [ -n "$(systemctl list-jobs --no-legend 2>/dev/null)" ]; do
  [ "$(date +%s)" -ge "$end" ] && { echo "jobs=pending"; break; }
  sleep 0.2
done
systemctl list-units --failed --plain --no-legend --full | while read -r unit _; do
  printf 'failed=%s\n' "$unit"
done
"""


class LockHeld(FleetError):
    def __init__(self, host: str, holder: str) -> None:
        self.holder = holder
        super().__init__(
            f"{host}: deploy lock held by {describe_lock(holder)}; "
            "if its holder is gone, break it with --break-lock"
        )


def describe_lock(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (
            f"{info['operator']} since {info['since']} "
            f"({info['action']} of release {info['release']})"
        )
    except (ValueError, KeyError, TypeError):
        return repr(raw)


def _switch_unit() -> str:
    # Fresh each time: a finished transient unit may not be collected yet.
    return f"fleet-switch-{secrets.token_hex(4)}"


def generation_number(link_name: str) -> int | None:
    """``system-42-link`` or ``42-link`` -> 42."""
    parts = link_name.removeprefix("system-").split("-")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() and parts[1] == "link" else None


@dataclass(frozen=True)
class GenerationInfo:
    number: int
    created: int  # seconds since the epoch
    path: str


@dataclass(frozen=True)
class HostState:
    current: int | None  # the profile's current generation number
    running: str | None
    booted: str | None
    generations: tuple[GenerationInfo, ...]
    lock: str | None
    deadman: tuple[str, ...]  # armed dead-man switches (unit names without .timer)
    failed_units: tuple[str, ...] = field(default=())
    last_release: dict[str, Any] | None = None  # the host's newest release record

    def path_of(self, number: int | None) -> str | None:
        return next((g.path for g in self.generations if g.number == number), None)

    @property
    def current_path(self) -> str | None:
        return self.path_of(self.current)

    def running_generation(self) -> Generation | None:
        """The generation the host runs: the current one when paths agree, else the newest match."""
        if self.running is None:
            return None
        if self.current_path == self.running:
            return Generation(self.current, self.running)
        numbers = [g.number for g in self.generations if g.path == self.running]
        return Generation(max(numbers) if numbers else None, self.running)


def parse_state(text: str) -> HostState:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values.setdefault(key, []).append(value)

    def one(key: str) -> str | None:
        found = values.get(key, [""])[0]
        return found or None

    generations = []
    for entry in values.get("generation", []):
        link, created, path = entry.split(" ", 2)
        number = generation_number(link)
        if number is not None:
            generations.append(GenerationInfo(number, int(created), path))
    current = one("current")
    return HostState(
        current=generation_number(current) if current else None,
        running=one("running"),
        booted=one("booted"),
        generations=tuple(sorted(generations, key=lambda g: g.number)),
        lock=one("lock"),
        deadman=tuple(values.get("deadman", [])),
        failed_units=tuple(values.get("failed", [])),
        last_release=_json_or_none(one("release")),
    )


def _json_or_none(text: str | None) -> dict[str, Any] | None:
    try:
        loaded = json.loads(text) if text else None
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


class HostOps:
    """The remote side of the protocol for one host."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.deadman: str | None = None  # the switch this object armed

    @property
    def name(self) -> str:
        return self.remote.name

    def _sh(
        self,
        script: str,
        *args: str,
        fresh: bool = False,
        input: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        # A deploy user other than root acts through sudo (the host module allows it).
        sudo = ["sudo", "-n"] if self.remote.endpoint.user != "root" else []
        return self.remote.run(
            [*sudo, "sh", "-c", script, "fleet", *args],
            check=False,
            fresh=fresh,
            input=input,
            timeout=timeout,
        )

    def state(self, *, fresh: bool = False) -> HostState:
        result = self._sh(STATE, fresh=fresh)
        if not result.ok:
            raise FleetError(f"{self.name}: reading its state failed: {result.last_error_line()}")
        return parse_state(result.stdout)

    def lock(self, info: str, *, force: bool = False) -> HostState:
        """Take the deploy lock; the host's state as it was once the lock was held."""
        result = self._sh(LOCK, info, "break" if force else "take")
        if result.returncode == 3:
            raise LockHeld(self.name, result.stdout.strip().removeprefix("holder="))
        if not result.ok:
            raise FleetError(
                f"{self.name}: taking the deploy lock failed: {result.last_error_line()}"
            )
        return parse_state(result.stdout)

    def unlock(self, info: str) -> None:
        self._sh(UNLOCK, info)

    def arm(self, recorded: str, seconds: float) -> None:
        unit = f"fleet-deadman-{secrets.token_hex(4)}"
        result = self._sh(ARM, recorded, f"{max(1.0, seconds):g}s", unit)
        if not result.ok:
            raise FleetError(
                f"{self.name}: arming the dead-man switch failed: {result.last_error_line()}"
            )
        self.deadman = unit

    def disarm(self, *, fresh: bool = False) -> bool:
        """Stop the dead-man switch; False when it had fired already (the host reverted)."""
        if self.deadman is None:
            return True
        result = self._sh(DISARM, self.deadman, fresh=fresh)
        if result.returncode not in (0, 3):
            raise FleetError(
                f"{self.name}: disarming the dead-man switch failed: {result.last_error_line()}"
            )
        return result.returncode == 0

    def activate(self, path: str, action: str) -> tuple[int, str]:
        """Run PATH/bin/switch-to-configuration ACTION; its exit code and what it printed."""
        result = self._sh(ACTIVATE, path, action, _switch_unit())
        return result.returncode, result.stderr

    def persist(self, path: str, generation: int | None = None) -> tuple[int | None, int, str]:
        """Make PATH the profile's current generation (a new one, or the existing number
        ``generation``) and its boot entry, in one round trip: (number, exit code, output)."""
        args = (
            ["--switch-generation", str(generation)] if generation is not None else ["--set", path]
        )
        result = self._sh(PERSIST, path, _switch_unit(), *args)
        profile = next((line.removeprefix("profile=") for line in result.stdout.splitlines()
                        if line.startswith("profile=")), None)  # fmt: skip
        if profile is None:
            raise FleetError(f"{self.name}: nix-env {' '.join(args)}: {result.last_error_line()}")
        return generation_number(profile), result.returncode, result.stderr

    def settle(self, seconds: float) -> tuple[bool, tuple[str, ...]]:
        """Wait for systemd's job queue to drain; (settled, failed units)."""
        result = self._sh(SETTLE, str(max(1, int(seconds))))
        lines = result.stdout.splitlines()
        failed = tuple(line.removeprefix("failed=") for line in lines if line.startswith("failed="))
        return "jobs=pending" not in lines, failed

    def collect_garbage(self, generations: list[int]) -> str:
        """Delete those generations and collect garbage; Nix's summary line."""
        result = self._sh(COLLECT, *map(str, generations))
        if not result.ok:
            raise FleetError(f"{self.name}: garbage collection: {result.last_error_line()}")
        return result.stdout.strip()

    def running_closure(self) -> list[str]:
        result = self._sh(CLOSURE)
        if not result.ok:
            raise FleetError(f"{self.name}: nix-store -qR: {result.last_error_line()}")
        return result.stdout.split()

    def records(self) -> list[dict[str, Any]]:
        """The host's release records, oldest first; unreadable lines are passed over."""
        result = self._sh(READ_RECORDS)
        if not result.ok:
            raise FleetError(f"{self.name}: reading release records: {result.last_error_line()}")
        parsed = (_json_or_none(line) for line in result.stdout.splitlines())
        return [r for r in parsed if r is not None]

    def finish(self, record: dict[str, Any], info: str) -> None:
        """Append the release record and release our lock, in one round trip."""
        self._sh(RECORD_AND_UNLOCK, info, input=json.dumps(record, sort_keys=True) + "\n")
