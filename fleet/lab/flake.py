"""The lab's flake: template files from the package plus the lab's own lab.json and release.json."""

from __future__ import annotations

import json
import platform
import re
from importlib import resources
from typing import Any

from fleet.errors import UsageError
from fleet.lab.layout import WEB_PORT, Lab, LabHost

TEMPLATE = (
    "flake.nix",
    "system.nix",
    "build-system.sh",
    "switch-to-configuration.py",
    "lab-web.py",
)
BROKEN_KINDS = ("health", "start")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")

# The lab's deploy policy: small hosts, quick checks, all hosts at once after the canary.
DEPLOY_POLICY = {
    "parallel": 16,
    "canary": 1,
    "batchSize": "100%",
    "maxFailures": 0,
    "healthTimeout": 30,
    "confirmTimeout": 20,
}


def nix_system() -> str:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return f"{machine}-linux"


def write(lab: Lab, hosts: list[LabHost], host_keys: dict[str, str]) -> None:
    lab.flake.mkdir(parents=True, exist_ok=True)
    template = resources.files("fleet.lab").joinpath("flake")
    for name in TEMPLATE:
        (lab.flake / name).write_text(template.joinpath(name).read_text())
    inventory_nix = resources.files("fleet").joinpath("nix/inventory.nix").read_text()
    (lab.flake / "inventory.nix").write_text(inventory_nix)
    spec = {
        "system": nix_system(),
        "webPort": WEB_PORT,
        "hosts": {
            h.name: {
                "address": h.address,
                "sshPort": 22,
                "sshUser": "root",
                "tags": h.tags,
                "system": nix_system(),
                "hostKey": host_keys[h.name],
            }
            for h in hosts
        },
        "deploy": DEPLOY_POLICY,
    }
    (lab.flake / "lab.json").write_text(json.dumps(spec, indent=2) + "\n")
    (lab.flake / "fleet.yaml").write_text(f"identityFile: {lab.identity}\n")
    if not (lab.flake / "release.json").exists():
        set_release(lab, "0", None)


def spec(lab: Lab) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads((lab.flake / "lab.json").read_text())
    except FileNotFoundError:
        return None
    return loaded


def hosts(lab: Lab) -> list[LabHost] | None:
    """The lab's hosts, or None when no lab was made."""
    loaded = spec(lab)
    return None if loaded is None else lab.hosts(len(loaded["hosts"]))


def set_release(lab: Lab, version: str, broken: str | None, start_delay: float = 0.0) -> None:
    if not _VERSION.match(version):
        raise UsageError(
            f"release version {version!r}: use 1-32 letters, digits, '.', '_', '+', '-'"
        )
    if broken is not None and broken not in BROKEN_KINDS:
        raise UsageError(f"--broken {broken!r}: expected one of {', '.join(BROKEN_KINDS)}")
    if not 0 <= start_delay <= 60:
        raise UsageError(f"--start-delay {start_delay:g}: expected 0 to 60 seconds")
    text = json.dumps({"version": version, "broken": broken, "startDelay": start_delay}) + "\n"
    (lab.flake / "release.json").write_text(text)


def release(lab: Lab) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((lab.flake / "release.json").read_text())
    return loaded
