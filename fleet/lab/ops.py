"""What `fleet lab` does: bring a lab up, tear it down, report it, break it on purpose."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from fleet import nix, process
from fleet.errors import FleetError, HostKeyError, NixError, SshError, UsageError
from fleet.lab import boot, containers, flake, limits, network, rootfs
from fleet.lab.layout import MAX_HOSTS, TMPFS_SIZE, Lab, LabHost
from fleet.ssh import Endpoint, SshConfig, Transport

DEFAULT_HOSTS = 3
REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "nix": "nix-bin",
}

# The lab needs nothing from binary caches; asking them only waits for time-outs offline.
OFFLINE = {"substituters": ""}

Say = Callable[[str], None]

# Wait for the host's boot to finish. A host that is shutting down (for a reboot) says so
# with GOING_DOWN, and is waited for again. A boot unit that failed (seen rarely, under
# load) gets a few restarts; a host still degraded after them says which units and why.
GOING_DOWN = 75
BOOTED = rf"""
state=$(systemctl is-system-running --wait 2>/dev/null)
[ "$state" = stopping ] && exit {GOING_DOWN}
for attempt in 1 2 3; do
  [ "$state" = running ] && exit 0
  failed=$(systemctl list-units --failed --plain --no-legend | cut -d' ' -f1)
  [ -n "$failed" ] && systemctl restart $failed
  sleep 1
  state=$(systemctl is-system-running)
done
[ "$state" = running ] && exit 0
for unit in $(systemctl list-units --failed --plain --no-legend | cut -d' ' -f1); do
  echo "$unit failed:" $(journalctl -b -u "$unit" -n 3 --no-pager -o cat) >&2
done
exit 1
"""


class Fault(StrEnum):
    PARTITION = "partition"
    HEAL = "heal"
    STOP_SSH = "stop-ssh"
    START_SSH = "start-ssh"
    CRASH = "crash"
    REBOOT = "reboot"
    FILL_DISK = "fill-disk"
    FREE_DISK = "free-disk"


@dataclass(frozen=True)
class HostState:
    name: str
    address: str
    running: bool
    link_up: bool
    ssh: bool


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what}: must run as root (it makes namespaces, mounts and containers)")


def _require_tools() -> None:
    missing = [
        f"{tool} (package {pkg})"
        for tool, pkg in REQUIRED_TOOLS.items()
        if shutil.which(tool) is None
    ]
    if missing:
        raise FleetError(f"the lab needs {', '.join(missing)}: install with apt-get")


@contextlib.contextmanager
def _locked(lab: Lab) -> Iterator[None]:
    lab.lock.parent.mkdir(parents=True, exist_ok=True)
    with lab.lock.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _mounts_under(path: Path) -> list[Path]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix):
            found.append(Path(target))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _keygen(path: Path, comment: str) -> str:
    process.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _signing_keygen(lab: Lab) -> str:
    """A Nix signing key pair for the lab's closures; the public half."""
    public = lab.signing_key.with_suffix(".pub")
    process.run(
        ["nix-store", "--generate-binary-cache-key", f"fleet-lab{lab.instance}-1",
         str(lab.signing_key), str(public)]
    )  # fmt: skip
    lab.signing_key.chmod(0o600)
    return public.read_text().strip()


def _cache_keygen(lab: Lab) -> tuple[str, str]:
    """The binary cache's own key pair (lab up --cache): its secret and public halves."""
    secret, public = lab.state / "cache-key", lab.state / "cache-key.pub"
    process.run(
        ["nix-store", "--generate-binary-cache-key", f"fleet-lab{lab.instance}-cache-1",
         str(secret), str(public)]
    )  # fmt: skip
    return secret.read_text().strip(), public.read_text().strip()


def _profile_link(root: Path, path: str) -> None:
    """Generation 1 of the system profile and the boot entry, as an installer leaves them."""
    profiles = root / "nix/var/nix/profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    (profiles / "system-1-link").symlink_to(path)
    (profiles / "system").symlink_to("system-1-link")
    (root / "boot/lab").mkdir(parents=True, exist_ok=True)
    (root / "boot/lab/default").symlink_to(path)
    # As on NixOS: garbage collection never takes the running or the booted system, nor a
    # generation (the copy into the root left a link to the profiles as this machine sees
    # them, which names nothing inside the host).
    gcroots = root / "nix/var/nix/gcroots"
    gcroots.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("current-system", "/run/current-system"),
        ("booted-system", "/run/booted-system"),
        ("profiles", "/nix/var/nix/profiles"),
    ):
        (gcroots / name).unlink(missing_ok=True)
        (gcroots / name).symlink_to(target)


def _create(
    lab: Lab,
    hosts: list[LabHost],
    say: Say,
    balancers: int = 0,
    monitoring: bool = False,
    cache: bool = False,
) -> None:
    """State, keys, flake and each host's disk with generation 1 installed."""
    lab.state.mkdir(parents=True, exist_ok=True)
    _keygen(lab.identity, f"fleet-lab{lab.instance}")
    public = _signing_keygen(lab)
    names = [h.name for h in hosts]
    # From the end: the cache host, the monitoring host, the balancers.
    cached = names[-1] if cache else None
    rest = names[:-1] if cache else names
    watchers = rest[-1:] if monitoring else []
    served = rest[: len(rest) - len(watchers)]
    settings: dict[str, object] | None = None
    nix_conf = f"trusted-public-keys = {public}\n"
    if cached is not None:
        cache_secret, cache_public = _cache_keygen(lab)
        address = next(h.address for h in hosts if h.name == cached)
        settings = {"server": cached, "port": flake.CACHE_PORT, "publicKey": cache_public,
                    "secretKeyFile": flake.CACHE_SECRET_KEY}  # fmt: skip
        # As the host module sets every host's Nix: the cache first, its key trusted.
        nix_conf = (
            f"trusted-public-keys = {public} {cache_public}\n"
            f"substituters = http://{address}:{flake.CACHE_PORT}\n"
            "narinfo-cache-negative-ttl = 0\n"
        )
    keys = {}
    for host in hosts:
        ssh_dir = lab.host_dir(host) / "ssh"
        ssh_dir.mkdir(parents=True)
        conf = lab.host_dir(host) / "conf"
        conf.mkdir()
        (conf / "nix.conf").write_text(nix_conf)
        if host.name == cached:
            secret = conf / Path(flake.CACHE_SECRET_KEY).name
            secret.touch(mode=0o600)
            secret.write_text(cache_secret)
        keys[host.name] = _keygen(ssh_dir / "ssh_host_ed25519_key", host.name)
        shutil.copy(lab.identity.with_suffix(".pub"), ssh_dir / "authorized_keys")
        root = lab.host_root(host)
        root.mkdir()
        process.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={TMPFS_SIZE},mode=0755",
                f"fleetlab{lab.instance}-{host.name}",
                str(root),
            ]
        )
        for folder in ("nix", "boot", "var-fleet"):
            (root / folder).mkdir()
    flake.write(lab, hosts, keys, served[len(served) - balancers :], watchers, settings)
    lab.known_hosts.write_text("".join(f"{h.address} {keys[h.name]}\n" for h in hosts))
    say(f"building generation 1 for {len(hosts)} hosts")
    try:
        paths = nix.build_systems(str(lab.flake), [h.name for h in hosts], OFFLINE)
    except NixError as exc:
        if "/bin/sh" in str(exc):
            raise FleetError(
                "the lab's systems are built with /bin/sh, which Nix's build sandbox hides: "
                "set `sandbox = false` in /etc/nix/nix.conf (Debian's nix-setup-systemd does)"
            ) from exc
        raise
    for host in hosts:
        nix.copy_to_root(lab.host_root(host), paths[host.name])
        _profile_link(lab.host_root(host), paths[host.name])


def transport(lab: Lab) -> Transport:
    """A transport with the lab's identity; host keys come pinned from the lab's flake."""
    return Transport(SshConfig(identity_file=lab.identity, connect_timeout=5))


def endpoints(lab: Lab) -> list[Endpoint]:
    loaded = flake.spec(lab) or {"hosts": {}}
    return [
        Endpoint(name, h["address"], h["sshPort"], h["sshUser"], h["hostKey"])
        for name, h in loaded["hosts"].items()
    ]


def _port_open(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class _Waited:
    """How one host's wait ended."""

    booted: bool = False
    ended: bool = False
    key_mismatch: bool = False
    degraded: str | None = None
    ssh_error: str | None = None  # the last ssh attempt's error


def _poll_pause(waited: float) -> float:
    """Short at first, for a quick boot; longer later, so that many waiting hosts do not
    take the CPU their boots need."""
    return 0.1 if waited < 10 else 0.5


def _wait_one(
    lab: Lab,
    remote: Transport,
    host: LabHost,
    endpoint: Endpoint,
    deadline: float,
    after: Mapping[str, int | None],
) -> _Waited:
    """Wait until the host answers ssh and has booted (if it is in ``after``: a boot other
    than that one), its container ends, or the deadline passes."""
    began = time.monotonic()
    last_error: str | None = None
    while True:
        if containers.nspawn_pid(lab, host) is None:
            return _Waited(ended=True)
        now = time.monotonic()
        if now > deadline:
            return _Waited(ssh_error=last_error)
        old_boot = host.name in after and _boot_id(lab, host) in (None, after[host.name])
        if old_boot or not _port_open(endpoint.address, endpoint.port, 0.5):
            time.sleep(_poll_pause(now - began))
            continue
        try:
            booted = remote.remote(endpoint).run(
                ["sh", "-c", BOOTED], fresh=True, timeout=max(1.0, deadline - now), check=False
            )
        except HostKeyError:
            return _Waited(key_mismatch=True)
        except SshError as exc:  # going down, or not yet up
            if isinstance(exc.__cause__, subprocess.TimeoutExpired):
                return _Waited()  # connected, and still booting at the deadline
            last_error = str(exc)
            time.sleep(_poll_pause(now - began))
            continue
        if booted.returncode == GOING_DOWN:
            time.sleep(0.1)
            continue
        if booted.ok:
            return _Waited(booted=True)
        return _Waited(degraded=booted.last_error_line())


def _inside(lab: Lab, host: LabHost, *argv: str) -> str | None:
    """A command's output inside the container; None if it could not be run."""
    try:
        result = containers.run_inside(lab, host, argv, check=False, timeout=10)
    except FleetError:
        return None
    return result.stdout.strip()


def _facts(
    lab: Lab, host: LabHost, endpoint: Endpoint, waited: _Waited, seconds: float, offset: int
) -> boot.HostFacts:
    """Everything that tells why a host did not come up, asked of the machine and the
    container (not over ssh, which is what failed)."""
    console, status = boot.console_tail(containers.console(lab, host), offset)
    facts = boot.HostFacts(
        host.name,
        seconds,
        ended=waited.ended,
        exit_status=status,
        console=console,
        key_mismatch=waited.key_mismatch,
        degraded=waited.degraded,
        ssh_error=waited.ssh_error,
    )
    if waited.ended or waited.key_mismatch or waited.degraded is not None:
        return facts
    pid = containers.nspawn_pid(lab, host)
    if pid is None:  # it ended since
        return replace(
            facts, ended=True, console=boot.console_tail(containers.console(lab, host), offset)[0]
        )
    if containers.leader_pid(pid) is None:
        return replace(facts, leader=False)
    failed = _inside(lab, host, "systemctl", "list-units", "--failed", "--plain", "--no-legend")
    return replace(
        facts,
        link_up=network.link_is_up(host),
        system_state=_inside(lab, host, "systemctl", "is-system-running"),
        failed_units=tuple(line.split()[0] for line in (failed or "").splitlines() if line),
        sshd=_inside(lab, host, "systemctl", "is-active", "ssh.service"),
        port_open=_port_open(endpoint.address, endpoint.port, 1.0),
    )


def _bring_up(
    lab: Lab,
    hosts: Sequence[LabHost],
    image: Path | None,
    timeout: float,
    pace: boot.Pace = boot.PACE,
    after: Mapping[str, int | None] | None = None,
) -> list[boot.HostFacts]:
    """Start the hosts that are down (with ``image``; none without it), at most
    ``pace.window`` booting at once, and wait until every host answers ssh and has booted
    (for a host in ``after``: a boot other than that one). The facts of each host that did
    not, within ``timeout`` seconds of the start."""
    began = time.monotonic()
    deadline = began + timeout
    by_name = {e.name: e for e in endpoints(lab)}
    queue = deque(
        (h, image) for h in hosts if image is not None and containers.nspawn_pid(lab, h) is None
    )
    offsets: dict[str, int] = {}
    started: dict[str, float] = {}
    futures: dict[str, Future[_Waited]] = {}
    never: list[LabHost] = []
    with transport(lab) as remote, ThreadPoolExecutor(max_workers=64) as pool:

        def wait(host: LabHost) -> None:
            futures[host.name] = pool.submit(
                _wait_one, lab, remote, host, by_name[host.name], deadline, after or {}
            )

        waiting = {h.name for h, _ in queue}
        for host in hosts:
            if host.name not in waiting:
                wait(host)
        while queue:
            now = time.monotonic()
            if now > deadline:
                never = [h for h, _ in queue]
                break
            booting = [
                f for name, f in futures.items()
                if name in started and not f.done() and now - started[name] < pace.stall
            ]  # fmt: skip
            for _ in range(min(pace.window - len(booting), len(queue))):
                host, root = queue.popleft()
                log = containers.console(lab, host)
                offsets[host.name] = log.stat().st_size if log.exists() else 0
                containers.start(lab, host, root)
                started[host.name] = time.monotonic()
                wait(host)
            if queue:  # until a booting host answers, or half a second for the stalled
                pending = [f for name, f in futures.items() if name in started and not f.done()]
                futures_wait(pending, 0.5, FIRST_COMPLETED)
        ended = {name: f.result() for name, f in futures.items()}
        stop = time.monotonic()
        failed = [h for h in hosts if h.name in ended and not ended[h.name].booted]
        facts = list(
            pool.map(
                lambda h: _facts(
                    lab,
                    h,
                    by_name[h.name],
                    ended[h.name],
                    stop - started.get(h.name, began),
                    offsets.get(h.name, 0),
                ),
                failed,
            )
        )
    facts += [boot.HostFacts(h.name, stop - began, started=False) for h in never]
    order = {h.name: i for i, h in enumerate(hosts)}
    return sorted(facts, key=lambda f: order[f.name])


def _not_up(facts: Sequence[boot.HostFacts], total: int) -> FleetError:
    lines = "".join(f"\n  {boot.describe(f)}" for f in facts)
    return FleetError(f"{len(facts)} of {total} lab hosts did not come up:{lines}")


def _boot_id(lab: Lab, host: LabHost) -> int | None:
    pid = containers.nspawn_pid(lab, host)
    return None if pid is None else containers.leader_pid(pid)


def boot_ids(lab: Lab) -> dict[str, int | None]:
    """Each host's current boot, to tell a later one from it (the machine's pid of the
    host's PID 1); None for a host that is down or between two boots."""
    return {h.name: _boot_id(lab, h) for h in flake.hosts(lab) or []}


def wait_booted(
    lab: Lab,
    names: Sequence[str],
    timeout: float | None = None,
    *,
    after: Mapping[str, int | None] | None = None,
) -> None:
    """Wait until the named hosts answer ssh with their pinned keys and have booted, as
    ``lab up`` does, but without starting any: for hosts that reboot by themselves.

    A host that is shutting down is waited for until its next boot; ``after`` (from
    ``boot_ids`` before the reboot was asked for) waits for a boot other than the one named
    there, for a reboot that may not have begun yet. Raises FleetError naming, one line
    each, the hosts that booted degraded, did not answer within ``timeout`` (default: the
    lab's deadline for that many hosts), or are down (a crash or a power-off ends the
    container; only ``lab up`` boots it again).
    """
    wanted = [_host(lab, name) for name in names]
    limit = boot.PACE.deadline(len(wanted)) if timeout is None else timeout
    failed = _bring_up(lab, wanted, None, limit, after=after)
    if failed:
        raise _not_up(failed, len(wanted))


def _boot(lab: Lab, hosts: list[LabHost], image: Path, timeout: float, pace: boot.Pace) -> None:
    """Start the hosts that are down; a host that boots degraded is booted once more."""
    failed = _bring_up(lab, hosts, image, timeout, pace)
    again = {f.name for f in failed if f.degraded is not None}
    if again:
        hosts_again = [h for h in hosts if h.name in again]
        containers.kill(
            [pid for h in hosts_again if (pid := containers.nspawn_pid(lab, h)) is not None]
        )
        retried = _bring_up(lab, hosts_again, image, pace.deadline(len(hosts_again)), pace)
        failed = [f for f in failed if f.name not in again] + retried
    if failed:
        raise _not_up(failed, len(hosts))


def _stale(lab: Lab, hosts: list[LabHost]) -> bool:
    """A lab whose host disks are gone (the machine rebooted) cannot be resumed."""
    mounted = set(_mounts_under(lab.state))
    return any(lab.host_root(h) not in mounted for h in hosts)


def up(
    lab: Lab,
    count: int | None,
    say: Say,
    balancers: int = 0,
    monitoring: bool = False,
    cache: bool = False,
    *,
    timeout: float | None = None,
    pace: boot.Pace = boot.PACE,
) -> list[HostState]:
    """``balancers``: how many of the hosts run HAProxy in front of the others' lab-web,
    instead of lab-web; ``monitoring``: a host runs Prometheus, Alertmanager and the
    blackbox exporter instead; ``cache``: the last host serves the fleet's binary cache
    instead (the monitoring host is the one before it, the balancers before those).
    ``timeout``: seconds for every host to boot and answer ssh (default ``pace.deadline``
    of the hosts started); ``pace``: how many boot at once."""
    require_root("fleet lab up")
    if count is not None and not 1 <= count <= MAX_HOSTS:
        raise UsageError(f"--hosts {count}: expected 1 to {MAX_HOSTS}")
    if (balancers or monitoring or cache) and count is None:
        raise UsageError("--balancers, --monitoring and --cache need --hosts")
    served = (count or 0) - monitoring - cache  # hosts that run lab-web or HAProxy
    if (monitoring or cache) and served < 1:
        raise UsageError("--monitoring and --cache need a host besides theirs: raise --hosts")
    if balancers and not 0 < balancers < served:
        extra = " less the monitoring and cache hosts" if monitoring or cache else ""
        raise UsageError(f"--balancers {balancers}: expected fewer than --hosts{extra}")
    _require_tools()
    with _locked(lab):
        existing = flake.hosts(lab)
        if existing is not None and count is not None and count != len(existing):
            raise UsageError(
                f"the lab is up with {len(existing)} hosts, not {count}: "
                "run `fleet lab down` first to change its size"
            )
        if existing is not None and _stale(lab, existing):
            say("the lab's host disks are gone (was the machine restarted?): making it anew")
            _teardown(lab)
            existing = None
        hosts = existing or lab.hosts(count or DEFAULT_HOSTS)
        stopped = [h for h in hosts if containers.nspawn_pid(lab, h) is None]
        limits.ensure(len(stopped), say)  # before anything is made: a refusal touches nothing
        image = rootfs.ensure(lab.cache, say)
        try:
            if existing is None:
                _create(lab, hosts, say, balancers, monitoring, cache)
            else:
                flake.write_template(lab)  # the next systems carry this package's programs
            network.ensure_bridge(lab)
            present = network.namespaces(lab.netns_prefix)
            for host in hosts:
                network.ensure_host(lab, host, present)
            wait = pace.deadline(len(stopped)) if timeout is None else timeout
            _boot(lab, hosts, image, wait, pace)
        except BaseException:
            if existing is None:
                _teardown(lab)
            raise
    return status(lab)


def _teardown(lab: Lab) -> None:
    containers.kill(containers.stray_nspawns(lab))
    for mount in _mounts_under(lab.state):
        process.run(["umount", "--lazy", str(mount)], check=False)
    network.remove_all(lab)
    shutil.rmtree(lab.state, ignore_errors=True)


def down(lab: Lab) -> None:
    """Remove every container, namespace, link, bridge, mount and file of the lab; idempotent."""
    require_root("fleet lab down")
    with _locked(lab):
        _teardown(lab)


def status(lab: Lab) -> list[HostState]:
    hosts = flake.hosts(lab) or []

    def probe(host: LabHost) -> HostState:
        running = containers.nspawn_pid(lab, host) is not None
        link_up = network.link_is_up(host)
        ssh = running and link_up and _port_open(host.address, 22, 1.0)
        return HostState(host.name, host.address, running, link_up, ssh)

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(probe, hosts))


def _host(lab: Lab, name: str) -> LabHost:
    hosts = flake.hosts(lab)
    if hosts is None:
        raise UsageError("no lab is up: run `fleet lab up` first")
    for host in hosts:
        if host.name == name:
            return host
    raise UsageError(f"no lab host {name!r}; the lab has {', '.join(h.name for h in hosts)}")


def _fill_file(lab: Lab, host: LabHost) -> Path:
    return lab.host_root(host) / "fill"  # beside nix/ on the host's disk, invisible inside


def fault(lab: Lab, name: str, action: Fault) -> None:
    require_root("fleet lab fault")
    host = _host(lab, name)
    if action in (Fault.PARTITION, Fault.HEAL):
        network.set_link(host, up=action is Fault.HEAL)
    elif action in (Fault.STOP_SSH, Fault.START_SSH):
        verb = "start" if action is Fault.START_SSH else "stop"
        containers.run_inside(lab, host, ["systemctl", verb, "ssh.service"])
    elif action is Fault.CRASH:
        pid = containers.nspawn_pid(lab, host)
        if pid is None:
            raise FleetError(f"lab host {name} is not running")
        containers.kill([pid])
    elif action is Fault.REBOOT:
        # As `systemctl reboot`: the shutdown is queued when this returns, the new boot
        # comes by itself (see `wait_booted`).
        containers.run_inside(lab, host, ["systemctl", "reboot"])
    elif action is Fault.FILL_DISK:
        stat = os.statvfs(lab.host_root(host))
        with _fill_file(lab, host).open("ab") as fill:
            os.posix_fallocate(fill.fileno(), fill.tell(), stat.f_bavail * stat.f_frsize)
    elif action is Fault.FREE_DISK:
        _fill_file(lab, host).unlink(missing_ok=True)


def release(lab: Lab, wanted: flake.LabRelease) -> None:
    wanted.validate()  # what is wrong with the release first, whatever the lab's state
    hosts = flake.hosts(lab)
    if hosts is None:
        raise UsageError("no lab is up: run `fleet lab up` first")
    names = [h.name for h in hosts]
    for name in wanted.broken_hosts:
        if name not in names:
            raise UsageError(f"--on {name!r}: no such lab host; the lab has {', '.join(names)}")
    flake.set_release(lab, wanted)
