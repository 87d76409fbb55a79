"""Every step boundary of every change, once, each with one fault (the faults take turns);
`scripts/fault-matrix.py` runs every fault at every boundary."""

from __future__ import annotations

import pytest

from tests.lab.faultmatrix import ci_cases, run_case

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


@pytest.mark.parametrize("case", ci_cases(), ids=lambda c: c.id)
def test_boundary(lab, case):
    run_case(lab, case)
