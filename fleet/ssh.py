"""The ssh transport: one OpenSSH master connection per host, commands multiplexed over it.

OpenSSH (not a Python ssh library) because Nix copies closures with it too: one client,
one ssh_config (aliases, ProxyJump), one host-key policy for every connection the tool
makes. Host keys are always checked: pinned keys from the inventory go into a
known_hosts file of this run, other hosts are looked up in the operator's known_hosts.

Jump hosts (the operator's ``jumpHost``) are checked the same way. OpenSSH reaches a
jump host with a child ``ssh [-l user] [-p port] [-F file] -W '[%h]:%p' host`` that
inherits none of our ``-o`` options, only ``-F``. So a run with jump hosts writes its own
ssh_config (``Transport.jump_config``, see ``jump_ssh_config``) and passes ``-F`` with it to
every ssh (Nix's included): one ``Host`` block per jump host with our options, then
``Match all`` and ``Include`` of the operator's own files. ssh keeps the first value it
obtains for each option, so nothing the operator's files say can replace how a jump host is
verified or which way it is reached.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import selectors
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fleet import interrupt, process
from fleet.errors import FleetError, HostKeyError, Interrupted, SshError, UsageError, printable
from fleet.process import Result

# What OpenSSH prints when it refuses a host key (unknown, changed, or mismatched alias).
_HOST_KEY_MESSAGES = (
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "host key is known",
)
# The lines that name the host (its HostKeyAlias when one is set) whose key was refused.
_REFUSED_KEY_OF = (
    re.compile(r"No \S+ host key is known for (\S+) and you have requested strict checking"),
    re.compile(r"Host key for (\S+) has changed and you have requested strict checking"),
)

# One hop of jumpHost: user@host:port, host a name, IPv4, or [IPv6] (config.py checks the
# same shape; checked again here because these words reach the shell that runs ssh's
# ProxyJump command).
_HOP = re.compile(
    r"(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?"
    r"(?:(?P<name>[A-Za-z0-9][A-Za-z0-9.-]{0,252})|\[(?P<v6>[0-9A-Fa-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_HOST_KEY = re.compile(r"[a-z0-9@.-]+ [A-Za-z0-9+/]+={0,2}")
# The run's directory is pasted into the jump command, which a shell runs after ssh expanded
# its %-tokens: it may hold these characters only. So may a host's address (%n there).
_SAFE_PATH = re.compile(r"[A-Za-z0-9/._-]+")
_SAFE_ADDRESS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# ssh's own defaults, written out so that the operator's files cannot change them.
_DEFAULT_USER_KNOWN_HOSTS = (".ssh/known_hosts", ".ssh/known_hosts2")
_DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


@dataclass(frozen=True)
class JumpHost:
    """One hop of the operator's ``jumpHost`` chain, and the key pinned for it, if any."""

    host: str  # a name or an address; IPv6 without brackets
    user: str | None = None
    port: int | None = None
    host_key: str | None = None  # "TYPE BASE64" from jumpHostKeys; None: known_hosts decides

    @property
    def spec(self) -> str:
        """The hop as ProxyJump takes it: ``[user@]host[:port]``, IPv6 in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = "" if self.user is None else self.user + "@"
        port = "" if self.port is None else f":{self.port}"
        return f"{user}{host}{port}"

    @property
    def known_as(self) -> str:
        """The name its key is looked up under, pinned as its HostKeyAlias: the host as
        written in jumpHost, as ssh writes it in known_hosts (``[host]:port`` off port 22).
        Whatever ``HostName`` the operator's ssh_config gives it, the key must be this one's.
        """
        if self.port is None or self.port == 22:
            return self.host
        return f"[{self.host}]:{self.port}"


def jump_chain(value: str, keys: Mapping[str, str] | None = None) -> tuple[JumpHost, ...]:
    """The hops of a ``jumpHost`` value (first hop first), with ``jumpHostKeys`` pinned.

    A host may appear once (its ssh_config block is chosen by its name alone), and every
    pinned key must name a hop: a key for a host that is not used is a typo, and would
    leave the hop it was meant for unpinned.
    """
    hops: list[JumpHost] = []
    keys = dict(keys or {})
    pinned = {host.strip("[]").lower(): key for host, key in keys.items()}
    for part in value.split(","):
        m = _HOP.fullmatch(part)
        port = int(m["port"]) if m is not None and m["port"] else None
        if m is None or (port is not None and not 0 < port < 65536):
            raise UsageError(f"jumpHost: expected user@host:port, comma-separated, got {part!r}")
        host = m["name"] or m["v6"]
        if any(h.host.lower() == host.lower() for h in hops):
            raise UsageError(f"jumpHost: {host} appears twice; each jump host may appear once")
        key = pinned.pop(host.lower(), None)
        if key is not None and not _HOST_KEY.fullmatch(key):
            raise UsageError(f"jumpHostKeys: {host}: expected TYPE BASE64, got {key!r}")
        hops.append(JumpHost(host, m["user"], port, key))
    if pinned:
        raise UsageError(
            f"jumpHostKeys: {', '.join(sorted(pinned))}: not a jump host of jumpHost {value!r}"
        )
    return tuple(hops)


@dataclass(frozen=True)
class SshConfig:
    """Operator-side settings shared by every connection of a run."""

    identity_file: Path | None = None
    known_hosts_file: Path | None = None  # for hosts without a pinned key; None: ssh's default
    connect_timeout: float = 10.0
    jump_hosts: tuple[JumpHost, ...] = ()  # the operator's jumpHost chain, first hop first
    # For jump hosts without a pinned key: the knownHostsFile of the operator's own config
    # (a checkout's may not vouch for the jump host the operator chose); None: ssh's default.
    jump_known_hosts_file: Path | None = None
    # The operator's sshOptions (config.SSH_OPTIONS only): given first, so they win.
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None  # pinned "TYPE BASE64"; None: the known_hosts lookup decides


class RemoteCommandError(FleetError):
    """A remote command ran and exited non-zero."""

    def __init__(
        self, host: str, argv: Sequence[str], result: Result, command: str | None = None
    ) -> None:
        self.host = host
        self.result = result
        self.command = command
        super().__init__(f"{host}: {shlex.join(argv)}: {result.last_error_line()}")


# What a master connection runs on the host: a word once the session is up, then nothing
# until its stdin closes, which happens when this process closes it or dies. So a master
# never outlives the run that opened it, and this process owns it (its pid): closing it
# needs no `ssh -O exit` of its own.
# The most a remote command may print: a host's answers, records and `fleet exec` output
# stay far below it; a host that sends more could fill the operator's memory.
REMOTE_OUTPUT_MAX = 64 << 20
MASTER_READY = "fleet-master-ready"
MASTER_COMMAND = ("sh", "-c", f"echo {MASTER_READY}; exec cat")

# Handshakes in progress at once: below sshd's default MaxStartups (10), which a jump host
# (every connection through it is one handshake there too) or a host would otherwise drop.
MAX_HANDSHAKES = 8


class Pacing:
    """At most ``slots`` connections being set up at once; an urgent one (a confirmation,
    whose host's dead-man switch is running) goes before every waiting routine one."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._free = self.slots
        self._urgent = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, *, urgent: bool = False) -> Iterator[None]:
        with self._cond:
            self._urgent += urgent
            try:
                while self._free == 0 or (not urgent and self._urgent > 0):
                    self._cond.wait()
            finally:
                self._urgent -= urgent
            self._free -= 1
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


class Transport:
    """Owns the run's control sockets and pinned known_hosts; hands out one Remote per host.

    It also bounds what the run asks of the network (``connection``): at most ``max_open``
    hosts have a master connection at once (the least recently used idle one is closed to
    make room; pinned remotes, the balancers and monitoring servers a rollout keeps
    talking to, are not counted), and at most ``max_handshakes`` connections are being
    set up at once. ``handshakes`` counts the connections set up, per host.
    """

    def __init__(
        self,
        config: SshConfig,
        max_open: int | None = None,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self.config = config
        self.max_open = max_open
        self.handshakes: Counter[str] = Counter()
        self.peak_open = 0
        self._pacing = Pacing(max_handshakes)
        self._cond = threading.Condition()
        self._open: OrderedDict[Remote, None] = OrderedDict()  # least recently used first
        self._closing: set[Remote] = set()  # evicted, their master being stopped
        self._busy: Counter[Remote] = Counter()
        self._pinned: set[Remote] = set()
        _sweep_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=_temp_root()))
        self.pinned_file = self.dir / "known_hosts"
        self.pinned_file.touch()
        # With jump hosts: the run's ssh_config (given to every ssh with -F) and the keys
        # jumpHostKeys pins, apart from the inventory's so that neither can stand for the
        # other under a shared name.
        self.jump_config: Path | None = None
        self.jump_pinned_file = self.dir / JUMP_PINNED
        if config.jump_hosts:
            try:
                text = jump_ssh_config(config, self.dir, _operator_ssh_configs())
            except SshError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            _write_private(
                self.jump_pinned_file,
                "".join(
                    f"{hop.known_as} {_key_type_and_blob(hop.host_key)}\n"
                    for hop in config.jump_hosts
                    if hop.host_key is not None
                ),
            )
            self.jump_config = self.dir / JUMP_CONFIG
            _write_private(self.jump_config, text)
        self._remotes: dict[Endpoint, Remote] = {}
        self._lock = threading.Lock()
        self._closed = False  # under _lock: no master starts once the run closes
        self._warming: ThreadPoolExecutor | None = None

    def remote(self, endpoint: Endpoint, *, pinned: bool = False) -> Remote:
        """The host's Remote; ``pinned``: its connection is kept for the whole run, outside
        the ``max_open`` budget (a balancer or monitoring server every host's work uses)."""
        with self._lock:
            existing = self._remotes.get(endpoint)
            if existing is None:
                if endpoint.host_key is not None:
                    with self.pinned_file.open("a") as f:
                        f.write(f"{endpoint.name} {_key_type_and_blob(endpoint.host_key)}\n")
                existing = self._remotes[endpoint] = Remote(endpoint, self)
            if pinned:
                self._pinned.add(existing)
            return existing

    @contextmanager
    def connection(self, remote: Remote, *, fresh: bool = False) -> Iterator[None]:
        """Hold a place for one command on ``remote`` (see the class): its master connection
        within the budget, closing an idle one first when the budget is spent. A ``fresh``
        connection (a confirmation's) is its host's second for a moment, not another host."""
        evicted: Remote | None = None
        with self._cond:
            self._busy[remote] += 1
            try:
                while remote in self._closing:  # its master is being stopped: wait for that
                    self._cond.wait()
                while not fresh and remote not in self._open:
                    counted = [r for r in self._open if r not in self._pinned]
                    if (
                        self.max_open is None
                        or remote in self._pinned
                        or len(counted) < self.max_open
                    ):
                        self._open[remote] = None
                        break
                    evicted = next((r for r in counted if not self._busy[r]), None)
                    if evicted is not None:
                        del self._open[evicted]
                        self._closing.add(evicted)
                        self._open[remote] = None
                        break
                    self._cond.wait()
            except BaseException:
                self._busy[remote] -= 1
                raise
            if remote in self._open:
                self._open.move_to_end(remote)
        try:
            if evicted is not None:
                try:
                    evicted.disconnect()  # before this host connects: never one more at once
                finally:
                    with self._cond:
                        self._closing.discard(evicted)
                        self._cond.notify_all()
            with self._cond:
                counted_now = sum(r not in self._pinned for r in self._open)
                self.peak_open = max(self.peak_open, counted_now)
            yield
        finally:
            with self._cond:
                self._busy[remote] -= 1
                self._cond.notify_all()

    @contextmanager
    def hold(self, remote: Remote) -> Iterator[None]:
        """Keep a host's master while a worker is on it, between its commands too: only a
        host nobody works on is closed to make room."""
        with self._cond:
            self._busy[remote] += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy[remote] -= 1
                self._cond.notify_all()

    def figures(self) -> dict[str, Any]:
        """What the run asked of the network, for the report: connections set up per host
        (a deploy needs two: its master and the confirmation's), and the most hosts
        connected at once."""
        with self._lock:
            return {"handshakes": dict(sorted(self.handshakes.items())),
                    "peakConnectedHosts": self.peak_open}  # fmt: skip

    @contextmanager
    def handshake(self, remote: Remote, *, urgent: bool = False) -> Iterator[None]:
        """Pace connection set-ups: at most ``max_handshakes`` at once, ``urgent`` first."""
        with self._pacing.slot(urgent=urgent):
            with self._lock:
                self.handshakes[remote.name] += 1
            yield

    def warm(self, remotes: Sequence[Remote]) -> None:
        """Set these hosts' master connections up now, in the background, paced as any
        other, so that their handshakes overlap what the run does first (evaluating and
        building the systems). A host that cannot be reached fails the command that waited
        for its warm-up with the error the warm-up met, not after a second time-out; one
        whose warm-up failed before anyone asked is tried again (``Remote.session``)."""
        if not remotes:
            return
        with self._lock:
            if self._closed:
                return
            if self._warming is None:
                self._warming = ThreadPoolExecutor(
                    min(len(remotes), self._pacing.slots), thread_name_prefix="fleet-warm"
                )
            for remote in remotes:
                self._warming.submit(remote.warm)

    def close(self) -> None:
        """Stop every master connection this run opened and remove its sockets."""
        with self._lock:
            self._closed = True
            warming, self._warming = self._warming, None
        if warming is not None:
            # A master still being set up is stopped now (its warm-up then ends at once),
            # and no other starts: then every master is stopped and reaped below.
            warming.shutdown(wait=False, cancel_futures=True)
            for remote in list(self._remotes.values()):
                remote.signal_master()
            warming.shutdown(wait=True)
        remotes = [r for r in self._remotes.values() if r.has_master]
        if remotes:
            with ThreadPoolExecutor(min(16, len(remotes))) as pool:
                list(pool.map(lambda r: r.disconnect(), remotes))
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_DIR_PREFIX = "fleet-ssh-"
# The run directory's files for jump hosts (jump_ssh_config).
JUMP_CONFIG = "ssh_config"
JUMP_PINNED = "jump_known_hosts"
JUMP_LOG = "jump-%n-%p.log"  # ssh fills in the host's address and port


def _temp_root() -> str:
    """Where the run's directory goes: the usual temporary directory, unless its path holds
    a character that ssh would expand (``%``) or a shell would read (the run's ssh_config
    path goes into ssh's ProxyJump command line); then ``/tmp``."""
    root = tempfile.gettempdir()
    return root if _SAFE_PATH.fullmatch(root) else "/tmp"


def _write_private(path: Path, text: str) -> None:
    """A new file only this user may read or write (ssh refuses a config others can write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _sweep_stale_dirs() -> None:
    """Remove this user's control directories of runs killed before they could clean up
    (never another user's)."""
    for stale in Path(_temp_root()).glob(f"{_DIR_PREFIX}*-*"):
        pid = stale.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        try:
            mine = stale.lstat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _key_type_and_blob(key: str) -> str:
    return " ".join(key.split()[:2])


def _literal(path: Path | str) -> str:
    """A path as an ssh option value that ssh takes literally.

    IdentityFile and UserKnownHostsFile expand ``%`` tokens (so ``%`` is written ``%%``) and
    ``${VAR}`` (which has no escape); ssh's option parser reads quotes and backslashes.
    """
    value = str(path)
    if "${" in value or any(c in '"\\' or not c.isprintable() for c in value):
        raise SshError(f"{value!r}: ssh cannot take this path literally; use another path")
    return value.replace("%", "%%")


def _config_word(value: str, *, tokens: bool = False, glob: bool = False) -> str:
    """One quoted argument of an ssh_config line. ``tokens``: the option expands ``%`` and
    ``${}``; ``glob``: it is a glob(3) pattern (Include), whose wildcards are escaped."""
    escaped = _literal(value)  # refuses what no quoting can carry
    if tokens:
        value = escaped
    if glob:
        value = re.sub(r"([*?\[])", r"\\\1", value)
    return f'"{value}"'


def _home() -> Path:
    """The home ssh uses for ``~`` and ``~/.ssh`` (the password database's, not $HOME)."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _operator_ssh_configs() -> list[Path]:
    """The files ssh would read without ``-F``: the user's, then the system's."""
    files = [_home() / ".ssh" / "config", Path("/etc/ssh/ssh_config")]
    return [f for f in files if f.is_file()]


def jump_ssh_config(config: SshConfig, run_dir: Path, includes: Sequence[Path]) -> str:
    """The run's ssh_config: how every jump host is reached and verified, whatever else.

    Every ssh of the run reads it instead of ``~/.ssh/config`` and ``/etc/ssh/ssh_config``
    (``-F``), and ssh passes ``-F`` on to the ssh it starts for each jump host. Each jump
    host gets a ``Host`` block, matched by its name as written in jumpHost (which is what
    ssh gives that child), holding:

    - the chain itself: the first hop is reached directly (``ProxyJump none``, which also
      stops any ProxyCommand), every later one through the hop before it (``ProxyJump``);
    - verification: BatchMode, StrictHostKeyChecking, HostKeyAlias (the key is the one known
      for the host as written, whatever HostName or canonicalisation says), the known-hosts
      files (jumpHostKeys' pinned key in the run's own file and no global file; otherwise
      the operator's own knownHostsFile or ssh's default files, written out, and the
      system's), and nothing else that could
      vouch for a key: no KnownHostsCommand, no DNS, no host key updates, no IP check;
    - no shared connection (a master someone else opened was verified by nobody we know),
      no forwarded agent or ports, our identity and time-outs.

    Every other host (the fleet's) is reached through the last hop by a ``ProxyCommand``
    that is OpenSSH's own ProxyJump command (``ssh -l -p -F -W '[%h]:%p' host``) with its
    stderr kept in the run's directory (``JUMP_LOG``): ssh sends a jump host's stderr to
    /dev/null under ControlPersist, and the operator is owed the reason a jump host was
    refused. No hop reaches that shell command line other than as the bare host, ``-l`` and
    ``-p`` (all of the shape ``jump_chain`` checks); the paths are the run's own
    (``_SAFE_PATH``), and a host's address is checked before use (``Remote.options``).

    Then ``Match all`` includes the operator's own files, so agents and everything else
    still apply; for a jump host they can only add what our block did not set (ssh keeps
    the first value it obtains; IdentityFile alone accumulates, under IdentitiesOnly).
    """
    jump_pinned = run_dir / JUMP_PINNED
    home = _home()
    if config.jump_known_hosts_file is not None:
        user_files = [str(config.jump_known_hosts_file)]
    else:
        user_files = [str(home / f) for f in _DEFAULT_USER_KNOWN_HOSTS]
    lines = [
        "# Written by fleet for one run: how its jump hosts are reached and verified.",
        "# ssh keeps the first value it obtains for each option: these come first.",
    ]
    previous: JumpHost | None = None
    for hop in config.jump_hosts:
        if hop.host_key is not None:
            known = [
                f"UserKnownHostsFile {_config_word(str(jump_pinned), tokens=True)}",
                "GlobalKnownHostsFile /dev/null",
            ]
        else:
            known = [
                "UserKnownHostsFile " + " ".join(_config_word(f, tokens=True) for f in user_files),
                "GlobalKnownHostsFile " + " ".join(_DEFAULT_GLOBAL_KNOWN_HOSTS),
            ]
        identity = []
        if config.identity_file is not None:
            word = _config_word(str(config.identity_file), tokens=True)
            identity = [f"IdentityFile {word}", "IdentitiesOnly yes"]
        options = [
            "ProxyJump " + ("none" if previous is None else previous.spec),
            "CanonicalizeHostname no",
            f"HostKeyAlias {hop.known_as}",
            "BatchMode yes",
            "StrictHostKeyChecking yes",
            *known,
            "KnownHostsCommand none",
            "VerifyHostKeyDNS no",
            "UpdateHostKeys no",
            "CheckHostIP no",
            f"ConnectTimeout {max(1, round(config.connect_timeout))}",
            "ServerAliveInterval 2",
            "ServerAliveCountMax 3",
            "ControlMaster no",
            "ControlPath none",
            "ForwardAgent no",
            "ClearAllForwardings yes",
            *identity,
        ]
        lines += [f"Host {hop.host}", *(f"  {o}" for o in options)]
        previous = hop
    last = config.jump_hosts[-1]
    command = ["ssh", "-F", str(run_dir / JUMP_CONFIG)]
    command += [] if last.user is None else ["-l", last.user]
    command += [] if last.port is None else ["-p", str(last.port)]
    command += ["-W", "'[%h]:%p'", last.host, f"2>{run_dir / JUMP_LOG}"]
    if not all(_SAFE_PATH.fullmatch(str(p)) for p in (run_dir, run_dir / JUMP_CONFIG)):
        raise SshError(f"{run_dir}: not a path a shell command line may hold unquoted")
    lines += ["Host *", "  ProxyCommand " + " ".join(command)]
    lines.append("Match all")
    lines += [f"  Include {_config_word(str(f), glob=True)}" for f in includes]
    return "\n".join(lines) + "\n"


class Remote:
    """Commands on one host, multiplexed over its master connection unless asked not to."""

    def __init__(self, endpoint: Endpoint, transport: Transport) -> None:
        self.endpoint = endpoint
        self.transport = transport
        # Named by a digest (a socket path must stay short, whatever the host's name) of
        # everything that makes it another login: the same host as another user, or at
        # another address, must never ride this connection.
        who = f"{endpoint.name}\0{endpoint.user}\0{endpoint.address}\0{endpoint.port}"
        digest = hashlib.sha256(who.encode()).hexdigest()[:16]
        self.control_path = transport.dir / f"{digest}.sock"
        self.master_log = transport.dir / f"{digest}.log"  # the master's stderr
        self._master = threading.Lock()  # held while this host's master is set up
        self._proc: subprocess.Popen[bytes] | None = None  # the master, ours
        # Why Transport.warm could not connect, and when.
        self._warm_error: tuple[FleetError, float] | None = None

    @contextmanager
    def session(self, *, fresh: bool = False, timeout: float | None = None) -> Iterator[float]:
        """Hold what one ssh (ours or Nix's) over this host's connection needs: a place in
        the transport's budget, and the master connection, set up now (a paced handshake)
        if there is none; others for the host wait for it, so that a host never gets two
        masters. ``timeout`` bounds setting it up. Gives the seconds this call spent in a
        handshake of its own: waiting for a place, in the budget or among the handshakes,
        is the run's pace, not the host's slowness, and no time-out of the host's counts it."""
        spent = 0.0
        with self.transport.connection(self, fresh=fresh):
            if fresh:  # a confirmation: its host's switch is running, it goes first
                with self.transport.handshake(self, urgent=True):
                    yield spent
                return
            if not self._connected():
                asked = time.monotonic()
                with self._master:
                    if not self._connected():
                        failed, self._warm_error = self._warm_error, None
                        # A warm-up that failed while this command waited for it was this
                        # command's attempt; one that failed before (the host may be back
                        # since) is tried again.
                        if failed is not None and failed[1] >= asked:
                            raise failed[0]
                        with self.transport.handshake(self):
                            began = time.monotonic()
                            self._start_master(timeout)
                            spent = time.monotonic() - began
            yield spent

    def warm(self) -> None:
        """``connect`` for ``Transport.warm``: what fails is kept for a command that waited
        for it (``session``)."""
        try:
            self.connect()
        except FleetError as exc:
            self._warm_error = (exc, time.monotonic())
        except (OSError, ValueError):  # the run closed while it was connecting
            pass

    def signal_master(self) -> None:
        """Ask our master to stop, without waiting or touching its pipes (a warm-up may be
        reading them): it then ends, and is reaped by whoever waits for it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def connect(self, timeout: float | None = None) -> None:
        """Set the master connection up, if there is none: a host that cannot be reached
        fails here, before anything is asked of it."""
        with self.session(timeout=timeout):
            pass

    @property
    def has_master(self) -> bool:
        """A master to stop: ours (alive or not yet reaped), or a socket on our path."""
        return self._proc is not None or self.control_path.exists()

    def _connected(self) -> bool:
        """A master to ride: ours alive (one that died, with the link, is replaced by the
        next command), with its socket."""
        proc = self._proc
        return (proc is None or proc.poll() is None) and self.control_path.exists()

    def _start_master(self, timeout: float | None) -> None:
        """Start the master (``MASTER_COMMAND``) and wait for its word, or its failure."""
        self._reap()  # one that died
        argv = ["ssh", *self.options(master=True), "--", self.endpoint.address,
                shlex.join(MASTER_COMMAND)]  # fmt: skip
        with self.master_log.open("wb") as log, self.transport._lock:
            if self.transport._closed:
                raise SshError(f"{self.name}: ssh: the run is over")
            # A session of its own: the terminal's Ctrl-C is the tool's (fleet/interrupt.py),
            # and every step of the host rides this connection.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
            self._proc = proc
        assert proc.stdout is not None
        end = None if timeout is None else time.monotonic() + timeout
        seen = b""
        with selectors.DefaultSelector() as waiting:
            waiting.register(proc.stdout, selectors.EVENT_READ)
            while MASTER_READY.encode() not in seen.split(b"\n"):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    self._reap()
                    raise SshError(f"{self.name}: ssh: no answer within {timeout:g} s")
                if not waiting.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:  # it exited: why is on its stderr
                    code = proc.wait()
                    stderr = self.master_log.read_text(errors="replace")
                    self._reap()
                    raise self.connection_error(Result(tuple(argv), code, "", stderr))
                seen = (seen + chunk)[-4096:]

    def _reap(self) -> None:
        """Stop our master, if it runs, and forget it; ssh removes its socket."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    @property
    def name(self) -> str:
        return self.endpoint.name

    def _login(self, *extra: str) -> list[str]:
        """What every ssh to this host says, the tool's and a pasted line's alike: the
        operator's options first (ssh keeps the first value), no prompts, strict host
        keys, the time-out, ``extra``, then port, user and identity."""
        e, c = self.endpoint, self.transport.config
        opts = [arg for name, value in c.options for arg in ("-o", f"{name}={value}")]
        opts += [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={max(1, round(c.connect_timeout))}",
            *extra,
            "-p", str(e.port),
            "-l", e.user,
        ]  # fmt: skip
        if c.identity_file is not None:
            opts += ["-o", f"IdentityFile={_literal(c.identity_file)}", "-o", "IdentitiesOnly=yes"]
        return opts

    def options(self, *, fresh: bool = False, master: bool = False) -> list[str]:
        """ssh options, without the program name and destination (Nix takes them too);
        ``master``: the host's master connection's."""
        e, c = self.endpoint, self.transport.config
        opts = self._login("-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3")
        if e.host_key is not None:
            # A pinned key is final: nothing in the operator's ssh_config may add another.
            opts += [
                "-o", f"UserKnownHostsFile={self.transport.pinned_file}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"HostKeyAlias={e.name}",
                "-o", "KnownHostsCommand=none",
                "-o", "VerifyHostKeyDNS=no",
                "-o", "UpdateHostKeys=no",
            ]  # fmt: skip
        elif c.known_hosts_file is not None:
            opts += ["-o", f"UserKnownHostsFile={_literal(c.known_hosts_file)}"]
        if fresh:
            opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        else:
            # Every command rides the master; only the master itself listens (and stays in
            # the foreground, ours, for as long as its session lasts).
            opts += [
                "-o", f"ControlMaster={'yes' if master else 'no'}",
                "-o", f"ControlPath={self.control_path}",
                "-o", "ControlPersist=no",
            ]  # fmt: skip
        jump_config = self.transport.jump_config
        if jump_config is not None:
            if not _SAFE_ADDRESS.fullmatch(e.address):
                raise SshError(
                    f"{e.name}: address {e.address!r} cannot go through a jump host: ssh "
                    "would paste it into a shell command line"
                )
            # The whole chain is in the run's ssh_config (jump_ssh_config).
            opts += ["-F", str(jump_config)]
        return opts

    def jump_log(self) -> str:
        """What the jump hosts' own ssh printed for this host's last connection."""
        e = self.endpoint
        log = self.transport.dir / JUMP_LOG.replace("%n", e.address).replace("%p", str(e.port))
        try:
            return log.read_text(errors="replace")
        except OSError:
            return ""

    def nix_sshopts(self) -> str:
        """NIX_SSHOPTS for Nix's own ssh: Nix splits it on spaces, so no option may hold one."""
        opts = self.options()
        spaced = [o for o in opts if any(c.isspace() for c in o)]
        if spaced:
            raise SshError(
                f"{self.name}: an ssh option contains a space, which Nix cannot pass: {spaced[0]!r}"
            )
        return " ".join(opts)

    def command_line(self, remote_argv: Sequence[str]) -> str:
        """``remote_argv`` on this host as one ssh command line an operator can paste.

        The run's host-key policy, identity and options, but nothing of the run's own that
        is gone once it ends: no shared connection, a pinned key given in the line itself
        (``KnownHostsCommand``, no file), jump hosts as ``-J`` (verified as the operator's
        own ssh would). Quoted twice, as ssh needs it: the remote command for the host's
        shell, the whole line for the operator's."""
        e, c = self.endpoint, self.transport.config
        opts = self._login("-o", "ControlMaster=no", "-o", "ControlPath=none")
        if e.host_key is not None:
            # ssh runs the command (no shell; an absolute path) and splits it on spaces;
            # echo prints the known_hosts line, its words joined by one space again.
            line = f"{e.name} {_key_type_and_blob(e.host_key)}".replace("%", "%%")
            opts += [
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"HostKeyAlias={e.name}",
                "-o", f"KnownHostsCommand=/usr/bin/env echo {line}",
                "-o", "VerifyHostKeyDNS=no",
                "-o", "UpdateHostKeys=no",
            ]  # fmt: skip
        elif c.known_hosts_file is not None:
            opts += ["-o", f"UserKnownHostsFile={_literal(c.known_hosts_file)}"]
        if c.jump_hosts:
            opts += ["-J", ",".join(hop.spec for hop in c.jump_hosts)]
        return shlex.join(["ssh", *opts, "--", e.address, shlex.join(remote_argv)])

    def ssh_argv(self, remote_argv: Sequence[str], *, fresh: bool = False) -> list[str]:
        return [
            "ssh",
            *self.options(fresh=fresh),
            "--",
            self.endpoint.address,
            shlex.join(remote_argv),
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = None,
        fresh: bool = False,
        hold_stdin: bool = False,
    ) -> Result:
        """Run argv on the host; each argument is quoted, so nothing is pasted into a shell.

        ``fresh`` opens a new connection instead of the shared one: a confirmation
        must prove that the host is reachable now, not that an old session survives.
        ``hold_stdin``: the remote command's stdin stays open until ours ends (process.run).
        """
        try:
            with self.session(fresh=fresh, timeout=timeout) as shaking:
                if timeout is not None:  # what this command's own handshake left of it
                    timeout = max(0.1, timeout - shaking)
                result = process.run(
                    self.ssh_argv(argv, fresh=fresh),
                    check=False,
                    input=input,
                    timeout=timeout,
                    error=SshError,
                    what=f"{self.name}: ssh",
                    hold_stdin=hold_stdin,
                    limit=REMOTE_OUTPUT_MAX,
                )
        except SshError as exc:  # no answer in time, or no ssh
            exc.command = exc.command or self.command_line(argv)
            raise
        if result.returncode == 255:
            error = self.connection_error(result)
            error.command = self.command_line(argv)
            raise error
        if check and not result.ok:
            raise RemoteCommandError(self.name, argv, result, self.command_line(argv))
        return result

    def connection_error(self, result: Result) -> SshError:
        e, c = self.endpoint, self.transport.config
        where = f"{e.name} ({e.user}@{e.address}:{e.port})"
        jump_log = self.jump_log() if c.jump_hosts else ""
        if any(m in jump_log for m in _HOST_KEY_MESSAGES):
            # The jump hosts' own ssh names the host it refused by its HostKeyAlias.
            refused = {m.lower() for p in _REFUSED_KEY_OF for m in p.findall(jump_log)}
            for hop in c.jump_hosts:
                if hop.known_as.lower() in refused:
                    source = (
                        "the key pinned in jumpHostKeys"
                        if hop.host_key is not None
                        else c.jump_known_hosts_file or "~/.ssh/known_hosts"
                    )
                    return HostKeyError(
                        f"{where}: jump host {hop.spec}: host key is unknown or does not "
                        f"match {source}; refusing to connect"
                    )
        if c.jump_hosts:
            where += f" via jump host {','.join(hop.spec for hop in c.jump_hosts)}"
            jump_lines = [line.strip() for line in jump_log.splitlines() if line.strip()]
            if (
                jump_lines
                and result.returncode == 255
                and not any(m in result.stderr for m in _HOST_KEY_MESSAGES)
            ):
                return SshError(f"{where}: cannot connect: {printable(jump_lines[-1])}")
        if any(m in result.stderr for m in _HOST_KEY_MESSAGES):
            if e.host_key is not None:
                return HostKeyError(
                    f"{where}: host key does not match the key pinned in the "
                    "inventory; refusing to connect"
                )
            source = self.transport.config.known_hosts_file or "~/.ssh/known_hosts"
            return HostKeyError(
                f"{where}: host key is unknown or does not match {source}; refusing to connect"
            )
        return SshError(f"{where}: cannot connect: {result.last_error_line()}")

    @contextmanager
    def tunnel(self, port: int) -> Iterator[subprocess.Popen[bytes]]:
        """A byte stream to 127.0.0.1:port as seen from the host, over the master connection;
        killed on leaving, if still open."""
        argv = ["ssh", *self.options(), "-W", f"127.0.0.1:{port}", "--", self.endpoint.address]
        with self.session():
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C is the tool's (fleet/interrupt.py)
            )
            try:
                with interrupt.child(proc):
                    yield proc
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            if interrupt.interrupted(proc):
                raise Interrupted(f"{self.name}: interrupted (Ctrl-C)")

    def disconnect(self) -> None:
        """Stop the master; return once it is gone (its socket removed), so that whoever
        takes its place in the budget never overlaps it. Ours, it is stopped by its pid."""
        if self._proc is not None:
            self._reap()
        elif self.control_path.exists():  # a master someone else set up on our socket
            subprocess.run(
                ["ssh", *self.options(), "-O", "exit", "--", self.endpoint.address],
                capture_output=True,
                check=False,
                timeout=10,
                start_new_session=True,
            )
        end = time.monotonic() + 2
        while self.control_path.exists() and time.monotonic() < end:
            time.sleep(0.01)
