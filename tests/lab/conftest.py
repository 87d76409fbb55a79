import pytest

from tests.lab.fleetrun import assert_safe, run_fleet, set_release


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
    code, _, err = run_fleet(lab, "deploy")
    assert code == 0, err
    assert_safe(lab)
