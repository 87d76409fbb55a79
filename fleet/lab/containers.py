"""Lab hosts as systemd-nspawn containers: systemd as PID 1, root overlaid on the cache.

Each container runs under a small supervising shell, the host's "power supply": nspawn
exits with 133 when the container's systemd reboots (systemd-nspawn@.service restarts on
that code), and the supervisor boots it again, as a machine comes back from a reboot. Any
other end of nspawn (a crash, a power-off) ends the supervisor too, which writes nspawn's
exit status as the last line of the console log: only ``lab up`` boots such a host again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from fleet import process
from fleet.errors import FleetError
from fleet.lab.layout import Lab, LabHost

# nspawn's exit code when the container asked for a reboot.
REBOOT_EXIT = 133
SUPERVISOR = "fleet-lab-host"  # $0 of the supervising shell
SUPERVISE = f"""\
while "$@"; rc=$?; [ $rc -eq {REBOOT_EXIT} ]; do
  echo "fleet lab: the host rebooted; booting it again"
done
echo "fleet lab: the container ended with status $rc"
exit $rc
"""


def _pid_file(lab: Lab, host: LabHost) -> Path:
    return lab.host_dir(host) / "nspawn.pid"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _marker(host: LabHost) -> str:
    return f"--network-namespace-path=/run/netns/{host.netns}"


def _is_nspawn(argv: list[str]) -> bool:
    return bool(argv) and argv[0].endswith("systemd-nspawn")


def _is_supervisor(argv: list[str]) -> bool:
    return len(argv) > 3 and argv[1] == "-c" and argv[3] == SUPERVISOR


def nspawn_pid(lab: Lab, host: LabHost) -> int | None:
    """The host's running container: its supervisor, which lives on across the host's
    reboots; checked against its command line (pids get reused)."""
    try:
        pid = int(_pid_file(lab, host).read_text())
    except (OSError, ValueError):
        return None
    return pid if _marker(host) in _cmdline(pid) else None


def stray_nspawns(lab: Lab) -> list[int]:
    """Supervisors and nspawn processes of this instance, found by their namespace even if
    state was lost."""
    needle = f"--network-namespace-path=/run/netns/{lab.netns_prefix}"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if (_is_nspawn(argv) or _is_supervisor(argv)) and any(
                a.startswith(needle) for a in argv
            ):
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _nspawn_of(pid: int) -> int | None:
    """``pid`` if it is an nspawn, else the nspawn its supervisor runs now (none while the
    host is between two boots)."""
    if _is_nspawn(_cmdline(pid)):
        return pid
    return next((c for c in _children(pid) if _is_nspawn(_cmdline(c))), None)


def leader_pid(pid: int) -> int | None:
    """The container's PID 1: the one child nspawn keeps (``pid``: nspawn or its supervisor)."""
    nspawn = _nspawn_of(pid)
    children = _children(nspawn) if nspawn is not None else []
    return children[0] if children else None


def console(lab: Lab, host: LabHost) -> Path:
    """What nspawn, the container's systemd and the supervisor print, every boot appended."""
    return lab.host_dir(host) / "console.log"


def start(lab: Lab, host: LabHost, rootfs: Path) -> int:
    root = lab.host_root(host)
    ssh_dir = lab.host_dir(host) / "ssh"
    argv = [
        "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
        f"--directory={rootfs}", "--volatile=overlay",
        f"--machine={host.name}", f"--hostname={host.name}",
        _marker(host),
        f"--bind={root / 'nix'}:/nix", f"--bind={root / 'boot'}:/boot",
        f"--bind={root / 'var-fleet'}:/var/lib/fleet",
        f"--bind-ro={ssh_dir}:/etc/ssh/lab",
        f"--bind-ro={lab.host_dir(host) / 'conf'}:/etc/fleet-lab",
        "--link-journal=no",
    ]  # fmt: skip
    log = console(lab, host).open("ab")
    proc = subprocess.Popen(
        ["sh", "-c", SUPERVISE, SUPERVISOR, *argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    _pid_file(lab, host).write_text(str(proc.pid))
    # Popen returns while the exec is still under way, before the kernel shows the new
    # command line: until then nspawn_pid would take the host for down.
    deadline = time.monotonic() + 5
    while _marker(host) not in _cmdline(proc.pid) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.001)
    return proc.pid


def _alive(pid: int) -> bool:
    # A zombie child of ours still has /proc/PID; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    return Path(f"/proc/{pid}").exists() and _cmdline(pid) != []


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _stopped(pid: int) -> bool:
    """Stopped, a zombie, or gone: in no state to start another nspawn."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("T", "t", "Z", "X")


def kill(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Kill containers at once, as a power cut would, and wait for their nspawn to clean up.

    ``pids`` are supervisors or nspawns. A supervisor is stopped first, so that it cannot
    boot its host again, and killed last; each nspawn's container is killed (never nspawn
    itself while it has one: its container would live on without it).
    """
    deadline = time.monotonic() + timeout
    supervisors = [p for p in pids if _is_supervisor(_cmdline(p))]
    for pid in supervisors:
        _signal(pid, signal.SIGSTOP)
    for pid in supervisors:
        while not _stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    nspawns = {p for p in pids if p not in supervisors}
    nspawns.update(n for p in supervisors if (n := _nspawn_of(p)) is not None)
    killed: set[int] = set()
    while alive := [n for n in nspawns if _alive(n)]:
        for nspawn in alive:
            # A container that is still being made gets its leader an instant later.
            leader = leader_pid(nspawn)
            if leader is not None and leader not in killed:
                _signal(leader, signal.SIGKILL)
                killed.add(leader)
        if time.monotonic() > deadline:
            for nspawn in alive:
                _signal(nspawn, signal.SIGKILL)
            break
        time.sleep(0.05)
    for pid in supervisors:
        _signal(pid, signal.SIGKILL)
    for pid in supervisors:
        while _alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.01)


def run_inside(
    lab: Lab,
    host: LabHost,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
) -> process.Result:
    """Run a command in a running container's namespaces, without ssh."""
    pid = nspawn_pid(lab, host)
    leader = leader_pid(pid) if pid else None
    if leader is None:
        raise FleetError(f"lab host {host.name} is not running")
    return process.run(
        ["nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "--", *argv],
        check=check,
        timeout=timeout,
        what=f"{host.name}: {' '.join(argv)}",
    )
