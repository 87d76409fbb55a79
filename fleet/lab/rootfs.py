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
    "sudo",
    "haproxy",  # the balancer hosts' (lab up --balancers); the package's unit stays masked
    # The monitoring host's (lab up --monitoring) and every host's node exporter; the
    # packages' own units stay masked too.
    "prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter",
    "prometheus-node-exporter",
    "nginx-light",  # the binary cache host's (lab up --cache); the package's unit stays masked
)  # fmt: skip
# Bump when customise() changes: a cached root of an older layout is customised again.
LAYOUT_VERSION = "9"
# Units that fail or make no sense in a container; a failed unit fails every switch.
# Debian's own units of the balancer's and the monitoring's programs run Debian's
# configuration; a lab host runs its system's own units of them.
MASKED = (
    "console-getty.service", "systemd-remount-fs.service", "haproxy.service",
    "prometheus.service", "prometheus-alertmanager.service",
    "prometheus-blackbox-exporter.service", "prometheus-node-exporter.service",
    "nginx.service",
)  # fmt: skip
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
# The lab's signing key (each lab makes its own), as a host's fleet.trustedPublicKeys.
!include /etc/fleet-lab/nix.conf
"""

# A deploy user other than root, as the host module makes one: it logs in with the lab's
# key (sshd's AuthorizedKeysFile is the same for every user), Nix does not trust it, and
# sudo lets it run the running system's fleet-host and nothing else.
DEPLOY_USER = "deploy"
DEPLOY_UID = 1500
SUDOERS = f"""\
{DEPLOY_USER} ALL=(root) NOPASSWD:NOSETENV: /run/current-system/sw/bin/fleet-host
"""

# Root uses the store directly; any other user goes through the daemon, which accepts
# only closures signed by a trusted key from a user it does not trust.
NIX_DAEMON_UNIT = """\
[Unit]
Description=Nix daemon

[Service]
ExecStartPre=/bin/mkdir -p /nix/var/nix/daemon-socket
ExecStart=/usr/bin/nix-daemon
KillMode=process

[Install]
WantedBy=multi-user.target
"""

BOOT_SCRIPT = """\
#!/bin/sh
# The lab's boot loader and stage 2: activate the one-shot entry if there is one, else the
# default entry, as NixOS activates the generation its boot loader chose; then let that
# system's fleet-host resolve whatever transaction a crash or a reboot left.
# The host's own name resolves (sudo looks it up), as on Debian and NixOS installs.
grep -q "^127.0.1.1 " /etc/hosts || printf '127.0.1.1 %s\n' "$(hostname)" >> /etc/hosts
oneshot=/boot/lab/oneshot
system=
if [ -L "$oneshot" ] || [ -e "$oneshot" ]; then
  system=$(readlink -f "$oneshot")
  # Removed before it is used, so that a boot that fails does not use it again.
  rm -f "$oneshot"
  if [ ! -x "$system/bin/switch-to-configuration" ]; then
    echo "the one-shot entry $system is no system; booting the default entry" >&2
    system=
  fi
fi
if [ -z "$system" ]; then
  [ -e /boot/lab/default ] || exit 0
  system=$(readlink -f /boot/lab/default)
fi
echo "booting $system"
ln -sfn "$system" /run/booted-system
status=0
"$system/bin/switch-to-configuration" test || status=$?
if [ -x "$system/sw/bin/fleet-host" ]; then
  "$system/sw/bin/fleet-host" boot || echo "fleet-host boot failed with exit code $?" >&2
fi
exit "$status"
"""

# Type=oneshot: the boot (multi-user.target, `systemctl is-system-running --wait`) is done
# when activation and fleet-host's recovery are. Neither may wait for systemd's whole job
# queue to drain: this unit's own start job, and the targets after it, leave it only when
# this unit ends. Units they start (the system's own, transient ones) are ordered after
# basic.target only, which is reached before this unit starts.
BOOT_UNIT = """\
[Unit]
Description=Activate the lab host's boot generation
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
# A broken boot generation shows as its own failed units, not as this one; so does a
# transaction fleet-host could not resolve, in its own words in this unit's journal.
ExecStart=-/usr/local/sbin/fleet-lab-boot

[Install]
WantedBy=multi-user.target
"""


def mirror() -> str:
    return os.environ.get("FLEET_LAB_MIRROR", "http://deb.debian.org/debian")


def cache_key() -> str:
    text = "\n".join([SUITE, *PACKAGES])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _current(root: Path) -> bool:
    marker = root / READY
    return marker.exists() and marker.read_text().strip() == LAYOUT_VERSION


def ensure(cache: Path, say: Callable[[str], None]) -> Path:
    """The cached root, made once with debootstrap; concurrent callers wait for one build."""
    final = cache / f"rootfs-{cache_key()}"
    if _current(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "rootfs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(final):
            return final
        if (final / READY).exists():  # debootstrapped by an older layout: only customise
            customise(final)
            (final / READY).write_text(LAYOUT_VERSION + "\n")
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
        (tmp / READY).write_text(LAYOUT_VERSION + "\n")
        tmp.rename(final)
        return final


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _link(link: Path, target: str) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def customise(root: Path) -> None:
    """Make the root a template: no identity of its own, fast boot, sshd keyed per host.

    Idempotent, so that a cached root can be brought to a newer layout.
    """
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _write(root / "etc/ssh/sshd_config.d/fleet-lab.conf", SSHD_CONFIG)
    _write(root / "etc/nix/nix.conf", NIX_CONFIG)
    _write(root / "usr/local/sbin/fleet-lab-boot", BOOT_SCRIPT, 0o755)
    _write(root / "etc/systemd/system/fleet-lab-boot.service", BOOT_UNIT)
    _write(root / "etc/systemd/system/nix-daemon.service", NIX_DAEMON_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("fleet-lab-boot.service", "nix-daemon.service"):
        _link(wants / unit, f"/etc/systemd/system/{unit}")
    _add_deploy_user(root)
    for folder in ("timers.target.wants", "getty.target.wants"):
        for link in (root / "etc/systemd/system" / folder).glob("*"):
            link.unlink()
    for unit in MASKED:
        _link(root / "etc/systemd/system" / unit, "/dev/null")
    (root / "etc/hostname").unlink(missing_ok=True)  # systemd keeps the name nspawn gives
    (root / "etc/machine-id").write_text("")  # each boot gets its own
    for folder in ("nix", "boot", "etc/ssh/lab", "etc/fleet-lab"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def _add_deploy_user(root: Path) -> None:
    """The deploy user, its group and home, and its one sudo rule; idempotent."""
    entries = {
        "etc/passwd": f"{DEPLOY_USER}:x:{DEPLOY_UID}:{DEPLOY_UID}:fleet deployments:"
        f"/home/{DEPLOY_USER}:/bin/sh",
        "etc/group": f"{DEPLOY_USER}:x:{DEPLOY_UID}:",
        "etc/shadow": f"{DEPLOY_USER}:*:19000:0:99999:7:::",
    }
    for name, line in entries.items():
        path = root / name
        lines = path.read_text().splitlines()
        if not any(x.split(":", 1)[0] == DEPLOY_USER for x in lines):
            path.write_text("\n".join([*lines, line]) + "\n")
    home = root / "home" / DEPLOY_USER
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, DEPLOY_UID, DEPLOY_UID)
    _write(root / "etc/sudoers.d/fleet", SUDOERS, 0o440)
