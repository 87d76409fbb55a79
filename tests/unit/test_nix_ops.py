"""Local Nix operations on a throwaway flake (no nixpkgs needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet import nix
from fleet.errors import NixError

pytestmark = pytest.mark.skipif(shutil.which("nix") is None, reason="needs nix")

FLAKE = """
{
  outputs = { self }: {
    packages.%(system)s.fleet = derivation {
      name = "fleet-tool"; system = "%(system)s"; builder = "/bin/sh";
      args = [ "-c" "echo tool > $out" ];
    };
    fleet = { schemaVersion = 1; hosts = { a = { address = "192.0.2.1"; }; }; deploy = { }; };
    nixosConfigurations = builtins.listToAttrs (map (name: {
      inherit name;
      value.config.system.build.toplevel = derivation {
        name = "sys-${name}"; system = "%(system)s"; builder = "/bin/sh";
        args = [ "-c" "echo ${name} > $out" ];
      };
    }) [ "odd.name" "a" "b" "c" "a10" "a2" ]) // {
      broken.config.system.build.toplevel = derivation {
        name = "broken"; system = "%(system)s"; builder = "/bin/sh";
        args = [ "-c" "echo the build went wrong >&2; exit 1" ];
      };
      unevaluated = throw "a host that was not selected is never evaluated";
    };
  };
}
"""


@pytest.fixture()
def flake(tmp_path: Path, monkeypatch) -> str:
    monkeypatch.setenv("NIX_CONFIG", "substituters =")
    from fleet.lab.flake import nix_system

    (tmp_path / "flake.nix").write_text(FLAKE % {"system": nix_system()})
    return str(tmp_path)


def test_inventory_is_found_even_when_a_package_shares_its_name(flake):
    assert nix.eval_json(flake, "fleet").startswith("/nix/store/")  # what Nix finds first
    inventory = nix.eval_inventory(flake)
    assert inventory["schemaVersion"] == 1 and list(inventory["hosts"]) == ["a"]


def test_each_host_gets_its_own_system_whatever_the_order(flake):
    hosts = ["c", "a10", "odd.name", "a", "a2", "b"]
    paths = nix.build_systems(flake, hosts)
    assert list(paths) == hosts
    for host, path in paths.items():
        assert path.endswith(f"-sys-{host}")
        assert Path(path).read_text().strip() == host


def test_a_host_without_configuration_is_named(flake):
    with pytest.raises(NixError, match="no nixosConfigurations for ghost"):
        nix.build_systems(flake, ["a", "ghost"])


def test_build_failure_is_one_line_with_the_cause(flake):
    with pytest.raises(NixError) as error:
        nix.build_systems(flake, ["a", "broken"])
    message = str(error.value)
    assert "\n" not in message
    assert "error: builder for" in message and "the build went wrong" in message
