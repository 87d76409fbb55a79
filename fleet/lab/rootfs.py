"""The cached Debian root file system every lab host boots from (read-only, overlaid)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fleet import process
from fleet.errors import FleetError

SUITE = "bookworm"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "python3",
    "nix-bin", "libdbi-perl",  # debootstrap does not resolve nix-bin's virtual perl-dbdabi dep
)  # fmt: skip
# Bump when customise() changes, so caches made by an older version are not reused.
LAYOUT_VERSION = "1"
READY = ".fleet-lab-ready"

SSHD_CONFIG = """\
HostKey /etc/ssh/lab/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/lab/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxSessions 100
MaxStartups 100:30:200
"""

NIX_CONFIG = """\
build-users-group =
sandbox = false
substituters =
"""

BOOT_SCRIPT = """\
#!/bin/sh
# Activate the lab boot loader's entry, as NixOS's stage 2 activates the booted system.
set -e
entry=/boot/lab/default
[ -e "$entry" ] || exit 0
system=$(readlink -f "$entry")
ln -sfn "$system" /run/booted-system
exec "$system/bin/switch-to-configuration" test
"""

BOOT_UNIT = """\
[Unit]
Description=Activate the lab host's boot generation
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
# A broken boot generation shows as its own failed units, not as this one.
ExecStart=-/usr/local/sbin/fleet-lab-boot

[Install]
WantedBy=multi-user.target
"""


def mirror() -> str:
    return os.environ.get("FLEET_LAB_MIRROR", "http://deb.debian.org/debian")


def cache_key() -> str:
    text = "\n".join([SUITE, *PACKAGES, LAYOUT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure(cache: Path, say: Callable[[str], None]) -> Path:
    """The cached root, made once with debootstrap; concurrent callers wait for one build."""
    final = cache / f"rootfs-{cache_key()}"
    if (final / READY).exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "rootfs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / READY).exists():
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"building the lab's Debian {SUITE} root with debootstrap (once; cached in {cache})")
        log = cache / "debootstrap.log"
        result = process.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(tmp),
                mirror(),
            ],
            check=False,
        )
        log.write_text(result.stdout + result.stderr)
        if not result.ok:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FleetError(f"debootstrap failed ({result.last_error_line()}); see {log}")
        customise(tmp)
        (tmp / READY).touch()
        tmp.rename(final)
        return final


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def customise(root: Path) -> None:
    """Make the root a template: no identity of its own, fast boot, sshd keyed per host."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _write(root / "etc/ssh/sshd_config.d/fleet-lab.conf", SSHD_CONFIG)
    _write(root / "etc/nix/nix.conf", NIX_CONFIG)
    _write(root / "usr/local/sbin/fleet-lab-boot", BOOT_SCRIPT, 0o755)
    _write(root / "etc/systemd/system/fleet-lab-boot.service", BOOT_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "fleet-lab-boot.service").symlink_to("/etc/systemd/system/fleet-lab-boot.service")
    for folder in ("timers.target.wants", "getty.target.wants"):
        for link in (root / "etc/systemd/system" / folder).glob("*"):
            link.unlink()
    (root / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
    (root / "etc/hostname").unlink(missing_ok=True)  # systemd keeps the name nspawn gives
    (root / "etc/machine-id").write_text("")  # each boot gets its own
    for folder in ("nix", "boot", "etc/ssh/lab"):
        (root / folder).mkdir(parents=True, exist_ok=True)
