"""The NixOS VM tests' definitions (tests/vm): they cannot run here, so what would make them
fail or flake in our users' CI is checked where it can be, in their text and by evaluating
their fleets (tests/vm/fleets.nix) with nixpkgs' lib."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.nix.conftest import REPO, Nix
from tests.nix.test_nix_monitoring import generate, promtool, written
from tests.nix.test_nix_monitoring import run as run_program
from tests.nix.test_nix_traffic import HOST_VIEW, NIXOS_PREFIX, haproxy, haproxy_check, iptables

VM = "\n".join((REPO / "tests" / "vm" / name).read_text() for name in ("default.nix", "fleets.nix"))
LAYOUTS = {"plain": [], "balanced": ["balancer"], "monitored": ["monitor"], "cached": ["cache"]}
TARGETS = ["target1", "target2"]
__all__ = ["haproxy", "promtool"]  # fixtures, used by name


def _default(option: str) -> int:
    found = re.findall(rf"\b{option} = (\d+);", VM)
    assert len(found) == 1, option
    return int(found[0])


def _runs() -> list[str]:
    """Every fleet command the test scripts run: `fleet(...)` calls and shell lines."""
    calls = re.findall(r"\bfleet\((.*?)\)\n", VM, re.S)
    lines = re.findall(r'"\(fleet --flake (.*?)"\n', VM)
    return [c for c in calls + lines if "deploy" in c or "rollback" in c]


def _flag(run: str, flag: str) -> int | None:
    found = re.search(rf'{flag}"?,?\s*"?(\d+)', run)
    return int(found.group(1)) if found else None


def test_the_tools_restore_stays_clear_of_the_dead_man_switch() -> None:
    """A failed check makes the tool restore the host at the health timeout; the switch
    does the same at activation + health + confirm. With confirm no longer than health
    both could run switch-to-configuration at once, and the second refuses: a flaky
    "failed" instead of "rolled-back"."""
    health, confirm = _default("healthTimeout"), _default("confirmTimeout")
    runs = _runs()
    assert len(runs) >= 4
    for run in runs:
        h = _flag(run, "--health-timeout") or health
        c = _flag(run, "--confirm-timeout") or confirm
        assert c > h, f"{run.strip()}: confirm {c} s, health {h} s"


def test_the_targets_boot_without_a_boot_loader_install() -> None:
    """`switch-to-configuration boot` at every commit: GRUB's install on the test VM's bare
    disk would refuse it."""
    assert "boot.loader.grub.enable = false;" in VM


# The fleets, evaluated.

FLEETS = 'import (h.repo + "/tests/vm/fleets.nix") { inherit (h) lib; api = h.pkgs.fake "api"; }'


@pytest.fixture(scope="module")
def fleets(nix: Nix) -> dict[str, Any]:
    """Per layout: the machines' addresses, every release's inventory and problems, and the
    hosts' configurations in the first release."""
    hosts = " ".join(
        f"{n} = {HOST_VIEW.format(host=json.dumps(n))};"
        for n in [*TARGETS, "balancer", "monitor", "cache"]
    )
    return nix.eval(  # type: ignore[no-any-return]
        f"""let vm = {FLEETS}; lib = h.lib; in lib.mapAttrs (layout: byRelease: {{
          addresses = lib.genAttrs (vm.machines layout) (vm.address layout);
          releases = lib.mapAttrs (_: f: {{ inherit (f.config.build) inventory problems; }})
            byRelease;
          hosts = let f = byRelease.v1; all = {{ {hosts} }}; in
            lib.filterAttrs (n: _: lib.elem n (vm.fleetHosts layout)) all;
        }}) vm.fleets"""
    )


def test_the_fleets_address_the_machines_as_the_test_driver_does(fleets: dict[str, Any]) -> None:
    """nixos/lib/testing/network.nix: 192.168.1.N, N the machine's place among the test's
    machine names in order. The firewall matches addresses, so the balancer reaches the
    targets only if the fleet knows them by these."""
    for layout, balancers in LAYOUTS.items():
        machines = sorted(["deployer", *TARGETS, *balancers])
        expected = {m: f"192.168.1.{i}" for i, m in enumerate(machines, 1)}
        assert fleets[layout]["addresses"] == expected
        for release in fleets[layout]["releases"].values():
            hosts = release["inventory"]["hosts"]
            assert {n: h["address"] for n, h in hosts.items()} == {
                n: expected[n] for n in [*TARGETS, *balancers]
            }
            assert release["problems"] == []
    # Every machine checks its own address at evaluation (a driver that numbers otherwise).
    assert "config.networking.primaryIPAddress == vm.address layout name" in VM


def test_every_host_evaluates_without_warnings(fleets: dict[str, Any]) -> None:
    """Addresses, not names: no host is told its firewall refuses a fleet host."""
    for layout in LAYOUTS:
        for name, host in fleets[layout]["hosts"].items():
            assert host["failedAssertions"] == [] and host["warnings"] == [], (layout, name)


def test_the_balanced_fleet_puts_the_balancer_in_front_of_both_targets(
    fleets: dict[str, Any], haproxy: str, tmp_path: Path
) -> None:
    balanced = fleets["balanced"]
    address = balanced["addresses"]
    traffic = balanced["releases"]["v1"]["inventory"]["traffic"]
    assert traffic["balancers"] == ["balancer"]
    api = traffic["services"]["api"]
    assert api["mode"] == "http" and api["maxUnavailable"] == 1
    assert api["instances"] == {t: {"address": address[t], "port": 8080} for t in TARGETS}
    assert fleets["plain"]["releases"]["v1"]["inventory"].get("traffic") is None

    balancer = balanced["hosts"]["balancer"]
    assert balancer["haproxy"]["enable"] and balancer["ports"] == [80]
    haproxy_check(haproxy, NIXOS_PREFIX + balancer["haproxy"]["config"], tmp_path, "-dW")
    # The API's port and the agent's, open to the balancer; the deployer is no fleet host.
    for target in TARGETS:
        rules = balanced["hosts"][target]["iptables"]
        for port in (8080, traffic["agentPort"]):
            for line in iptables(port, [address["balancer"]]):
                assert line in rules, (target, port)
        assert address["deployer"] not in rules
        assert ipaddress.ip_address(address[target])


def test_the_balanced_test_waits_out_the_drain_and_the_clients_timeouts() -> None:
    """The clients' requests end within their own timeout after the stop; a drain longer
    than the tool's wait for it would report sessions cut, and the test wants none."""
    assert "drainTimeout = 10;" in VM
    assert "--max-time 10" in VM and 'wait_for_file(f"/tmp/load{n}.done", timeout=60)' in VM


def test_the_monitored_fleet_is_watched_from_its_monitoring_host(
    fleets: dict[str, Any], nix: Nix, promtool: str, tmp_path: Path
) -> None:
    monitored = fleets["monitored"]
    address = monitored["addresses"]
    monitoring = monitored["releases"]["v1"]["inventory"]["monitoring"]
    assert monitoring["servers"] == ["monitor"]
    assert set(monitoring["nodes"]) == {"monitor", *TARGETS}
    assert set(monitoring["services"]["api"]["probes"]) == set(TARGETS)
    for name in ("plain", "balanced"):
        assert fleets[name]["releases"]["v1"]["inventory"].get("monitoring") is None
    # The node exporter and the API's port, open to the monitoring host; not the deployer.
    for target in TARGETS:
        rules = monitored["hosts"][target]["iptables"]
        for port in (monitoring["nodeExporterPort"], 8080):
            for line in iptables(port, [address["monitor"]]):
                assert line in rules, (target, port)
        assert address["deployer"] not in rules
    # What the monitoring host runs passes Prometheus's own check.
    generated = generate(nix, monitoring, tmp_path, "monitor")
    config = written(generated, tmp_path)
    assert "SUCCESS" in run_program(promtool, "check", "config", str(config))
    assert 'job="fleet-health"' in VM and "fleet_release_info" in VM


CACHE_VIEW = """
let
  vm = {fleets};
  f = vm.fleets.cached.v1;
  host = name: let c = h.hostConfig f name; in {{
    nix = c.nix.settings;
    nginx = {{ inherit (c.services.nginx) enable; }};
    manifest = builtins.fromJSON c.environment.etc."fleet/manifest.json".text;
  }};
in {{
  keys = (import (h.repo + "/tests/vm/keys.nix")).binaryCache;
  inherit (f.config.cache) secretKeyFile;
  hosts = h.lib.genAttrs (vm.fleetHosts "cached") host;
}}
"""


@pytest.fixture(scope="module")
def cached(nix: Nix) -> dict[str, Any]:
    return nix.eval(CACHE_VIEW.format(fleets=FLEETS))  # type: ignore[no-any-return]


def test_the_cached_fleet_fetches_from_its_cache_host(
    fleets: dict[str, Any], cached: dict[str, Any]
) -> None:
    layout = fleets["cached"]
    address = layout["addresses"]
    cache = layout["releases"]["v1"]["inventory"]["cache"]
    keys = cached["keys"]
    assert cache["host"] == "cache" and cache["publicKey"] == keys["public"]
    assert cache["url"] == f"http://{address['cache']}:{cache['port']}"
    for name in ("plain", "balanced", "monitored"):
        assert fleets[name]["releases"]["v1"]["inventory"].get("cache") is None
    # Every host substitutes from it first and trusts its key.
    for name, host in cached["hosts"].items():
        assert host["nix"]["substituters"][0] == cache["url"], name
        assert keys["public"] in host["nix"]["trusted-public-keys"], name
    assert cached["hosts"]["cache"]["nginx"]["enable"] is True
    assert cached["hosts"]["cache"]["manifest"]["cache"]["secretKeyFile"] == cached["secretKeyFile"]
    # Its port, open to the fleet's hosts; not to the deployer, which pushes over ssh.
    rules = layout["hosts"]["cache"]["iptables"]
    for machine in ["cache", *TARGETS]:
        for line in iptables(cache["port"], [address[machine]]):
            assert line in rules, machine
    assert address["deployer"] not in rules


def test_the_cache_test_key_is_a_pair() -> None:
    """nix-store --generate-binary-cache-key: an ed25519 secret key (seed, then public key)
    and its public key, under one name."""
    keys = (REPO / "tests" / "vm" / "keys.nix").read_text()
    [secret] = re.findall(r'secret = "([^"]+)";', keys)
    [public] = re.findall(r'public = "(fleet-vm-cache-1:[^"]+)";', keys)
    secret_name, secret_key = secret.split(":", 1)
    public_name, public_key = public.split(":", 1)
    assert secret_name == public_name == "fleet-vm-cache-1"
    assert base64.b64decode(secret_key)[32:] == base64.b64decode(public_key)


def test_the_cache_test_deploys_what_the_targets_do_not_hold() -> None:
    """A specialisation is in its system's closure: the targets would hold every release,
    and fetch nothing from the cache. The cached layout builds them apart."""
    assert 'apart = layout: layout == "cached";' in VM
    assert "extendModules { modules = [ (generation release spec) ]; }" in VM
    assert "nix-store --check-validity {TOPLEVELS['v2'][machine.name]}" in VM
    assert 'copy["source"] == "cache"' in VM and 'copy["source"] == "operator"' in VM
    assert 'cache.succeed("systemctl stop nginx.service")' in VM
