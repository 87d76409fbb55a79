"""The transport's bounds: hosts connected at once, and connections set up at once.

Driven through ``Remote.session`` with a stand-in for the master's start that creates the
control socket as a master would, so the budget sees what it sees in a run.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from fleet.errors import SshError
from fleet.ssh import Endpoint, Pacing, Remote, SshConfig, Transport


class Watch:
    """Counts masters alive and handshakes in progress, and their peaks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.masters: set[str] = set()
        self.peak_masters = 0
        self.shaking = 0
        self.peak_shaking = 0

    def connect(self, remote: Remote) -> None:
        """What starting a host's master does: a handshake, then its socket."""
        with self.lock:
            self.shaking += 1
            self.peak_shaking = max(self.peak_shaking, self.shaking)
        time.sleep(0.01)
        with self.lock:
            self.shaking -= 1
            self.masters.add(remote.name)
            self.peak_masters = max(self.peak_masters, len(self.masters))
        remote.control_path.touch()

    def disconnect(self, remote: Remote) -> None:
        with self.lock:
            self.masters.discard(remote.name)
        remote.control_path.unlink(missing_ok=True)


W = TypeVar("W", bound=Watch)


def watching(monkeypatch: pytest.MonkeyPatch, seen: W) -> W:
    """Masters started and stopped by ``seen`` instead of ssh."""
    monkeypatch.setattr(Remote, "disconnect", lambda remote: seen.disconnect(remote))
    monkeypatch.setattr(Remote, "_start_master", lambda remote, _timeout: seen.connect(remote))
    return seen


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    return watching(monkeypatch, Watch())


def command(watch: Watch, remote: Remote) -> None:
    """One command on a host, as ``Remote.run`` holds it: over the master, always."""
    with remote.session():
        assert Path(remote.control_path).exists()
        with watch.lock:
            assert remote.name in watch.masters
        time.sleep(0.002)


def test_no_more_hosts_are_connected_at_once_than_the_budget(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=3, max_handshakes=2) as transport:
        remotes = [transport.remote(Endpoint(f"h{i}", f"192.0.2.{i}")) for i in range(20)]
        work = [r for r in remotes for _ in range(3)]  # three commands per host
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda r: command(watch, r), work))
        assert transport.peak_open <= 3
    assert watch.peak_masters <= 3
    assert watch.peak_shaking <= 2
    # Each host connected once per stay in the budget: never two masters for one host.
    assert all(n >= 1 for n in transport.handshakes.values())
    assert sum(transport.handshakes.values()) <= len(work)


def test_a_host_worked_on_alone_connects_once(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=2) as transport:
        remote = transport.remote(Endpoint("h1", "192.0.2.1"))
        with ThreadPoolExecutor(4) as pool:  # its commands at once: one sets the master up
            list(pool.map(lambda _: command(watch, remote), range(12)))
        assert transport.handshakes["h1"] == 1


def test_pinned_hosts_are_outside_the_budget_and_never_closed(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=1) as transport:
        balancer = transport.remote(Endpoint("lb", "192.0.2.100"), pinned=True)
        hosts = [transport.remote(Endpoint(f"h{i}", f"192.0.2.{i}")) for i in range(4)]
        for host in hosts:
            command(watch, host)
            command(watch, balancer)
        assert transport.handshakes["lb"] == 1
        assert transport.peak_open == 1
        assert all(transport.handshakes[h.name] == 1 for h in hosts)


def test_a_fresh_connection_is_a_handshake_of_its_own(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=1) as transport:
        remote = transport.remote(Endpoint("h1", "192.0.2.1"))
        command(watch, remote)
        with remote.session(fresh=True):
            pass
        assert transport.handshakes["h1"] == 2
        assert transport.peak_open == 1


def test_an_urgent_connection_goes_before_every_waiting_routine_one() -> None:
    pacing = Pacing(1)
    order: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with pacing.slot():
            held.set()
            release.wait()

    def take(name: str, urgent: bool) -> None:
        with pacing.slot(urgent=urgent):
            order.append(name)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    routine = [threading.Thread(target=take, args=(f"r{i}", False)) for i in range(3)]
    for t in routine:
        t.start()
    urgent = threading.Thread(target=take, args=("confirm", True))
    urgent.start()
    while not pacing._urgent:  # it is waiting: the slot is still held
        time.sleep(0.001)
    release.set()
    for t in [holder, *routine, urgent]:
        t.join()
    assert order[0] == "confirm"
    assert sorted(order[1:]) == ["r0", "r1", "r2"]


def test_a_host_a_worker_holds_is_never_closed_between_its_commands(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=2) as transport:
        held = transport.remote(Endpoint("held", "192.0.2.1"))
        with transport.hold(held):
            command(watch, held)
            for i in range(6):  # other hosts come and go meanwhile
                command(watch, transport.remote(Endpoint(f"h{i}", f"192.0.2.{10 + i}")))
            command(watch, held)
        assert transport.handshakes["held"] == 1
        assert transport.peak_open <= 2


class Refusing(Watch):
    """A host whose handshakes fail while ``down`` is set, after ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.gate = threading.Event()
        self.gate.set()

    def connect(self, remote: Remote) -> None:
        self.gate.wait()
        if self.down:
            raise SshError(f"{remote.name}: ssh: connect to host: No route to host")
        super().connect(remote)


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> Refusing:
    return watching(monkeypatch, Refusing())


def test_a_warmed_host_is_not_connected_again(watch: Watch) -> None:
    with Transport(SshConfig(), max_open=4) as transport:
        remotes = [transport.remote(Endpoint(f"h{i}", f"192.0.2.{i}")) for i in range(3)]
        transport.warm(remotes)
        for remote in remotes:
            command(watch, remote)  # waits for its warm-up, if still connecting
        assert all(transport.handshakes[r.name] == 1 for r in remotes)
    assert not watch.masters  # every master stopped with the run


def test_a_warm_up_a_command_waited_for_fails_that_command_once(refusing: Refusing) -> None:
    refusing.gate.clear()  # the warm-up connects only once the command waits for it
    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("h1", "192.0.2.1"))
        transport.warm([remote])
        while not remote._master.locked():  # the warm-up holds the host's set-up
            time.sleep(0.001)
        threading.Timer(0.05, refusing.gate.set).start()
        with pytest.raises(SshError, match="No route to host"):
            command(refusing, remote)
        assert transport.handshakes["h1"] == 1  # the warm-up's failure, not a second try
        refusing.down = False
        command(refusing, remote)  # the next command connects anew
        assert transport.handshakes["h1"] == 2


def test_a_warm_up_that_failed_before_anyone_asked_is_tried_again(refusing: Refusing) -> None:
    with Transport(SshConfig()) as transport:
        remote = transport.remote(Endpoint("h1", "192.0.2.1"))
        transport.warm([remote])
        while transport.handshakes["h1"] == 0 or remote._master.locked():
            time.sleep(0.001)
        refusing.down = False  # the host came back while the systems built
        command(refusing, remote)
        assert transport.handshakes["h1"] == 2


def test_closing_the_run_stops_a_master_still_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ssh that never answers (a host that drops packets): the run's end stops it and
    its warm-up at once, instead of waiting for the connect time-out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 60\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    transport = Transport(SshConfig())
    remote = transport.remote(Endpoint("h1", "192.0.2.1"))
    transport.warm([remote])
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        time.sleep(0.01)
    pid = int((tmp_path / "pid").read_text())
    transport.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    assert not remote.has_master
    assert not [t for t in threading.enumerate() if t.name.startswith("fleet-warm")]


def test_a_command_that_waited_for_a_handshake_slot_keeps_its_whole_time(watch: Watch) -> None:
    """The time a command waits for its turn among the handshakes is the run's pace, not
    the host's slowness: only its own handshake comes off the command's time-out (a
    status of 200 hosts reported hosts unreachable "within 0.1 s" when it did)."""
    with Transport(SshConfig(), max_handshakes=1) as transport:
        remote = transport.remote(Endpoint("h1", "192.0.2.1"))
        spent: list[float] = []

        def command() -> None:
            with remote.session(timeout=15) as shaking:
                spent.append(shaking)

        with transport._pacing.slot():  # another host's handshake holds the only place
            waiting = threading.Thread(target=command)
            waiting.start()
            time.sleep(0.5)
        waiting.join()
        assert 0 < spent[0] < 0.4  # its own handshake (about 0.01 s), not the wait
        with remote.session(timeout=15) as again:
            assert again == 0.0  # over the master: no handshake at all
