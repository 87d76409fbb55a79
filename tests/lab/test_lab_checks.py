"""A generation is proven by its own checks (its manifest), not today's declaration's, and
the clocks add up: a service that warms up longer than the confirm timeout is deployed."""

from __future__ import annotations

import pytest

from tests.lab.fleetrun import assert_safe, host_states, results, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]

WEB = ["lab-web-health"]
BOTH = ["lab-extra", "lab-web-health"]


def test_a_release_adding_a_failing_service_is_rolled_back_by_the_old_checks(lab):
    """The restored generation never had the new service: it is proven without its check,
    and the rollout ends rolled back (exit 3), not 'unhealthy after the rollback' (4)."""
    before = {name: state.running for name, state in host_states(lab).items()}
    set_release(lab, "x1", extra="failing")
    code, report, err = run_fleet(lab, "deploy", "--canary", "0", "--health-timeout", "4")
    assert code == 3, err
    for host in report["hosts"].values():
        assert host["result"] == "rolled-back", host
        assert host["checks"] == WEB, host
    assert {name: state.running for name, state in host_states(lab).items()} == before
    assert_safe(lab)


def test_rollback_to_a_generation_without_a_service_of_today(lab):
    set_release(lab, "x2")
    code, report, err = run_fleet(lab, "deploy", "--canary", "0")
    assert code == 0, err
    set_release(lab, "x3", extra="passing")
    code, report, err = run_fleet(lab, "deploy", "--canary", "0")
    assert code == 0, err
    assert {tuple(sorted(h["checks"])) for h in report["hosts"].values()} == {tuple(BOTH)}
    # Today's declaration still has lab-extra; the generation rolled back to does not.
    code, report, err = run_fleet(lab, "rollback", "--yes")
    assert code == 0, err
    assert set(results(report).values()) == {"deployed"}
    assert all(h["checks"] == WEB for h in report["hosts"].values()), report
    code, status, err = run_fleet(lab, "status")
    assert code == 0, (err, status)
    code, checked, err = run_fleet(lab, "health")
    assert code == 0, (err, checked)
    assert_safe(lab)


def test_a_service_warming_up_past_the_confirm_timeout_is_deployed(lab):
    """Healthy 4 s after it starts, with a confirm timeout of 2 s: the dead-man switch
    counts from activation over health and confirm timeouts, so it waits."""
    set_release(lab, "x4", healthy_after=4)
    code, report, err = run_fleet(
        lab, "deploy", "lab1", "--health-timeout", "20", "--confirm-timeout", "2"
    )
    assert code == 0, err
    assert results(report) == {"lab1": "deployed"}
    assert report["hosts"]["lab1"]["timings"]["health"] > 2
    assert_safe(lab)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--health-timeout", "2"], "check 'lab-web-health' waits up to 2 s"),
        (["--confirm-timeout", "1"], "Invalid value for '--confirm-timeout'"),
    ],
)
def test_timeouts_that_cannot_add_up_are_refused(lab, args, words):
    before = host_states(lab)
    code, _, err = run_fleet(lab, "deploy", *args)
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert host_states(lab) == before
