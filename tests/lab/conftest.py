import pytest

from tests.lab.fleetrun import assert_safe, set_release


@pytest.fixture()
def safety_check(lab):
    """The product's invariant before and after a test that changes hosts."""
    assert_safe(lab)
    yield
    set_release(lab, "0")
    assert_safe(lab)
