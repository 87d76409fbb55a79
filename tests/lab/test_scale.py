"""Bounded work on real lab hosts: never more hosts connected at once than --parallel,
whatever the command, and as few ssh handshakes per host as the protocol needs."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.fleetrun import results, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


@contextmanager
def connected_hosts(lab: Lab) -> Iterator[list[set[str]]]:
    """Samples, every few milliseconds, the lab hosts this machine holds an established
    ssh connection to (as the kernel sees them), but for the connections already there
    when it starts (the test session's own, to read the hosts)."""
    addresses = {e.address: e.name for e in ops.endpoints(lab)}
    samples: list[set[str]] = []
    stop = threading.Event()

    def connections() -> set[tuple[str, str]]:
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", "( dport = :22 )"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        return {(line.split()[-2], line.split()[-1]) for line in out.splitlines() if line}

    before = connections()

    def sample() -> None:
        while not stop.is_set():
            peers = {peer.rsplit(":", 1)[0] for _local, peer in connections() - before}
            samples.append({addresses[a] for a in peers if a in addresses})
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def test_exec_and_status_connect_to_no_more_hosts_at_once_than_parallel(lab):
    with connected_hosts(lab) as samples:
        code, report, err = run_fleet(lab, "exec", "--parallel", "1", "--", "sleep", "1")
        assert code == 0, err
        assert set(report["hosts"]) == {"lab1", "lab2", "lab3"}
        code, _, err = run_fleet(lab, "status", "--parallel", "1")
        assert code == 0, err
    assert len(samples) > 50
    assert max(len(s) for s in samples) == 1, [s for s in samples if len(s) > 1][:5]
    assert set().union(*samples) == {"lab1", "lab2", "lab3"}


def test_a_deploy_connects_to_parallel_hosts_at_once_with_two_handshakes_each(lab):
    set_release(lab, "scale1")
    with connected_hosts(lab) as samples:
        code, report, err = run_fleet(lab, "deploy", "--parallel", "1")
    assert code == 0, err
    assert set(results(report).values()) == {"deployed"}
    # Its master, and the new connection that proves the new system takes one.
    assert report["ssh"] == {
        "handshakes": {"lab1": 2, "lab2": 2, "lab3": 2},
        "peakConnectedHosts": 1,
    }
    assert max(len(s) for s in samples) == 1, [s for s in samples if len(s) > 1][:5]
