"""The NixOS VM tests' definitions (tests/vm), read as text: they cannot run here, so what
would make them fail or flake in our users' CI is checked where it can be."""

from __future__ import annotations

import re

from tests.nix.conftest import REPO

VM = (REPO / "tests" / "vm" / "default.nix").read_text()


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
