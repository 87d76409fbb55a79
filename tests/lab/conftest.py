import pytest

from tests.lab.fleetrun import RESET, assert_safe, run_fleet, set_release


@pytest.fixture()
def safety_check(lab):
    """The product's invariant before and after a test that changes hosts."""
    assert_safe(lab)
    yield
    set_release(lab, "0")
    assert_safe(lab)


@pytest.fixture()
def safe(lab):
    """The invariant before and after a test of a module's own lab, which then goes back to
    release "0" through a deploy (the next test starts where every host began)."""
    assert_safe(lab)
    yield
    set_release(lab, "0")
    # One wave, no drain, no analysis: a way back, not what is tested (assert_safe after
    # it still proves every instance back in rotation).
    code, _, err = run_fleet(lab, "deploy", *RESET)
    assert code == 0, err
    assert_safe(lab)
