"""A --flake that cannot be the fleet's is one line and exit 2, the same for every command
that reads the fleet: a folder that is not there or holds no flake.nix is refused before
Nix is asked; a flake without a "fleet" output is named as such; a reference Nix fetches is
Nix's to judge, its failure one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleet import flakeref
from fleet.cli import main

NO_OUTPUT = 'the flake has no "fleet" output (a fleet flake\'s outputs come from fleet.lib.mkFleet)'

# Every command that takes the flake, with what it needs to get as far as reading it.
COMMANDS = [
    ["status"],
    ["deploy"],
    ["rollback", "--yes"],
    ["history"],
    ["generations"],
    ["health"],
    ["diff"],
    ["gc", "--keep", "2"],
    ["drain", "web1"],
    ["undrain", "web1"],
    ["exec", "--", "true"],
    ["report", "--html", "{tmp}/page.html"],
    ["recover"],
    ["traffic"],
]
needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="needs Nix")


@pytest.fixture()
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder that is its own repository's root (Nix looks no further up for
    flake.nix), and no operator config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / ".git").mkdir()
    return tmp_path


def fleet(
    capsys: pytest.CaptureFixture[str], tmp: Path, flake: str, *argv: str
) -> tuple[int, str, str]:
    args = ["--flake", flake, *(a.format(tmp=tmp) for a in argv)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_every_command_refuses_a_missing_folder(
    here: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert fleet(capsys, here, "./nope", *argv) == (
        2,
        "",
        "fleet: --flake ./nope: no such folder\n",
    )


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("./empty", "no flake.nix in that folder nor in one above it"),
        ("path:./empty", "no flake.nix in that folder"),
        ("path:./nope", "no such folder"),
        ("path:./empty/file", "not a folder (name the folder that holds flake.nix)"),
        ("git+file:./nope", "no such folder"),
        ("git+file:./empty?dir=sub", "no flake.nix in its folder sub"),
        ("./empty#fleet", 'no #fragment: fleet reads the flake\'s "fleet" output'),
    ],
)
def test_a_folder_that_is_no_flake_is_one_line(
    here: Path, capsys: pytest.CaptureFixture[str], ref: str, why: str
) -> None:
    (here / "empty/sub").mkdir(parents=True)
    (here / "empty/file").write_text("")
    code, out, err = fleet(capsys, here, ref, "--json", "status")
    assert (code, err) == (2, f"fleet: --flake {ref}: {why}\n")
    assert json.loads(out) == {"error": f"--flake {ref}: {why}", "exitCode": 2}


def test_the_default_and_the_configs_flake_are_named_as_such(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["status"])
    assert capsys.readouterr().err == (
        "fleet: --flake . (the default): no flake.nix in that folder nor in one above it\n"
    )
    config = here / "xdg/fleet/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("flake: ./nope\n")
    with pytest.raises(SystemExit):
        main(["status"])
    assert capsys.readouterr().err == f"fleet: flake ./nope (from {config}): no such folder\n"


def test_a_path_without_flake_nix_is_the_flake_above_as_nix_has_it(here: Path) -> None:
    (here / "fleet/hosts").mkdir(parents=True)
    (here / "fleet/flake.nix").write_text("{ outputs = { self }: { }; }\n")
    flakeref.check("./fleet/hosts", "--flake ./fleet/hosts")
    assert flakeref.root("./fleet/hosts") == here / "fleet"  # where fleet.yaml is read
    assert flakeref.root("path:./fleet/hosts") == Path("fleet/hosts")


@pytest.mark.parametrize(
    ("ref", "folder"),
    [
        (".", "."),
        ("./fleet", "fleet"),
        ("fleet/", "fleet"),
        ("/srv/fleet?dir=x", "/srv/fleet"),
        ("path:/srv/fleet", "/srv/fleet"),
        ("git+file:///srv/fleet?ref=main", "/srv/fleet"),
        # Nix's own: a bare name (with /ref) is a registry entry; a URL is fetched.
        ("fleet", None),
        ("fleet/main", None),
        ("flake:fleet", None),
        ("github:example/fleet", None),
        ("git+https://example.org/fleet", None),
    ],
)
def test_which_references_are_local_folders(ref: str, folder: str | None) -> None:
    found = flakeref.local(ref)
    assert (str(found.folder) if found else None) == folder


def test_a_registry_name_that_is_also_a_folder_gets_a_hint(here: Path) -> None:
    (here / "fleet").mkdir()
    assert flakeref.registry_hint("fleet") == (
        " (a bare name is a flake registry entry to Nix; the folder is ./fleet)"
    )
    assert flakeref.registry_hint("other") == ""
    assert flakeref.registry_hint("./fleet") == ""


@needs_nix
def test_a_flake_without_a_fleet_output_is_named_as_such(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (here / "other").mkdir()
    (here / "other/flake.nix").write_text("{ outputs = { self }: { packages = { }; }; }\n")
    code, out, err = fleet(capsys, here, "path:./other", "deploy")
    assert (code, out, err) == (2, "", f"fleet: --flake path:./other: {NO_OUTPUT}\n")


@needs_nix
def test_a_reference_nix_fetches_fails_as_nix_says_in_one_line(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = fleet(capsys, here, "git+https://example.invalid/fleet", "status")
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("fleet: nix eval git+https://example.invalid/fleet#fleet: error:")
