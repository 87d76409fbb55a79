"""Lab hosts as systemd-nspawn containers: systemd as PID 1, root overlaid on the cache."""

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


def nspawn_pid(lab: Lab, host: LabHost) -> int | None:
    """The running nspawn of this host, checked against its command line (pids get reused)."""
    try:
        pid = int(_pid_file(lab, host).read_text())
    except (OSError, ValueError):
        return None
    return pid if _marker(host) in _cmdline(pid) else None


def stray_nspawns(lab: Lab) -> list[int]:
    """nspawn processes of this instance, found by their namespace even if state was lost."""
    needle = f"--network-namespace-path=/run/netns/{lab.netns_prefix}"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if (
                argv
                and argv[0].endswith("systemd-nspawn")
                and any(a.startswith(needle) for a in argv)
            ):
                found.append(int(entry.name))
    return found


def leader_pid(nspawn: int) -> int | None:
    """The container's PID 1 is the one child nspawn keeps."""
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


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
        "--link-journal=no",
    ]  # fmt: skip
    log = (lab.host_dir(host) / "console.log").open("ab")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    _pid_file(lab, host).write_text(str(proc.pid))
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


def kill(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Kill containers at once, as a power cut would, and wait for their nspawn to clean up."""
    for pid in pids:
        leader = leader_pid(pid)
        target = leader if leader is not None else pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def run_inside(lab: Lab, host: LabHost, argv: Sequence[str]) -> process.Result:
    """Run a command in a running container's namespaces, without ssh."""
    pid = nspawn_pid(lab, host)
    leader = leader_pid(pid) if pid else None
    if leader is None:
        raise FleetError(f"lab host {host.name} is not running")
    return process.run(
        ["nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "--", *argv],
        what=f"{host.name}: {' '.join(argv)}",
    )
