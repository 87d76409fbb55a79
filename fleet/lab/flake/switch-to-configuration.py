#!/usr/bin/python3
"""switch-to-configuration for lab hosts (Debian with Nix, not NixOS).

Implements NixOS's actions and exit codes on the container's systemd:
  switch        make this system the boot default and activate it now
  boot          make this system the boot default
  test          activate it now, leave the boot default alone
  dry-activate  print what activation would stop, restart and start
Exit codes: 0 done, 1 usage or boot loader failure, 2 activation failed,
4 a unit failed to start or some unit is failed after the switch.
The lab's boot loader is the /boot/lab/default link; the lab-boot unit of the
host activates it at boot, as stage 2 of NixOS activates the booted system.
"""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent
CURRENT = Path("/run/current-system")
BOOT_ENTRY = Path("/boot/lab/default")
UNIT_DIR = Path("/run/systemd/system")
ACTIONS = ("switch", "boot", "test", "dry-activate")


def units_of(system):
    directory = system / "etc/systemd/system" if system else None
    if directory is None or not directory.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def relink(link, target):
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def systemctl(*args):
    return subprocess.run(["systemctl", *args], check=False).returncode


def is_active(unit):
    return systemctl("is-active", "--quiet", unit) == 0


def failed_units():
    out = subprocess.run(
        ["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--full"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def activate(new_units):
    """Link this system's units and mark it current; the switch's point of no return."""
    UNIT_DIR.mkdir(parents=True, exist_ok=True)
    for link in UNIT_DIR.iterdir():
        ours = link.is_symlink() and str(os.readlink(link)).startswith("/nix/store/")
        if ours and link.name not in new_units:
            link.unlink()
    for name in new_units:
        relink(UNIT_DIR / name, OUT / "etc/systemd/system" / name)
    relink(CURRENT, OUT)


def main():
    action = sys.argv[1] if len(sys.argv) == 2 else None
    if action not in ACTIONS:
        print(f"usage: {sys.argv[0]} [{'|'.join(ACTIONS)}]", file=sys.stderr)
        return 1
    os.environ["NIXOS_ACTION"] = action
    Path("/run/nixos").mkdir(exist_ok=True)
    lock = open("/run/nixos/switch-to-configuration.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)

    if action in ("switch", "boot"):
        refusal = OUT / "boot-loader-refuses"
        if refusal.exists():
            print(f"error installing the boot loader: {refusal.read_text().strip()}",
                  file=sys.stderr)  # fmt: skip
            return 1
        try:
            BOOT_ENTRY.parent.mkdir(parents=True, exist_ok=True)
            relink(BOOT_ENTRY, OUT)
        except OSError as error:
            print(f"error installing the boot loader entry: {error}", file=sys.stderr)
            return 1
        if action == "boot":
            return 0

    old = CURRENT.resolve() if CURRENT.exists() else None
    old_units, new_units = units_of(old), units_of(OUT)
    stop = sorted(set(old_units) - set(new_units))
    # Templates (name@.service) run as instances, started by what needs them (a socket).
    units = [u for u in new_units if "@." not in u]
    restart = sorted(u for u in units if u in old_units and old_units[u] != new_units[u])
    start = sorted(u for u in units if u not in restart and not is_active(u))

    if action == "dry-activate":
        for verb, units in (("stop", stop), ("restart", restart), ("start", start)):
            if units:
                print(f"would {verb} the following units: {', '.join(units)}")
        return 0

    result = 0
    if stop or restart:
        print(f"stopping the following units: {', '.join(stop + restart)}", file=sys.stderr)
        systemctl("stop", "--", *stop, *restart)
        systemctl("reset-failed", "--", *stop, *restart)
    try:
        activate(new_units)
    except OSError as error:
        print(f"activation failed: {error}", file=sys.stderr)
        result = 2
    systemctl("daemon-reload")
    if restart or start:
        print(f"starting the following units: {', '.join(restart + start)}", file=sys.stderr)
        if systemctl("start", "--", *restart, *start) != 0:
            result = 4
    failed = failed_units()
    if failed:
        print(f"warning: the following units failed: {', '.join(failed)}", file=sys.stderr)
        for unit in failed:  # as NixOS does: why, in the unit's own words
            systemctl("status", "--no-pager", "--lines=5", "--", unit)
        result = 4
    return result


if __name__ == "__main__":
    sys.exit(main())
