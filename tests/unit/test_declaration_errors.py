"""A declaration that does not evaluate: every problem Nix reports reaches the operator in
one line, exit 2, a JSON error document with --json, Nix's trace with --show-trace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.process import Result

pytestmark = pytest.mark.skipif(shutil.which("nix") is None, reason="needs Nix")

TWO_PROBLEMS = """{
  outputs = { self }: {
    fleet = throw ''
      fleet: the declaration has 2 problem(s):
      - service "a": first problem
      - service "b": second problem'';
  };
}
"""


def fleet(flake: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args[:-1], "--flake", f"path:{flake}", args[-1]],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_error_text_keeps_every_problem_and_drops_the_trace_hint() -> None:
    stderr = (
        "warning: Git tree is dirty\n"
        "error: fleet: the declaration has 2 problem(s):\n"
        '       - service "a": first\n'
        '       - service "b": second\n'
        "(use '--show-trace' to show detailed location information)\n"
    )
    text = Result(("nix",), 1, "", stderr).error_text()
    assert text == (
        'error: fleet: the declaration has 2 problem(s): - service "a": first - service "b": second'
    )


def test_every_problem_in_one_line_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(TWO_PROBLEMS)
    proc = fleet(tmp_path, "status")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "first problem" in line and "second problem" in line
    assert proc.stdout == ""


def test_json_gets_an_error_document(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(TWO_PROBLEMS)
    proc = fleet(tmp_path, "--json", "deploy")
    assert proc.returncode == 2
    document = json.loads(proc.stdout)
    assert document["exitCode"] == 2 and "second problem" in document["error"]


def test_show_trace_prints_what_nix_prints(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(TWO_PROBLEMS)
    proc = fleet(tmp_path, "--show-trace", "status")
    assert proc.returncode == 2
    assert '       - service "b": second problem' in proc.stderr.splitlines()


def test_an_untracked_file_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(
        "{ outputs = { self }: { fleet = import ./hosts.nix; }; }\n"
    )
    (tmp_path / "hosts.nix").write_text("{ }\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "flake.nix"], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "--flake", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert "git add" in proc.stderr, proc.stderr


TRAFFIC_FLEET = """{ ... }: {
  hosts.app1.address = "192.0.2.11";
  services.api = {
    command = [ "/bin/api" ];
    ports = [ 8080 ];
    ingress.port = 80;
  };
  services.web = {
    command = [ "/bin/web" ];
    ports = [ 8081 ];
    ingress.port = 80;
  };
}
"""


def test_a_fleets_traffic_problems_reach_the_operator_in_one_line(tmp_path: Path) -> None:
    """The fleet module's own problems, from a flake, as the tool reports them."""
    lib = Path.home() / ".cache" / "fleet" / "nixpkgs-lib" / "lib"
    if not (lib / "default.nix").is_file():
        pytest.skip(f"nixpkgs lib not found at {lib}")
    repo = Path(__file__).parents[2]
    shutil.copytree(lib, tmp_path / "lib")
    shutil.copytree(repo / "modules", tmp_path / "modules")
    shutil.copytree(repo / "fleet" / "nix", tmp_path / "fleet" / "nix")
    (tmp_path / "fleet.nix").write_text(TRAFFIC_FLEET)
    (tmp_path / "flake.nix").write_text(
        "{ outputs = { self }: { fleet = (import ./modules/eval.nix { lib = import ./lib; } "
        "{ modules = [ ./fleet.nix ]; }).config.build.inventory; }; }\n"
    )
    proc = fleet(tmp_path, "status")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "the declaration has 2 problem(s)" in line
    assert 'traffic: services "api" and "web" have an ingress, but no host carries the tag' in line
    assert 'traffic: services "api" and "web" both take ingress.port 80' in line
