"""Names and places of one lab instance: pure functions, no side effects.

Every kernel object and file a lab makes is named from its instance number, so
``fleet lab down`` can find all of it again, and a test suite can run its own lab
(``FLEET_LAB_INSTANCE=1``) beside an operator's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_HOSTS = 240  # addresses .11 to .250 of the lab's /24
WEB_PORT = 8080
TMPFS_SIZE = "256m"  # each host's /nix and /boot: small, so that fill-disk is cheap


@dataclass(frozen=True)
class LabHost:
    index: int  # 1-based
    name: str
    address: str
    netns: str
    veth: str  # the host side of the link, on the lab bridge

    @property
    def tags(self) -> list[str]:
        return ["lab", "odd" if self.index % 2 else "even"]


@dataclass(frozen=True)
class Lab:
    instance: int
    state: Path
    cache: Path

    @classmethod
    def from_env(cls) -> Lab:
        instance = int(os.environ.get("FLEET_LAB_INSTANCE", "0"))
        if not 0 <= instance <= 254:
            raise ValueError("FLEET_LAB_INSTANCE must be 0..254")
        state = Path(os.environ.get("FLEET_LAB_DIR", f"/var/lib/fleet-lab/lab{instance}"))
        cache = Path(os.environ.get("FLEET_LAB_CACHE", Path.home() / ".cache/fleet/lab"))
        return cls(instance, state, cache)

    @property
    def bridge(self) -> str:
        return f"fleetlab{self.instance}"

    @property
    def prefix(self) -> str:
        return f"10.231.{self.instance}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    @property
    def netns_prefix(self) -> str:
        return f"fleetlab{self.instance}-"

    @property
    def veth_prefix(self) -> str:
        return f"fl{self.instance}-"

    def host(self, index: int) -> LabHost:
        name = f"lab{index}"
        return LabHost(
            index=index,
            name=name,
            address=f"{self.prefix}.{10 + index}",
            netns=f"{self.netns_prefix}{name}",
            veth=f"{self.veth_prefix}{name}",
        )

    def hosts(self, count: int) -> list[LabHost]:
        return [self.host(i) for i in range(1, count + 1)]

    # Files of the instance.
    @property
    def flake(self) -> Path:
        return self.state / "flake"

    @property
    def identity(self) -> Path:
        return self.state / "id_ed25519"

    @property
    def signing_key(self) -> Path:
        """The secret half of the key the lab's hosts trust on copied closures."""
        return self.state / "signing-key.sec"

    @property
    def known_hosts(self) -> Path:
        return self.state / "known_hosts"

    @property
    def lock(self) -> Path:
        """Serialises lab commands; in /run, so nothing of it outlives the machine's boot."""
        return Path("/run/fleet-lab") / f"lab{self.instance}.lock"

    def host_dir(self, host: LabHost) -> Path:
        return self.state / "hosts" / host.name

    def host_root(self, host: LabHost) -> Path:
        """The host's persistent tmpfs: nix/, boot/ and var-fleet/ survive a crash like a disk."""
        return self.host_dir(host) / "root"
