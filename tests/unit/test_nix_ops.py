"""Local Nix operations on a throwaway flake (no nixpkgs needed)."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import nix
from fleet.errors import DeclarationError, NixError, UsageError

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


# The command line's Nix options, observed in what Nix does with them.
OPTIONS_FLAKE = """{
  %(config)s
  inputs.data = { url = "path:%(data)s"; flake = false; };
  outputs = { self, data }: {
    fromInput = import data;
    # Import from derivation: what allow-import-from-derivation forbids.
    ifd = builtins.readFile (derivation {
      name = "ifd-%(nonce)s"; system = "%(system)s"; builder = "/bin/sh";
      args = [ "-c" "echo built > $out" ];
    });
    nixosConfigurations.h.config.system.build.toplevel = derivation {
      name = "sys-%(nonce)s"; system = "%(system)s"; builder = "/bin/sh";
      args = [ "-c" "echo h > $out" ];
    };
  };
}
"""


@pytest.fixture()
def options_flake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A flake with an input, an import from derivation and a system never built before;
    the options are reset afterwards."""
    monkeypatch.setenv("NIX_CONFIG", "substituters =")
    from fleet.lab.flake import nix_system

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "default.nix").write_text(f'"from {name}"\n')
    (tmp_path / "flake").mkdir()
    values = {"data": tmp_path / "a", "nonce": secrets.token_hex(8), "system": nix_system()}
    (tmp_path / "flake" / "flake.nix").write_text(OPTIONS_FLAKE % {**values, "config": ""})
    yield tmp_path
    nix.configure(nix.NixArgs())


def test_an_option_reaches_every_evaluation(options_flake: Path) -> None:
    flake = f"path:{options_flake / 'flake'}"
    nix.configure(nix.NixArgs(options=(("allow-import-from-derivation", "false"),)))
    with pytest.raises(DeclarationError, match="option 'allow-import-from-derivation'"):
        nix.eval_json(flake, "ifd")
    nix.configure(nix.NixArgs())
    assert nix.eval_json(flake, "ifd") == "built\n"


def test_the_flakes_own_nix_config_applies_only_when_the_operator_says(
    options_flake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (options_flake / "flake" / "flake.nix").read_text()
    config = "nixConfig.allow-import-from-derivation = false;"
    (options_flake / "flake" / "flake.nix").write_text(text.replace("{\n", "{\n" + config, 1))
    monkeypatch.setenv("NIX_CONFIG", "substituters =\naccept-flake-config = true")
    flake = f"path:{options_flake / 'flake'}"
    assert nix.eval_json(flake, "ifd") == "built\n"  # nix.conf accepts it; fleet does not
    nix.configure(nix.NixArgs(options=(("accept-flake-config", "true"),)))
    with pytest.raises(DeclarationError, match="option 'allow-import-from-derivation'"):
        nix.eval_json(flake, "ifd")


def test_an_input_override_changes_what_is_evaluated(options_flake: Path) -> None:
    flake = f"path:{options_flake / 'flake'}"
    assert nix.eval_json(flake, "fromInput") == "from a"
    nix.configure(nix.NixArgs(override_inputs=(("data", f"path:{options_flake / 'b'}"),)))
    assert nix.eval_json(flake, "fromInput") == "from b"
    assert "locked" in nix.flake_metadata(flake)


def test_an_override_of_an_input_the_flake_lacks_is_refused(options_flake: Path) -> None:
    nix.configure(nix.NixArgs(override_inputs=(("date", f"path:{options_flake / 'b'}"),)))
    with pytest.raises(UsageError, match=r"^--override-input date: .* has no such input$"):
        nix.eval_json(f"path:{options_flake / 'flake'}", "fromInput")


def test_max_jobs_reaches_the_build(options_flake: Path) -> None:
    flake = f"path:{options_flake / 'flake'}"
    nix.configure(nix.NixArgs(max_jobs="0"))
    with pytest.raises(NixError, match="unable to start any build"):
        nix.build_systems(flake, ["h"])
    nix.configure(nix.NixArgs(max_jobs="1"))
    [path] = nix.build_systems(flake, ["h"]).values()
    assert Path(path).read_text() == "h\n"
