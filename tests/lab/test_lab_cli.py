"""Bad input to `fleet lab`: one line on stderr, exit code 2, nothing half made."""

from __future__ import annotations

import pytest

from fleet.cli import main
from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.test_lab_lifecycle import leftovers, other_instance

pytestmark = pytest.mark.lab


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def assert_usage_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fleet")
    for word in words:
        assert word in lines[0]


def test_status_and_flake(lab, capsys):
    code, out, _ = run(capsys, "lab", "status")
    assert code == 0
    assert "lab1" in out and lab.host(1).address in out
    code, out, _ = run(capsys, "lab", "flake")
    assert code == 0 and out.strip() == str(lab.flake)


def test_unknown_host(lab, capsys):
    code, _, err = run(capsys, "lab", "fault", "nosuch", "partition")
    assert_usage_error(code, err, "nosuch", "lab1")


def test_unknown_fault_action(lab, capsys):
    code, _, err = run(capsys, "lab", "fault", "lab1", "explode")
    assert_usage_error(code, err, "explode")
    assert all(s.link_up and s.ssh for s in ops.status(lab))


def test_other_size_than_the_running_lab(lab, capsys):
    code, _, err = run(capsys, "lab", "up", "--hosts", "5")
    assert_usage_error(code, err, "3 hosts")
    assert len(ops.status(lab)) == 3


def test_bad_release_version(lab, capsys):
    code, _, err = run(capsys, "lab", "release", "--version", "1 2;rm")
    assert_usage_error(code, err, "release version")


@pytest.fixture()
def unused_lab(monkeypatch) -> Lab:
    monkeypatch.setenv("FLEET_LAB_INSTANCE", other_instance(200))
    lab = Lab.from_env()
    assert leftovers(lab) == []
    yield lab
    assert leftovers(lab) == []


def test_zero_hosts(unused_lab, capsys):
    code, _, err = run(capsys, "lab", "up", "--hosts", "0")
    assert_usage_error(code, err, "--hosts")


def test_fault_without_a_lab(unused_lab, capsys):
    code, _, err = run(capsys, "lab", "fault", "lab1", "crash")
    assert_usage_error(code, err, "no lab is up")


@pytest.mark.parametrize("argv", [["lab", "up"], ["lab", "down"], ["lab", "fault", "lab1", "heal"]])
def test_not_root(unused_lab, capsys, monkeypatch, argv):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, "must run as root")
