"""The lab's flake: template files from the package plus the lab's own lab.json and release.json."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.errors import UsageError
from fleet.lab.layout import WEB_PORT, Lab, LabHost

TEMPLATE = (
    "flake.nix",
    "system.nix",
    "build-system.sh",
    "build-fleet-host.sh",
    "switch-to-configuration.py",
    "lab-web.py",
)
INGRESS_PORT = 8000  # lab-web's frontend on the balancers
AGENT_PORT = 9777
DRAIN_TIMEOUT = 10
# Monitoring (lab up --monitoring): the ports of a real fleet's defaults, and a short scrape
# interval so that tests see a change within seconds.
MONITORING = {
    "prometheusPort": 9090,
    "alertmanagerPort": 9093,
    "blackboxPort": 9115,
    "nodeExporterPort": 9100,
    "haproxyPort": 8405,
    "scrapeInterval": "2s",
}
# The binary cache (lab up --cache): the port of a real fleet's default, and where the
# cache host keeps the secret key that signs it (its conf folder, /etc/fleet-lab).
CACHE_PORT = 5080
CACHE_SECRET_KEY = "/etc/fleet-lab/cache-key"
# Alertmanager's webhook: a port on the operator machine's address on the lab bridge, where
# a test (or an operator's `nc -l`) listens for the alerts.
WEBHOOK_PORT = 9799
# The host's half of fleet's transactions, from the package, installed by every lab system
# at sw/lib/fleet-host/fleet_host.py with its launcher sw/bin/fleet-host (see
# build-fleet-host.sh).
HOST_HELPER = "fleet-host.py"
BROKEN_KINDS = ("health", "start", "build", "boot", "errors:N")
_ERRORS = re.compile(r"^errors:([1-9][0-9]?|100)$")
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


# A canary analysis for a monitored lab (set_analysis): the share of lab-web's answers
# through the balancer that are not 5xx, by HAProxy's own counters, over a short window
# and quick measurements. One inconclusive measurement is tolerated: the canary's first
# seconds back in rotation may fall between two scrapes.
LAB_ANALYSIS = {
    "web-success": {
        "successRate": {"service": "lab-web", "min": 0.99, "window": "10s"},
        "interval": 2,
        "count": 5,
        "inconclusiveLimit": 1,
    }
}


def nix_system() -> str:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return f"{machine}-linux"


def write_template(lab: Lab) -> None:
    """The package's files of the flake: its Nix, its builder, and the programs it installs."""
    lab.flake.mkdir(parents=True, exist_ok=True)
    template = resources.files("fleet.lab").joinpath("flake")
    for name in TEMPLATE:
        _write_if_changed(lab.flake / name, template.joinpath(name).read_text())
    helper = resources.files("fleet.hostside").joinpath("fleet_host.py").read_text()
    _write_if_changed(lab.flake / HOST_HELPER, helper)
    # The generators a real fleet uses.
    for name in ("inventory.nix", "checked.nix", "haproxy.nix", "prometheus.nix", "cache.nix"):
        text = resources.files("fleet").joinpath(f"nix/{name}").read_text()
        _write_if_changed(lab.flake / name, text)


def _write_if_changed(path: Path, text: str) -> None:
    """Whole or not at all, so that a build reading the flake meanwhile sees one version."""
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(
    lab: Lab,
    hosts: list[LabHost],
    host_keys: dict[str, str],
    balancers: list[str] | None = None,
    monitoring: list[str] | None = None,
    cache: dict[str, Any] | None = None,
) -> None:
    """The lab's lab.json: its hosts and their roles; ``cache``: the binary cache's host,
    port, public key and secret key file (lab up --cache)."""
    write_template(lab)
    balancers = balancers or []
    monitoring = monitoring or []
    spec = {
        "system": nix_system(),
        "webPort": WEB_PORT,
        # Hosts that run HAProxy in front of the others' lab-web (not lab-web).
        "balancers": balancers,
        "ingressPort": INGRESS_PORT,
        "agentPort": AGENT_PORT,
        "drainTimeout": DRAIN_TIMEOUT,
        # Hosts that run Prometheus, Alertmanager and the blackbox exporter (not lab-web).
        "monitoring": monitoring,
        **MONITORING,
        "webhook": f"http://{lab.gateway}:{WEBHOOK_PORT}/alerts" if monitoring else None,
        # The host serving the fleet's binary cache (not lab-web), or null.
        "cache": cache,
        "hosts": {
            h.name: {
                "address": h.address,
                "sshPort": 22,
                "sshUser": "root",
                "tags": h.tags
                + (["balancer"] if h.name in balancers else [])
                + (["monitoring"] if h.name in monitoring else [])
                + (["cache"] if cache and h.name == cache["server"] else []),
                "system": nix_system(),
                "hostKey": host_keys[h.name],
            }
            for h in hosts
        },
        "deploy": DEPLOY_POLICY,
    }
    (lab.flake / "lab.json").write_text(json.dumps(spec, indent=2) + "\n")
    (lab.flake / "fleet.yaml").write_text(f"identityFile: {lab.identity}\nconnectTimeout: 5\n")
    if not (lab.flake / "release.json").exists():
        set_release(lab, LabRelease("0"))


def set_analysis(lab: Lab, analysis: dict[str, Any] | None) -> None:
    """The lab's deploy policy with these canary analyses (deploy.analysis), or none."""
    loaded = spec(lab)
    if loaded is None:
        raise UsageError("no lab: run `fleet lab up` first")
    policy = dict(loaded["deploy"])
    policy.pop("analysis", None)
    loaded["deploy"] = policy | ({"analysis": analysis} if analysis else {})
    (lab.flake / "lab.json").write_text(json.dumps(loaded, indent=2) + "\n")


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


@dataclass(frozen=True)
class LabRelease:
    """What the lab's flake builds next; ``broken`` applies to ``broken_hosts`` (all if empty)."""

    version: str
    broken: str | None = None
    start_delay: float = 0.0
    broken_hosts: tuple[str, ...] = ()
    # lab-web loads the credential `token` (the operator's secret file `lab-token`), as a
    # DynamicUser, and answers its digest on /secret.
    secret: bool = False
    # A second service with a TCP check: "passing" (lab-web listens on its port) or
    # "failing" (nothing does); None: no second service.
    extra: str | None = None
    healthy_after: float = 0.0  # lab-web answers 503 on /health this long after it starts
    sick_after: float = 0.0  # lab-web fails /health and /version from this long after (0: never)
    # MiB of incompressible data every app host's system of this release shares, as the
    # packages of a real release are shared: what a binary cache saves the operator.
    payload_mib: int = 0

    def validate(self) -> None:
        if not _VERSION.match(self.version):
            raise UsageError(
                f"release version {self.version!r}: use 1-32 letters, digits, '.', '_', '+', '-'"
            )
        known = self.broken in BROKEN_KINDS[:-1] or _ERRORS.match(self.broken or "")
        if self.broken is not None and not known:
            raise UsageError(
                f"--broken {self.broken!r}: expected one of {', '.join(BROKEN_KINDS)}"
                " (N: 1 to 100, the share of requests answered 500)"
            )
        if self.extra not in (None, "passing", "failing"):
            raise UsageError(f"extra {self.extra!r}: expected passing or failing")
        if not 0 <= self.sick_after <= 600:
            raise UsageError(f"sick after {self.sick_after:g} s: expected 0 to 600 seconds")
        if not 0 <= self.payload_mib <= 1024:
            raise UsageError(f"payload {self.payload_mib} MiB: expected 0 to 1024")
        if not 0 <= self.start_delay <= 60:
            raise UsageError(f"--start-delay {self.start_delay:g}: expected 0 to 60 seconds")


def set_release(lab: Lab, release: LabRelease) -> None:
    release.validate()
    text = json.dumps({
        "version": release.version,
        "broken": release.broken,
        "startDelay": release.start_delay,
        "brokenHosts": list(release.broken_hosts),
        "secret": release.secret,
        "extra": release.extra,
        "healthyAfter": release.healthy_after,
        "sickAfter": release.sick_after,
        "payloadMiB": release.payload_mib,
    })  # fmt: skip
    (lab.flake / "release.json").write_text(text + "\n")


def release(lab: Lab) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((lab.flake / "release.json").read_text())
    return loaded
