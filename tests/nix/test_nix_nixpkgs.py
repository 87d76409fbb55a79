"""The host module against nixpkgs' own option declarations, not stubs.

The NixOS sources come from a nixpkgs checkout (FLEET_NIXPKGS; the flake's checks
pass nixpkgs itself) or from the few files tests/nix/nixpkgs_files.py lists, kept in
~/.cache/fleet/nixpkgs; without them these tests are skipped, with that reason.
What is evaluated, and what is still declared by hand, is in
fixtures/nixos-real.nix. A test also proves that every stub the other Nix tests
use (fixtures/nixos-stubs.nix) has the type nixpkgs declares.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from tests.nix.conftest import FIXTURES, REPO, Nix, nix_path, nixpkgs_path
from tests.nix.nixpkgs_files import PYTHON_PACKAGES, needed


@pytest.fixture(scope="module")
def real(nix: Nix) -> Nix:
    folder = nixpkgs_path()
    modules = nix.eval("h.real.modules")
    missing = [f for f in needed(modules) if not (folder / f).is_file()]
    if missing:
        pytest.skip(
            f"nixpkgs' NixOS sources not found in {folder} (missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): set FLEET_NIXPKGS to a nixpkgs checkout, "
            "or put those files there"
        )
    return replace(nix, nixpkgs=folder)


EXAMPLE_VIEW = """
let c = h.realConfig h.example {host}; in {{
  failed = c.failedAssertions;
  units = c.unitText;
  sockets = c.socketText;
  timers = c.timerText;
  haproxy = {{ inherit (c.services.haproxy) enable config; }};
  ports = c.networking.firewall.allowedTCPPorts;
  users = builtins.mapAttrs (_: u: {{ inherit (u) isSystemUser group useDefaultShell
    description; keys = u.openssh.authorizedKeys.keys; }}) c.users.users;
  groups = builtins.attrNames c.users.groups;
  sudo = map (r: {{ inherit (r) users runAs commands; }}) c.security.sudo.extraRules;
  openssh = {{ inherit (c.services.openssh) enable ports; settings = {{
    inherit (c.services.openssh.settings) AllowTcpForwarding PasswordAuthentication
    KbdInteractiveAuthentication; }}; }};
  trustedKeys = c.nix.settings.extra-trusted-public-keys or null;
  firewall = {{ inherit (c.networking.firewall) extraCommands extraStopCommands; }};
  nftables = c.networking.firewall.extraInputRules;
  tmpfiles = c.systemd.tmpfiles.rules;
  manifest = c.environment.etc."fleet/manifest.json".text;
  packages = map (p: p.name) c.environment.systemPackages;
  switch = c.system.switch.enable;
  redis = c.services.redis.servers;
  prometheus = {{
    inherit (c.services.prometheus) enable listenAddress port checkConfig;
    alertmanager = {{ inherit (c.services.prometheus.alertmanager) enable listenAddress port; }};
    node = {{ inherit (c.services.prometheus.exporters.node) enable port enabledCollectors; }};
    blackbox = {{ inherit (c.services.prometheus.exporters.blackbox) enable listenAddress; }};
  }};
}}
"""


@pytest.fixture(scope="module")
def example(real: Nix) -> dict[str, Any]:
    hosts = ["app1", "app2", "db1", "lb1", "mon1"]
    views = " ".join(f"{h} = {EXAMPLE_VIEW.format(host=json.dumps(h))};" for h in hosts)
    result: dict[str, Any] = real.eval("{ " + views + " }")
    return result


def test_the_example_hosts_evaluate_on_nixpkgs_declarations(example: dict[str, Any]) -> None:
    for name, host in example.items():
        assert host["failed"] == [], name
        assert host["switch"] is True
        assert host["openssh"]["enable"] is True
        assert host["openssh"]["settings"]["AllowTcpForwarding"] is True
        assert "d /var/lib/fleet 0700 root root - -" in host["tmpfiles"]
        assert json.loads(host["manifest"])["host"] == name
        assert host["packages"] == ["fleet-host"]


def test_the_units_render_as_nixos_writes_them(example: dict[str, Any]) -> None:
    """NixOS's own serviceToUnit: every [Service] key passes its checks (Restart's
    values among them), and the lines are what systemd reads."""
    api = example["app1"]["units"]["fleet-api"]
    assert "[Service]" in api and "Restart=on-failure\n" in api
    assert "ExecStart=" in api and "DynamicUser=true\n" in api
    assert "WantedBy=multi-user.target" in api
    boot = example["app1"]["units"]["fleet-host-boot"]
    assert "Type=oneshot\n" in boot and "X-RestartIfChanged=false\n" in boot
    redis = example["db1"]["units"]
    assert any(u.startswith("redis") for u in redis)


def test_the_agent_renders_as_nixos_writes_it(example: dict[str, Any]) -> None:
    """A socket-activated pair: one service instance per connection, the connection its
    standard input and output, on the API's hosts only."""
    socket = example["app1"]["sockets"]["fleet-agent"]
    assert "[Socket]" in socket and "Accept=true\n" in socket
    assert "ListenStream=9777\n" in socket
    assert "IPAddressAllow=192.0.2.31\nIPAddressAllow=192.0.2.32\n" in socket
    assert "IPAddressDeny=any\n" in socket
    assert "WantedBy=sockets.target" in socket
    agent = example["app1"]["units"]["fleet-agent@"]
    for line in [
        "ExecStart=/run/current-system/sw/bin/fleet-host agent",
        "StandardInput=socket",
        "StandardOutput=socket",
        "RuntimeMaxSec=5",
        "PrivateNetwork=true",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "CollectMode=inactive-or-failed",
    ]:
        assert f"{line}\n" in agent, line
    assert example["db1"]["sockets"] == {} and "fleet-agent@" not in example["db1"]["units"]
    assert example["lb1"]["sockets"] == {}


def test_the_balancer_runs_nixpkgs_haproxy_module(example: dict[str, Any]) -> None:
    lb1 = example["lb1"]
    assert lb1["haproxy"]["enable"] is True
    assert "frontend api\n" in lb1["haproxy"]["config"]
    assert lb1["ports"] == [80]
    assert example["app1"]["haproxy"] == {"enable": False, "config": None}
    assert example["app1"]["ports"] == []


def test_monitoring_sets_nixpkgs_prometheus_modules(example: dict[str, Any]) -> None:
    """Prometheus, Alertmanager and the blackbox exporter on the monitoring host, on
    loopback; the node exporter on every host; the metrics timer as NixOS writes it."""
    mon1 = example["mon1"]["prometheus"]
    assert (mon1["enable"], mon1["listenAddress"], mon1["port"]) == (True, "127.0.0.1", 9090)
    assert mon1["checkConfig"] is True
    assert mon1["alertmanager"] == {"enable": True, "listenAddress": "127.0.0.1", "port": 9093}
    assert mon1["blackbox"] == {"enable": True, "listenAddress": "127.0.0.1"}
    for name, host in example.items():
        assert host["prometheus"]["node"] == {
            "enable": True,
            "port": 9100,
            "enabledCollectors": ["systemd"],
        }, name
        timer = host["timers"]["fleet-metrics"]
        assert "[Timer]\nAccuracySec=5s\nOnCalendar=minutely\n" in timer
        assert "WantedBy=timers.target" in timer
        unit = host["units"]["fleet-metrics"]
        for line in [
            "Type=oneshot",
            "ExecStart=-/run/current-system/sw/bin/fleet-host metrics",
            "StateDirectory=fleet-metrics",
            "PrivateNetwork=true",
            "ProtectSystem=strict",
        ]:
            assert f"{line}\n" in unit, line
    app1 = example["app1"]["prometheus"]
    assert app1["enable"] is app1["alertmanager"]["enable"] is app1["blackbox"]["enable"] is False


def test_redis_is_nixpkgs_own_module(example: dict[str, Any]) -> None:
    servers = example["db1"]["redis"]
    assert [s for s in servers if servers[s]["enable"]] == ["main"]
    assert example["app1"]["redis"] == {}


RESTART_POLICIES = """
let
  services = (h.evalFleet [ ]).options.services;
  payload = (services.type.getSubOptions [ ]).restart.policy.type.functor.payload;
in payload.values or payload
"""


def test_every_restart_policy_the_service_option_allows_nixos_accepts(real: Nix) -> None:
    policies = real.eval(RESTART_POLICIES)
    assert "on-failure" in policies and "on-watchdog" not in policies
    for policy in [*policies, "on-watchdog"]:
        unit = f'(h.real.evalHost [ {{ systemd.services.x.serviceConfig.Restart = "{policy}"; }} ])'
        if policy == "on-watchdog":
            assert "Restart" in real.error(f"{unit}.unitText.x")
        else:
            assert f"Restart={policy}\n" in real.eval(f"{unit}.unitText.x")


STUB_TYPES = """
let
  lib = h.lib;
  stub = (lib.evalModules { modules = [ ./nixos-stubs.nix { _module.args.pkgs = h.pkgs; } ]; })
    .options;
  real = h.real.options;
  walk = prefix: stubs: reals: lib.concatLists (lib.mapAttrsToList (name: s:
    let
      r = reals.${name} or null;
      path = prefix ++ [ name ];
    in
    if name == "_module" then [ ]
    else if lib.isOption s then
      [ { path = lib.concatStringsSep "." path; stub = s.type.description;
          real = if r != null && lib.isOption r then r.type.description else null; } ]
      ++ (if r != null && lib.isOption r then walk path (s.type.getSubOptions [ ])
          (r.type.getSubOptions [ ]) else [ ])
    else walk path s (if r == null then { } else r)) stubs);
in walk [ ] stub real
"""


def test_every_stub_has_the_type_nixpkgs_declares(real: Nix) -> None:
    """The stubs stand in for nixpkgs in the other tests; each must be the real thing's
    type, or those tests prove less than they say."""
    compared = real.eval(
        STUB_TYPES.replace("./nixos-stubs.nix", nix_path(FIXTURES / "nixos-stubs.nix"))
    )
    assert len(compared) > 20
    differ = [c for c in compared if c["stub"] != c["real"]]
    assert differ == [], "\n".join(
        f"{c['path']}: stub {c['stub']!r}, nixpkgs {c['real']!r}" for c in differ
    )


def test_the_flake_names_python_packages_nixpkgs_has() -> None:
    """The package's and the devShell's Python packages, each a folder of nixpkgs'
    python-modules (types-jsonschema, for one, is not in nixos-25.11)."""
    flake = (REPO / "flake.nix").read_text()
    lists = re.findall(r"with ps; \[(.*?)\]", flake, re.S)
    names = sorted({n for block in lists for n in block.split()})
    assert "pytest" in names and "click" in names
    assert set(names) <= set(PYTHON_PACKAGES), "add new ones to PYTHON_PACKAGES"
    folder = nixpkgs_path() / "pkgs/development/python-modules"
    if not folder.is_dir():
        pytest.skip(f"nixpkgs' python-modules not found in {folder}")
    assert [n for n in names if not (folder / n / "default.nix").is_file()] == []


CACHE_VIEW = """
let c = h.realConfig (h.evalFleet [ {fixture} ]) {host}; in {{
  failed = c.failedAssertions;
  nginx = {{
    inherit (c.services.nginx) enable appendHttpConfig;
    virtualHosts = builtins.attrNames c.services.nginx.virtualHosts;
  }};
  settings = {{ inherit (c.nix.settings) substituters trusted-public-keys; }};
  negative = c.nix.settings.narinfo-cache-negative-ttl or null;
  tmpfiles = c.systemd.tmpfiles.rules;
}}
"""


def test_the_cache_host_runs_nixpkgs_nginx_module(real: Nix) -> None:
    """The server in nixpkgs' `appendHttpConfig`, and no `localhost` virtual host (nixpkgs'
    default, on port 80); every host's substituter and key in nixpkgs' `nix.settings`."""
    fixture = nix_path(FIXTURES / "cache.nix")
    hosts = {
        name: real.eval(CACHE_VIEW.format(fixture=fixture, host=json.dumps(name)))
        for name in ("cache1", "app1")
    }
    cache1, app1 = hosts["cache1"], hosts["app1"]
    assert cache1["failed"] == [] and app1["failed"] == []
    assert cache1["nginx"]["enable"] is True
    assert "listen 5080;" in cache1["nginx"]["appendHttpConfig"]
    assert cache1["nginx"]["virtualHosts"] == []
    assert app1["nginx"]["enable"] is False and app1["nginx"]["appendHttpConfig"] == ""
    assert app1["nginx"]["virtualHosts"] == ["localhost"]  # nixpkgs' default, unused there
    for host in hosts.values():
        assert host["settings"]["substituters"] == ["http://10.0.0.51:5080"]
        assert host["settings"]["trusted-public-keys"] == [
            "fleet-test-cache-1:Zm9yIHRoZSB0ZXN0cyBvbmx5LCBuZXZlciBhIGtleSE="
        ]
        assert host["negative"] == 0
    assert "d /var/lib/fleet-cache 0755 root root - -" in cache1["tmpfiles"]
