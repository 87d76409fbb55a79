"""The host module (nixosModules.default) on stubs of the NixOS options it sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.nix.conftest import REPO, Nix

HOST_VIEW = """
let c = {config}; in {{
  units = c.systemd.services;
  ports = c.networking.firewall.allowedTCPPorts;
  iptables = c.networking.firewall.extraCommands;
  warnings = c.warnings;
  etc = c.environment.etc;
  users = c.users.users;
  groups = builtins.attrNames c.users.groups;
  openssh = c.services.openssh;
  trusted = c.nix.settings.trusted-users;
  trustedKeys = c.nix.settings.extra-trusted-public-keys or null;
  sudo = c.security.sudo.extraRules;
  switch = c.system.switch.enable;
  hostName = c.networking.hostName;
  platform = c.nixpkgs.hostPlatform;
  failed = c.failedAssertions;
  packages = c.environment.systemPackages;
  helper = c.fleet.hostHelper;
  tmpfiles = c.systemd.tmpfiles.rules;
}}
"""

# The host helper's derivation: the fake runCommand keeps its build script.
HELPER_VIEW = """
let c = {config}; in {{
  inherit (c.fleet.hostHelper) name buildCommand meta;
  src = toString c.fleet.hostHelper.src;
  systemd = c.systemd.package;
  nix = c.nix.package;
  python3 = h.pkgs.python3;
}}
"""

STORE = "/nix/store/00000000000000000000000000000000"
BOOT_UNIT = "fleet-host-boot"


@pytest.fixture(scope="module")
def hosts(nix: Nix) -> dict[str, Any]:
    fleet = nix.fleet("good.nix")
    names = ["app1", "app2", "db1"]
    views = " ".join(
        f"{n} = {HOST_VIEW.format(config=f'(h.hostConfig f {json.dumps(n)})')};" for n in names
    )
    return nix.eval(f"let f = {fleet}; in {{ {views} }}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def example(nix: Nix) -> dict[str, Any]:
    views = " ".join(
        f"{n} = {HOST_VIEW.format(config=f'(h.planConfig h.example {json.dumps(n)})')};"
        for n in ["app1", "db1"]
    )
    return nix.eval(f"{{ {views} }}")  # type: ignore[no-any-return]


def fleet_units(host: dict[str, Any]) -> list[str]:
    """The units of services (the host module's own units left out)."""
    own = {BOOT_UNIT, "fleet-metrics"}
    return sorted(u for u in host["units"] if u.startswith("fleet-") and u not in own)


def test_each_placed_service_gets_a_unit(hosts: dict[str, Any]) -> None:
    assert fleet_units(hosts["app1"]) == ["fleet-api", "fleet-legacy"]
    assert fleet_units(hosts["app2"]) == ["fleet-api", "fleet-edge"]
    assert fleet_units(hosts["db1"]) == ["fleet-worker"]
    assert "cache" in hosts["db1"]["units"] and "cache" not in hosts["app1"]["units"]


def test_units_are_hardened(hosts: dict[str, Any]) -> None:
    api = hosts["app1"]["units"]["fleet-api"]
    config = api["serviceConfig"]
    assert api["wantedBy"] == ["multi-user.target"]
    assert (
        config["ExecStart"]
        == '"/nix/store/00000000000000000000000000000000-hello-api/bin/hello-api"'
    )
    expected = {
        "DynamicUser": True,
        "StateDirectory": "fleet-api",
        "ProtectSystem": "strict",
        "ProtectHome": True,
        "PrivateTmp": True,
        "NoNewPrivileges": True,
        "RestrictAddressFamilies": ["AF_INET", "AF_INET6", "AF_UNIX"],
        "SystemCallFilter": ["@system-service"],
        "CapabilityBoundingSet": "",
        "MemoryMax": "256M",
        "CPUQuota": "50%",
        "Restart": "on-failure",
        "RestartSec": 2,
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "AmbientCapabilities" not in config


def test_a_privileged_port_gets_only_the_bind_capability(hosts: dict[str, Any]) -> None:
    config = hosts["app2"]["units"]["fleet-edge"]["serviceConfig"]
    assert config["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert config["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_hardening_can_be_turned_off(hosts: dict[str, Any]) -> None:
    config = hosts["app1"]["units"]["fleet-legacy"]["serviceConfig"]
    assert "DynamicUser" not in config and "ProtectSystem" not in config
    assert config["StateDirectory"] == "fleet-legacy"


def test_arguments_are_quoted_for_systemd(hosts: dict[str, Any]) -> None:
    config = hosts["db1"]["units"]["fleet-worker"]["serviceConfig"]
    assert config["ExecStart"] == (
        '"/run/current-system/sw/bin/worker" "--greeting" "100%% $$HOME \\"quoted\\""'
    )
    assert (config["Restart"], config["RestartSec"]) == ("always", 5)


def test_local_dependencies_are_ordered_and_remote_ones_discovered(hosts: dict[str, Any]) -> None:
    worker = hosts["db1"]["units"]["fleet-worker"]
    assert worker["after"] == ["network.target", "cache.service"]
    assert worker["wants"] == ["cache.service"]
    assert worker["environment"]["FLEET_CACHE_ADDRS"] == "10.0.0.21:6379"
    api = hosts["app1"]["units"]["fleet-api"]
    assert api["after"] == ["network.target"] and api["wants"] == []
    assert api["environment"] == {
        "FLEET_CACHE_ADDRS": "10.0.0.21:6379",
        "FLEET_HOST": "app1",
        "FLEET_SERVICE": "api",
    }
    edge = hosts["app2"]["units"]["fleet-edge"]
    assert edge["after"] == ["network.target", "fleet-api.service"]


def test_a_module_run_service_keeps_its_unit_and_gets_limits(hosts: dict[str, Any]) -> None:
    cache = hosts["db1"]["units"]["cache"]
    assert cache["description"] == "cache from its own module"
    assert cache["serviceConfig"] == {
        "ExecStart": "/run/current-system/sw/bin/cache",
        "MemoryMax": "1G",
    }
    assert cache["environment"]["FLEET_SERVICE"] == "cache"


def opened(host: dict[str, Any]) -> list[int]:
    """The ports the host's iptables rules accept from any source."""
    return sorted({int(line.split("--dport ")[1].split()[0]) for line in rules(host["iptables"])})


def rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if line and not line.startswith("#")]


def test_ports_are_opened_to_the_fleet(hosts: dict[str, Any]) -> None:
    # Not to everyone: tests/nix/test_nix_access.py has the rules.
    assert all(host["ports"] == [] for host in hosts.values())
    assert opened(hosts["app1"]) == [8080]
    assert opened(hosts["app2"]) == [443, 8080]
    # worker keeps 9000 closed
    assert opened(hosts["db1"]) == [6379]


def test_manifest(hosts: dict[str, Any]) -> None:
    manifest = json.loads(hosts["db1"]["etc"]["fleet/manifest.json"]["text"])
    assert manifest["host"] == "db1"
    assert manifest["address"] == "10.0.0.21"
    assert manifest["services"]["cache"] == {
        "unit": "cache.service",
        "managedBy": "nixos-module",
        "ports": [6379],
        "dependsOn": [],
        "dependencies": {},
        "allowFrom": ["10.0.0.11", "10.0.0.12", "10.0.0.21"],
    }
    assert manifest["services"]["worker"]["allowFrom"] == []  # openFirewall = false
    assert manifest["secrets"] == []
    assert manifest["services"]["worker"]["managedBy"] == "fleet"
    assert manifest["services"]["worker"]["dependencies"] == {"cache": ["10.0.0.21:6379"]}
    assert [c["name"] for c in manifest["checks"]] == ["cache", "worker"]


def test_manifest_checks_match_the_inventory(nix: Nix, hosts: dict[str, Any]) -> None:
    inventory = nix.eval(f"{nix.fleet('good.nix')}.config.build.inventory")
    for name, host in hosts.items():
        manifest = json.loads(host["etc"]["fleet/manifest.json"]["text"])
        assert manifest["checks"] == inventory["hosts"][name]["checks"]


def test_ssh_access_for_root(hosts: dict[str, Any]) -> None:
    app1 = hosts["app1"]
    assert app1["openssh"]["enable"] is True
    assert app1["openssh"]["ports"] == [22]
    assert app1["openssh"]["settings"]["AllowTcpForwarding"] is True
    assert app1["openssh"]["settings"]["PasswordAuthentication"] is False
    assert app1["users"]["root"]["openssh"]["authorizedKeys"]["keys"][0].startswith("ssh-ed25519 ")
    assert app1["trusted"] == ["root"]
    assert app1["sudo"] == []
    assert hosts["db1"]["openssh"]["ports"] == [2222]


def test_ssh_access_for_a_deploy_user(hosts: dict[str, Any]) -> None:
    app2 = hosts["app2"]
    deploy = app2["users"]["deploy"]
    assert deploy["isSystemUser"] is True and deploy["group"] == "deploy"
    assert deploy["useDefaultShell"] is True
    assert len(deploy["openssh"]["authorizedKeys"]["keys"]) == 1
    assert "deploy" in app2["groups"]
    # Not trusted by Nix: what it copies must be signed by a key the host trusts.
    assert app2["trusted"] == ["root"]
    assert app2["trustedKeys"] == ["fleet-test-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs="]
    # Root for one program only, at a path only root can change.
    assert app2["sudo"] == [
        {
            "users": ["deploy"],
            "groups": [],
            "host": "ALL",
            "runAs": "root",
            "commands": [
                {
                    "command": "/run/current-system/sw/bin/fleet-host",
                    "options": ["NOPASSWD", "NOSETENV"],
                }
            ],
        }
    ]


def test_a_deploy_user_needs_a_trusted_key(nix: Nix) -> None:
    fleet = """(h.evalFleet [ {
      imports = [ tests/nix/fixtures/base.nix ];
      hosts.app1.sshUser = "deploy";
    } ])"""
    failed = nix.eval(f'(h.hostConfig {fleet} "app1").failedAssertions')
    assert len(failed) == 1
    assert "fleet.trustedPublicKeys" in failed[0] and "not root" in failed[0]


def test_system_settings(hosts: dict[str, Any]) -> None:
    for name, host in hosts.items():
        assert host["switch"] is True
        assert host["hostName"] == name
        assert host["platform"] == "x86_64-linux"
        assert host["failed"] == []


def test_example_hosts(example: dict[str, Any]) -> None:
    api = example["app1"]["units"]["fleet-api"]
    assert api["environment"]["FLEET_REDIS_ADDRS"] == "192.0.2.21:6379"
    assert api["environment"]["API_VERSION"] == "1"
    assert api["serviceConfig"]["ExecStart"].endswith('/bin/callPackage-api" "--port" "8080"')
    assert api["serviceConfig"]["LoadCredential"] == [
        "redis-password:/var/lib/fleet/secrets/api/redis-password"
    ]
    fleet = ["192.0.2.11", "192.0.2.12", "192.0.2.21", "192.0.2.31", "192.0.2.32", "192.0.2.41"]
    # The API's port to the fleet (the balancers and the monitoring host among it), the
    # agent's to the balancers, the node exporter's to the monitoring host.
    assert rules(example["app1"]["iptables"]) == [
        f"iptables -w -A nixos-fw -p tcp --dport 8080 -s {a} -j nixos-fw-accept" for a in fleet
    ] + [
        f"iptables -w -A nixos-fw -p tcp --dport 9777 -s {a} -j nixos-fw-accept"
        for a in ["192.0.2.31", "192.0.2.32"]
    ] + ["iptables -w -A nixos-fw -p tcp --dport 9100 -s 192.0.2.41 -j nixos-fw-accept"]
    redis = example["db1"]["units"]["redis-main"]
    assert redis["serviceConfig"] == {
        "MemoryMax": "512M",
        "LoadCredential": ["redis-password:/var/lib/fleet/secrets/redis/redis-password"],
    }
    assert rules(example["db1"]["iptables"]) == [
        f"iptables -w -A nixos-fw -p tcp --dport 6379 -s {a} -j nixos-fw-accept" for a in fleet
    ] + ["iptables -w -A nixos-fw -p tcp --dport 9100 -s 192.0.2.41 -j nixos-fw-accept"]
    assert all(host["ports"] == [] and host["warnings"] == [] for host in example.values())
    assert fleet_units(example["db1"]) == []


# The host helper and boot recovery.


@pytest.fixture(scope="module")
def helper(nix: Nix) -> dict[str, Any]:
    return nix.eval(  # type: ignore[no-any-return]
        HELPER_VIEW.format(config=f'(h.hostConfig {nix.fleet("good.nix")} "app1")')
    )


def test_the_helper_is_installed_on_every_host(
    hosts: dict[str, Any], example: dict[str, Any]
) -> None:
    for host in [*hosts.values(), *example.values()]:
        assert host["helper"] == f"{STORE}-fleet-host"
        assert host["packages"].count(host["helper"]) == 1


def test_the_helper_is_built_from_the_hostside_source(helper: dict[str, Any]) -> None:
    assert helper["name"] == "fleet-host"
    assert helper["meta"]["mainProgram"] == "fleet-host"
    assert helper["src"] == str(REPO / "fleet" / "hostside" / "fleet_host.py")


def test_the_helper_runs_the_hosts_own_programs(helper: dict[str, Any]) -> None:
    script = helper["buildCommand"]
    systemd, nix_ = helper["systemd"], helper["nix"]
    assert systemd == f"{STORE}-systemd" and nix_ == f"{STORE}-nix"
    for constant, placeholder, program in [
        ("SYSTEMCTL", "@systemctl@", f"{systemd}/bin/systemctl"),
        ("SYSTEMD_RUN", "@systemd_run@", f"{systemd}/bin/systemd-run"),
        ("BOOTCTL", "@bootctl@", f"{systemd}/bin/bootctl"),
        ("NIX_ENV", "@nix_env@", f"{nix_}/bin/nix-env"),
        ("NIX_STORE", "@nix_store@", f"{nix_}/bin/nix-store"),
        ("NIX", "@nix@", f"{nix_}/bin/nix"),
    ]:
        replacement = f"""'{constant} = "{placeholder}"' '{constant} = "{program}"'"""
        assert f"--replace-fail {replacement}" in script
    python = f"{helper['python3']}/bin/python3"
    assert f"\n{python} -m compileall -q --invalidation-mode unchecked-hash " in script
    assert f"\n#!{python} -BIS\n" in script  # the launcher, by the same Python


def test_the_helper_follows_the_configured_packages(nix: Nix) -> None:
    fleet = """(h.evalFleet [ ({ pkgs, ... }: {
      imports = [ tests/nix/fixtures/base.nix ];
      hosts.app1.modules = [ {
        systemd.package = pkgs.fake "systemd-custom";
        nix.package = pkgs.fake "nix-custom";
      } ];
    }) ])"""
    script = nix.eval(f'(h.hostConfig {fleet} "app1").fleet.hostHelper.buildCommand')
    assert f"{STORE}-systemd-custom/bin/systemctl" in script
    assert f"{STORE}-systemd-custom/bin/bootctl" in script
    assert f"{STORE}-nix-custom/bin/nix-store" in script
    assert f"{STORE}-systemd/" not in script and f"{STORE}-nix/" not in script


def test_the_helper_cannot_be_replaced(nix: Nix) -> None:
    error = nix.error(
        """(h.hostConfig (h.evalFleet [ ({ pkgs, ... }: {
          imports = [ tests/nix/fixtures/base.nix ];
          hosts.app1.modules = [ { fleet.hostHelper = pkgs.fake "other"; } ];
        }) ]) "app1").fleet.hostHelper"""
    )
    assert "fleet.hostHelper" in error and "read-only" in error


def test_the_boot_recovery_unit(hosts: dict[str, Any]) -> None:
    for host in hosts.values():
        unit = host["units"][BOOT_UNIT]
        assert unit["wantedBy"] == ["multi-user.target"]
        assert unit["after"] == ["multi-user.target"]
        assert unit["restartIfChanged"] is False
        # Its exit status counts: no "-" prefix, no SuccessExitStatus, no restart.
        assert unit["serviceConfig"] == {
            "Type": "oneshot",
            "RemainAfterExit": True,
            "ExecStart": f"{STORE}-fleet-host/bin/fleet-host boot",
            "Restart": "no",
        }


def test_state_and_runtime_directories(hosts: dict[str, Any]) -> None:
    for host in hosts.values():
        assert host["tmpfiles"] == [
            "d /var/lib/fleet 0700 root root - -",
            "d /run/fleet 0700 root root - -",
        ]


@pytest.mark.parametrize("unit", ["fleet-host-boot", "fleet", "fleet-agent", "fleet-agent@"])
def test_a_service_cannot_take_a_reserved_unit_name(nix: Nix, unit: str) -> None:
    failed = nix.eval(
        f"""(h.hostConfig (h.evalFleet [ {{
          imports = [ tests/nix/fixtures/base.nix ];
          services.api.unit = "{unit}";
        }} ]) "app1").failedAssertions"""
    )
    assert failed == [
        f'fleet: host app1: service(s) "api" would run as unit {unit}, which the fleet host '
        "module reserves (fleet-host-boot is its boot recovery, fleet-agent the agent the "
        "balancers ask; fleet would own "
        "/var/lib/fleet, the host's transaction and records): rename the service or set "
        "its `unit`."
    ]


# The build script, run with a stand-in for stdenv's substitute, and this Python for the
# package's.

SUBSTITUTE = """
substitute() {
  "$PYTHON" - "$@" <<'END'
import sys
path, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(path) as f:
    text = f.read()
while args:
    flag, old, new, *args = args
    assert flag == "--replace-fail", flag
    if old not in text:
        sys.exit(f"substituteStream(): ERROR: pattern {old} doesn't match anything in file")
    text = text.replace(old, new)
with open(out, "w") as f:
    f.write(text)
END
}
"""

SOURCE = '''\
#!/usr/bin/env python3
"""A stand-in for fleet_host.py with its placeholders."""

SYSTEMCTL = "@systemctl@"
SYSTEMD_RUN = "@systemd_run@"
NIX_ENV = "@nix_env@"
NIX_STORE = "@nix_store@"
NIX = "@nix@"
BOOTCTL = "@bootctl@"


def program(value: str, name: str) -> str:
    return name if value.startswith("@") or value == "@systemctl@" else value
'''


def build(script: str, source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "fleet_host.py"
    src.write_text(source)
    script = script.replace(f"{STORE}-python3/bin/python3", sys.executable)
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + SUBSTITUTE + script],
        env={
            "PATH": os.environ["PATH"],
            "PYTHON": sys.executable,
            "src": str(src),
            "out": str(tmp_path / "out"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_build_script_substitutes(helper: dict[str, Any], tmp_path: Path) -> None:
    result = build(helper["buildCommand"], SOURCE, tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.access(tmp_path / "out" / "bin" / "fleet-host", os.X_OK)
    lines = (tmp_path / "out" / "lib" / "fleet-host" / "fleet_host.py").read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env python3"  # line for line the source
    assert lines[3:9] == [
        f'SYSTEMCTL = "{STORE}-systemd/bin/systemctl"',
        f'SYSTEMD_RUN = "{STORE}-systemd/bin/systemd-run"',
        f'NIX_ENV = "{STORE}-nix/bin/nix-env"',
        f'NIX_STORE = "{STORE}-nix/bin/nix-store"',
        f'NIX = "{STORE}-nix/bin/nix"',
        f'BOOTCTL = "{STORE}-systemd/bin/bootctl"',
    ]
    # Only the assignments change: a comparison with a placeholder stays.
    assert lines[-1].endswith('value == "@systemctl@" else value')


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (SOURCE.replace("#!/usr/bin/env python3", "#!/usr/bin/python3"), "first line"),
        (SOURCE.replace('BOOTCTL = "@bootctl@"\n', ""), "BOOTCTL"),
        (
            SOURCE + 'JOURNALCTL = "@journalctl@"\n',
            "placeholder(s) above have no value on NixOS",
        ),
    ],
    ids=["shebang", "missing", "unknown"],
)
def test_the_build_fails_on_a_source_it_does_not_know(
    helper: dict[str, Any], tmp_path: Path, source: str, message: str
) -> None:
    result = build(helper["buildCommand"], source, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_real_source_builds(helper: dict[str, Any], tmp_path: Path) -> None:
    source = (REPO / "fleet" / "hostside" / "fleet_host.py").read_text()
    if '"@' not in source:
        pytest.skip("fleet/hostside/fleet_host.py has no placeholders yet")
    result = build(helper["buildCommand"], source, tmp_path)
    assert result.returncode == 0, result.stderr
    # The launcher runs the module from the bytecode the build made: not even the source
    # is read.
    module = tmp_path / "out" / "lib" / "fleet-host" / "fleet_host.py"
    module.chmod(0o644)
    module.write_text('raise SystemExit("compiled from the source")\n')
    run = subprocess.run([tmp_path / "out" / "bin" / "fleet-host", "version"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"] is True
