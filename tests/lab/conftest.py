from collections.abc import Iterator

import pytest

from fleet.lab.layout import Lab
from tests.lab.fleetrun import assert_safe, own_lab, set_release


@pytest.fixture()
def safety_check(lab):
    """The product's invariant before and after a test that changes hosts."""
    assert_safe(lab)
    yield
    set_release(lab, "0")
    assert_safe(lab)


@pytest.fixture(scope="session")
def monitoring_lab() -> Iterator[Lab]:
    """Four hosts beside the session's lab, for the monitoring tests and then the canary
    analysis tests (test_monitoring_analysis.py, which run after them and would leave a
    rollback alert): two run lab-web, one HAProxy, one monitors."""
    with own_lab(52, 4, balancers=1, monitoring=True) as instance:
        yield instance
