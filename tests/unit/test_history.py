"""Merging release records and choosing rollback targets: pure logic."""

from __future__ import annotations

import itertools

import pytest

from fleet.errors import UsageError
from fleet.history import merge, rollback_target
from fleet.hostops import GenerationInfo, HostState
from fleet.models import Generation


def record(
    release, host, result="deployed", time="2026-01-01T00:00:00+00:00", previous=1, action="deploy"
):
    return {
        "release": release,
        "host": host,
        "result": result,
        "time": time,
        "action": action,
        "operator": "alice@laptop",
        "previous": {"number": previous, "path": f"/nix/store/{previous}"},
        "new": {"number": previous + 1, "path": f"/nix/store/{previous + 1}"},
    }


RECORDS = {
    "a": [
        record("r1", "a", time="2026-01-01T00:00:01+00:00"),
        record("r2", "a", result="rolled-back", time="2026-01-02T00:00:00+00:00", previous=2),
        record("r2", "a", result="rolled-back", time="2026-01-02T00:00:09+00:00", previous=2),
    ],
    "b": [
        record("r1", "b", time="2026-01-01T00:00:00+00:00"),
        record("r2", "b", time="2026-01-02T00:00:01+00:00", previous=2),
    ],
}


def test_merge_is_newest_first_and_counts_results():
    entries = merge(RECORDS)
    assert [e.id for e in entries] == ["r2", "r1"]
    assert entries[1].result == "deployed" and entries[1].time == "2026-01-01T00:00:00+00:00"
    assert entries[0].result == "1 deployed, 1 rolled-back"


def test_merge_does_not_depend_on_which_host_answered_first():
    results = {
        tuple(e.as_json().items().__repr__() for e in merge(dict(order)))
        for order in itertools.permutations(RECORDS.items())
    }
    assert len(results) == 1


def state(current, numbers):
    return HostState(
        current=current,
        running=f"/nix/store/{current}",
        booted=None,
        generations=tuple(GenerationInfo(n, 0, f"/nix/store/{n}") for n in numbers),
    )


def test_default_target_is_the_generation_before_the_current_one():
    assert rollback_target("a", state(5, [1, 3, 5, 6]), []) == Generation(3, "/nix/store/3")


def test_to_a_deleted_generation_is_refused():
    with pytest.raises(UsageError, match=r"a: generation #2 .* no longer exists \(it has #1, #3\)"):
        rollback_target("a", state(3, [1, 3]), [], to=2)


def test_release_target_is_what_ran_before_that_release():
    records = [record("r1", "a", previous=1), record("r2", "a", previous=2)]
    assert rollback_target("a", state(3, [1, 2, 3]), records, release="r2") == Generation(
        2, "/nix/store/2"
    )
    assert rollback_target("a", state(3, [1, 2, 3]), records, release="r9") is None


def test_nothing_before_the_first_generation():
    with pytest.raises(UsageError, match="no generation before its current one"):
        rollback_target("a", state(1, [1]), [])


def test_a_host_cannot_name_an_option_as_its_system():
    """Host answers reach nix-copy-closure's command line on a rollback: store paths only."""
    from fleet.hostops import parse_state

    good = "/nix/store/" + "a" * 32 + "-nixos-system-web1-25.11"
    state = parse_state({
        "current": 2,
        "running": "--option build-hook evil",
        "generations": [[1, 0, good], [2, 0, "-oProxyCommand=x"], [3, 0, "/etc/passwd"]],
    })  # fmt: skip
    assert state.running is None
    assert [g.path for g in state.generations] == [good]


def test_records_of_another_shape_are_passed_over():
    """One host's odd record must not break history or rollback --release for the fleet."""
    odd = [
        {"release": "r1", "action": "deploy", "result": "deployed", "previous": "x"},
        {"release": 5, "result": []},
        {"release": "r1"},
    ]
    entries = merge({"a": odd, "b": [{"release": "r1", "result": "deployed", "time": "t"}]})
    assert [e.id for e in entries] == ["r1"]
    assert entries[0].result  # a summary, whatever the odd records hold
    assert rollback_target("a", state(2, [1, 2]), odd, release="r1") is None


def test_timings_in_the_records_leave_history_as_it_was():
    """Records carry the phases' timings for the hosts' metrics; history does not show them."""
    timed = {
        host: [r | {"timings": {"connect": 0.1, "health": 2.5}} for r in records]
        for host, records in RECORDS.items()
    }
    assert [e.as_json() for e in merge(timed)] == [e.as_json() for e in merge(RECORDS)]
