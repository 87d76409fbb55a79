"""The Nix options of the command line: the argv each Nix command gets, and hostile values
refused (exit 2, one line naming the option) before anything runs."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import cli, config, flows, nix, process
from fleet.errors import DeclarationError, UsageError
from fleet.inventory import parse
from fleet.ssh import Endpoint, SshConfig, Transport
from tests.unit.test_inventory import EXAMPLE


@pytest.fixture(autouse=True)
def fresh_args() -> Iterator[None]:
    """Every test starts, and leaves the module, with no options (the CLI sets them)."""
    nix.configure(nix.NixArgs())
    yield
    nix.configure(nix.NixArgs())


def test_no_options_only_keep_the_flakes_own_config_out() -> None:
    args = nix.NixArgs()
    assert args.flake_argv() == ["--option", "accept-flake-config", "false"]
    assert args.build_argv() == []


def test_flake_commands_get_settings_overrides_and_the_trace_in_order() -> None:
    args = nix.NixArgs(
        options=(("eval-cache", "false"), ("accept-flake-config", "true")),
        override_inputs=(("nixpkgs", "github:NixOS/nixpkgs/nixos-24.05"), ("a/b", "path:/x")),
        show_trace=True,
        max_jobs="4",
        builders="ssh://b x86_64-linux",
    )
    assert args.flake_argv() == [
        "--option", "accept-flake-config", "false",  # the operator's own comes later: it wins
        "--option", "eval-cache", "false",
        "--option", "accept-flake-config", "true",
        "--override-input", "nixpkgs", "github:NixOS/nixpkgs/nixos-24.05",
        "--override-input", "a/b", "path:/x",
        "--show-trace",
    ]  # fmt: skip


def test_builds_get_settings_max_jobs_and_builders_but_no_flake_flags() -> None:
    args = nix.NixArgs(
        options=(("sandbox", "relaxed"),),
        override_inputs=(("nixpkgs", "path:/x"),),
        show_trace=True,
        max_jobs="0",
        builders="ssh://b x86_64-linux - 4",
    )
    assert args.build_argv() == [
        "--option", "sandbox", "relaxed",
        "--max-jobs", "0",
        "--option", "builders", "ssh://b x86_64-linux - 4",
    ]  # fmt: skip
    nix.configure(args)
    assert nix.realise_argv(["/nix/store/b.drv", "/nix/store/a.drv", "/nix/store/a.drv"]) == [
        "nix-store", "--option", "sandbox", "relaxed", "--max-jobs", "0",
        "--option", "builders", "ssh://b x86_64-linux - 4",
        "--realise", "/nix/store/a.drv", "/nix/store/b.drv",
    ]  # fmt: skip
    # The lab's own settings come first: the operator's win.
    assert nix.realise_argv(["/nix/store/a.drv"], {"substituters": ""})[1:4] == [
        "--option", "substituters", "",
    ]  # fmt: skip


def test_an_empty_builders_setting_is_passed_as_such() -> None:
    assert nix.NixArgs(builders="").build_argv() == ["--option", "builders", ""]


def test_substitute_on_destination_is_nix_copy_closures_use_substitutes() -> None:
    assert nix.copy_argv("192.0.2.1", ["/nix/store/a"]) == [
        "nix-copy-closure", "--to", "192.0.2.1", "/nix/store/a",
    ]  # fmt: skip
    assert nix.copy_argv("192.0.2.1", ["/nix/store/a"], substitute=True) == [
        "nix-copy-closure", "--to", "--use-substitutes", "192.0.2.1", "/nix/store/a",
    ]  # fmt: skip


def test_a_build_hosts_realise_reaches_its_shell_as_the_argument_list() -> None:
    """Whatever a value holds, the build host's shell gets each argument as one word."""
    nix.configure(nix.NixArgs(options=(("extra-x", "$(touch /tmp/x); `id` 'q' \"d\""),),
                              builders="ssh://b x86_64-linux"))  # fmt: skip
    argv = nix.realise_argv(["/nix/store/a.drv"])
    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("b", "192.0.2.9"))
        ssh = remote.ssh_argv(argv)
    assert ssh[-3:-1] == ["--", "192.0.2.9"]
    assert shlex.split(ssh[-1]) == argv


HOSTILE_NAMES = ["", "-x", "--store", "a b", "a\nb", "a\0b", "a=b", "a;b", "$(id)", "é", "a_b"]
NEWLINES = ["a\nb", "a\rb", "a\0b", "\n"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_an_option_name_that_is_not_a_setting_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match=r"^--option ") as error:
        nix.NixArgs(options=(("sandbox", "true"), (name, "x")))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", NEWLINES)
def test_an_option_value_with_a_newline_or_nul_is_refused(value: str) -> None:
    with pytest.raises(UsageError, match=r"^--option sandbox: .*newline or NUL") as error:
        nix.NixArgs(options=(("sandbox", value),))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["", "-x", "--store /x", " x", "$(id)"])
def test_an_option_value_is_otherwise_taken_as_typed(value: str) -> None:
    """Nix takes --option's two arguments verbatim, whatever they start with."""
    assert nix.NixArgs(options=(("n", value),)).build_argv() == ["--option", "n", value]


@pytest.mark.parametrize("path", [*HOSTILE_NAMES[:-1], "/a", "a b/c", "a:b", "a.b"])
def test_an_input_that_is_no_input_path_is_refused(path: str) -> None:
    with pytest.raises(UsageError, match=r"^--override-input ") as error:
        nix.NixArgs(override_inputs=((path, "path:/x"),))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("ref", ["", "-x", "--store", *NEWLINES])
def test_a_ref_that_is_empty_an_option_or_multiline_is_refused(ref: str) -> None:
    with pytest.raises(UsageError, match=r"^--override-input nixpkgs[: ]") as error:
        nix.NixArgs(override_inputs=(("nixpkgs", ref),))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("jobs", ["", "-1", "1e3", "a", " 1", "1\n", "auto ", "1234567", "--"])
def test_max_jobs_is_a_number_or_auto(jobs: str) -> None:
    with pytest.raises(UsageError, match=r"^--max-jobs ") as error:
        nix.NixArgs(max_jobs=jobs)
    assert "\n" not in str(error.value)
    assert nix.NixArgs(max_jobs="auto").build_argv() == ["--max-jobs", "auto"]


@pytest.mark.parametrize("spec", NEWLINES)
def test_builders_with_a_newline_or_nul_are_refused(spec: str) -> None:
    with pytest.raises(UsageError, match=r"^--builders: "):
        nix.NixArgs(builders=spec)


def session(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, user: dict[str, str]) -> flows.Session:
    (tmp_path / "fleet").mkdir(parents=True)
    (tmp_path / "fleet" / "config.yaml").write_text(json.dumps(user))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    checkout = config.Config({"knownHostsFile": "/checkout/known_hosts"}, ())
    return flows.Session("flake", checkout, parse(EXAMPLE, "example"))


def test_a_build_host_of_the_inventory_is_reached_as_a_deploy_reaches_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    found = flows.resolve_build_host(session(monkeypatch, tmp_path, {}), "web1")
    assert found.in_inventory and found.describe() == "web1"
    assert found.endpoint == Endpoint(
        "web1", "192.0.2.11", 22, "root", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA=="
    )


def test_an_address_is_verified_against_the_operators_own_known_hosts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    own = {"knownHostsFile": "/operator/known_hosts"}
    found = flows.resolve_build_host(session(monkeypatch, tmp_path, own), "nix@builder.example")
    assert not found.in_inventory and found.describe() == "nix@builder.example"
    assert found.endpoint == Endpoint("nix@builder.example", "builder.example", 22, "nix", None)
    assert found.ssh.known_hosts_file == Path("/operator/known_hosts")  # not the checkout's
    found = flows.resolve_build_host(session(monkeypatch, tmp_path / "2", {}), "fe80::1")
    assert found.endpoint.user == "root" and found.ssh.known_hosts_file is None


HOSTILE_HOSTS = [
    "", "-oProxyCommand=id", "-J", "ssh://builder", "ssh://builder?remote-program=x",
    "builder -p 2", "builder\n", "a\0b", "root@", "@builder", "a@b@c", "builder:2222",
    "bu/ilder", "$(id)", "builder;id", "Root@builder", "[::1]",
]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE_HOSTS)
def test_a_build_host_must_be_one_ssh_destination(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str
) -> None:
    with pytest.raises(UsageError, match=r"^--build-host ") as error:
        flows.resolve_build_host(session(monkeypatch, tmp_path, {}), text)
    assert "\n" not in str(error.value)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--option", "-x", "1", "status"], "--option '-x'"),
        (["--option", "sandbox", "a\nb", "status"], "--option sandbox"),
        (["--override-input", "a b", "path:/x", "status"], "--override-input 'a b'"),
        (["--override-input", "nixpkgs", "-x", "status"], "--override-input nixpkgs"),
        (["deploy", "--max-jobs", "-1"], "--max-jobs"),
        (["deploy", "--builders", "a\0b"], "--builders"),
    ],
)
def test_the_command_line_refuses_before_the_flake_is_even_read(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, err = run_cli(capsys, "--flake", "/nonexistent/flake", *argv)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"fleet: {named}"), line


@pytest.mark.skipif(shutil.which("nix") is None, reason="needs nix")
def test_a_bad_build_host_is_refused_before_any_build(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NIX_CONFIG", "substituters =")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    fleet = json.dumps(json.dumps(EXAMPLE))
    (tmp_path / "flake.nix").write_text(
        f"{{ outputs = {{ self }}: {{ fleet = builtins.fromJSON {fleet};\n"
        '  nixosConfigurations = throw "never evaluated"; }; }\n'
    )
    code, err = run_cli(capsys, "--flake", f"path:{tmp_path}", "deploy", "--build-host", "-oX=y")
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("fleet: --build-host '-oX=y': expected"), line


@pytest.mark.parametrize("number", ["inf", "-inf", "nan"])
def test_a_number_json_cannot_hold_is_a_declaration_error(
    number: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nix writes a float out of range as a bare inf: one line, exit 2, not a traceback."""
    answer = process.Result(("nix",), 0, f'{{"healthTimeout":{number}}}\n', "")
    monkeypatch.setattr(nix, "evaluate", lambda *_args: answer)
    with pytest.raises(DeclarationError) as error:
        nix.eval_json("/flake", "fleet")
    assert str(error.value).startswith("nix eval /flake#fleet: not JSON")
    assert "\n" not in str(error.value) and error.value.exit_code == 2
