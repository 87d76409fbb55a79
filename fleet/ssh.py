"""The ssh transport: one OpenSSH master connection per host, commands multiplexed over it.

OpenSSH (not a Python ssh library) because Nix copies closures with it too: one client,
one ssh_config (aliases, ProxyJump), one host-key policy for every connection the tool
makes. Host keys are always checked: pinned keys from the inventory go into a
known_hosts file of this run, other hosts are looked up in the operator's known_hosts.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleet import process
from fleet.errors import FleetError, HostKeyError, SshError
from fleet.process import Result

# What OpenSSH prints when it refuses a host key (unknown, changed, or mismatched alias).
_HOST_KEY_MESSAGES = (
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "host key is known",
)


@dataclass(frozen=True)
class SshConfig:
    """Operator-side settings shared by every connection of a run."""

    identity_file: Path | None = None
    known_hosts_file: Path | None = None  # for hosts without a pinned key; None: ssh's default
    connect_timeout: float = 10.0
    extra_options: tuple[str, ...] = ()  # e.g. ("-J", "bastion") from the operator config


@dataclass(frozen=True)
class Endpoint:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None  # pinned "TYPE BASE64"; None: the known_hosts lookup decides


class RemoteCommandError(FleetError):
    """A remote command ran and exited non-zero."""

    def __init__(self, host: str, argv: Sequence[str], result: Result) -> None:
        self.host = host
        self.result = result
        super().__init__(f"{host}: {shlex.join(argv)}: {result.last_error_line()}")


class Transport:
    """Owns the run's control sockets and pinned known_hosts; hands out one Remote per host."""

    def __init__(self, config: SshConfig) -> None:
        self.config = config
        _sweep_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        self.pinned_file = self.dir / "known_hosts"
        self.pinned_file.touch()
        self._remotes: dict[str, Remote] = {}
        self._lock = threading.Lock()

    def remote(self, endpoint: Endpoint) -> Remote:
        with self._lock:
            existing = self._remotes.get(endpoint.name)
            if existing is not None and existing.endpoint == endpoint:
                return existing
            if endpoint.host_key is not None:
                with self.pinned_file.open("a") as f:
                    f.write(f"{endpoint.name} {_key_type_and_blob(endpoint.host_key)}\n")
            remote = Remote(endpoint, self)
            self._remotes[endpoint.name] = remote
            return remote

    def close(self) -> None:
        """Stop every master connection this run opened and remove its sockets."""
        for remote in list(self._remotes.values()):
            remote.disconnect()
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


def _sweep_stale_dirs() -> None:
    """Remove this user's control directories of runs killed before they could clean up
    (never another user's)."""
    for stale in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = stale.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        try:
            mine = stale.lstat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _key_type_and_blob(key: str) -> str:
    return " ".join(key.split()[:2])


class Remote:
    """Commands on one host, multiplexed over its master connection unless asked not to."""

    def __init__(self, endpoint: Endpoint, transport: Transport) -> None:
        self.endpoint = endpoint
        self.transport = transport
        # Named by a digest: a socket path must stay short, whatever the host's name.
        digest = hashlib.sha256(endpoint.name.encode()).hexdigest()[:16]
        self.control_path = transport.dir / f"{digest}.sock"

    @property
    def name(self) -> str:
        return self.endpoint.name

    def options(self, *, fresh: bool = False) -> list[str]:
        """ssh options, without the program name and destination (Nix takes them too)."""
        e, c = self.endpoint, self.transport.config
        opts = [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={max(1, round(c.connect_timeout))}",
            "-o", "ServerAliveInterval=2",
            "-o", "ServerAliveCountMax=3",
            "-p", str(e.port),
            "-l", e.user,
        ]  # fmt: skip
        if c.identity_file is not None:
            opts += ["-i", str(c.identity_file), "-o", "IdentitiesOnly=yes"]
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
            opts += ["-o", f"UserKnownHostsFile={c.known_hosts_file}"]
        if fresh:
            opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        else:
            opts += [
                "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.control_path}",
                "-o", "ControlPersist=60",
            ]  # fmt: skip
        return [*opts, *c.extra_options]

    def nix_sshopts(self) -> str:
        """NIX_SSHOPTS for Nix's own ssh: Nix splits it on spaces, so no option may hold one."""
        opts = self.options()
        if any(" " in o for o in opts):
            raise SshError(
                f"{self.name}: an ssh option contains a space, which Nix cannot pass: "
                f"{next(o for o in opts if ' ' in o)!r}"
            )
        return " ".join(opts)

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
    ) -> Result:
        """Run argv on the host; each argument is quoted, so nothing is pasted into a shell.

        ``fresh`` opens a new connection instead of the shared one: a confirmation
        must prove that the host is reachable now, not that an old session survives.
        """
        result = process.run(
            self.ssh_argv(argv, fresh=fresh),
            check=False,
            input=input,
            timeout=timeout,
            error=SshError,
            what=f"{self.name}: ssh",
        )
        if result.returncode == 255:
            raise self.connection_error(result)
        if check and not result.ok:
            raise RemoteCommandError(self.name, argv, result)
        return result

    def connection_error(self, result: Result) -> SshError:
        e = self.endpoint
        where = f"{e.name} ({e.user}@{e.address}:{e.port})"
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

    def tunnel(self, port: int) -> subprocess.Popen[bytes]:
        """A byte stream to 127.0.0.1:port as seen from the host, over the master connection."""
        argv = ["ssh", *self.options(), "-W", f"127.0.0.1:{port}", "--", self.endpoint.address]
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def disconnect(self) -> None:
        if self.control_path.exists():
            subprocess.run(
                ["ssh", *self.options(), "-O", "exit", "--", self.endpoint.address],
                capture_output=True,
                check=False,
                timeout=10,
            )
