"""`fleet status` and `fleet report` show the alerts of the fleet's Prometheus per host,
asked of the monitoring host through its ssh connection, as an operator runs them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.fleetrun import assert_safe, run_fleet, set_release

pytestmark = [pytest.mark.lab]

HOSTS = ["lab1", "lab2", "lab3", "lab4"]  # lab-web, lab-web, HAProxy, monitoring
RESTORE = "systemctl reset-failed lab-web; systemctl start lab-web"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Four hosts beside the session's lab: two run lab-web, one HAProxy, one monitors."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEET_LAB_INSTANCE", str((Lab.from_env().instance + 56) % 255))
        instance = Lab.from_env()
        ops.down(instance)
        try:
            ops.up(instance, 4, lambda _m: None, balancers=1, monitoring=True)
            set_release(instance, "0")
            code, _, err = run_fleet(instance, "deploy")
            assert code == 0, err
            yield instance
        finally:
            ops.down(instance)


def unit_alerts(status: dict[str, Any]) -> dict[str, set[str]]:
    """Host -> the states of its FleetUnitFailed alerts."""
    return {
        name: {a["state"] for a in status[name]["alerts"] if a["name"] == "FleetUnitFailed"}
        for name in HOSTS
    }


def wait_for_status(lab: Lab, done: Any, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _, status, err = run_fleet(lab, "status")
        assert status is not None, err
        assert status["_alertsError"] is None, status["_alertsError"]
        if done(status):
            return status  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, status
        time.sleep(2)


def test_a_failed_unit_shows_in_status_on_its_host_alone(lab: Lab, tmp_path: Path) -> None:
    code, status, err = run_fleet(lab, "status")
    assert code == 0, err
    assert set(status) == {*HOSTS, "_fleetAlerts", "_alertsError"}
    assert not any(unit_alerts(status).values()), status
    # lab-web killed outside any deploy: its unit fails (Restart=no). The main process
    # alone: a container refuses systemd's kill of a whole cgroup.
    kill = ["systemctl", "kill", "--kill-who=main", "-s", "KILL", "lab-web"]
    try:
        code, _, err = run_fleet(lab, "exec", "lab2", "--", *kill)
        assert code == 0, err
        status = wait_for_status(lab, lambda s: unit_alerts(s)["lab2"])
        states = unit_alerts(status)
        assert {h for h, s in states.items() if s} == {"lab2"}
        assert states["lab2"] <= {"pending", "firing"}
        [unit] = [a for a in status["lab2"]["alerts"] if a["name"] == "FleetUnitFailed"]
        assert unit["severity"] == "warning" and "lab2" in unit["summary"]
        assert status["lab2"]["failedUnits"] == ["lab-web.service"]
        # The page shows it in lab2's row, from the same kind of query.
        page = tmp_path / "report.html"
        code, _, err = run_fleet(lab, "report", "--html", str(page))
        assert code == 4, err  # a failed unit breaks the invariant
        row = page.read_text().split('<tr data-host="lab2">', 1)[1].split("</tr>", 1)[0]
        assert "FleetUnitFailed" in row
    finally:
        code, _, err = run_fleet(lab, "exec", "lab2", "--", "sh", "-c", RESTORE)
        assert code == 0, err
    # Mended: the alert leaves status.
    wait_for_status(lab, lambda s: not any(unit_alerts(s).values()))
    assert_safe(lab)
