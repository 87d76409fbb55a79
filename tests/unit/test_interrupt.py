"""Ctrl-C as a designed path (fleet/interrupt.py): what each press stops, with real child
processes; and the host's `fleet-host run`, which ends a command with its session."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import interrupt, process
from fleet.errors import Interrupted

HOST_PROGRAM = Path(__file__).parents[2] / "fleet" / "hostside" / "fleet_host.py"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    interrupt.reset()
    yield
    interrupt.reset()


def press() -> None:
    """What the signal handler does, without a signal: count, and let the worker act."""
    interrupt._state.level = interrupt.Level(interrupt._state.level + 1)
    interrupt._state.pending.put(interrupt._state.level)
    if interrupt._state.worker is None:
        interrupt._state.worker = threading.Thread(target=interrupt._work, daemon=True)
        interrupt._state.worker.start()


def later(seconds: float, action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_outside_a_rollout_the_first_press_ends_the_programs_and_nothing_new_starts() -> None:
    presser = later(0.3, press)
    with pytest.raises(Interrupted):
        process.run(["sleep", "30"])
    presser.join()
    with pytest.raises(Interrupted):
        process.run(["true"])


def test_in_a_rollout_the_first_press_lets_work_in_flight_finish() -> None:
    with interrupt.graceful(lambda _level: None):
        presser = later(0.2, press)
        result = process.run(["sh", "-c", "sleep 0.6; echo finished"])
        presser.join()
        assert result.stdout == "finished\n"
        assert interrupt.stopping()  # but no new host starts
        process.run(["true"])  # what a host in flight still runs


def test_the_second_press_stops_what_runs_but_never_what_restores() -> None:
    notices: list[interrupt.Level] = []
    with interrupt.graceful(notices.append):
        press()
        outcome: dict[str, object] = {}

        def restoring() -> None:
            with interrupt.protected():
                outcome["restored"] = process.run(["sh", "-c", "sleep 0.8; echo restored"])
                interrupt.sleep(0.1)  # a protected wait is not cut either

        thread = threading.Thread(target=restoring)
        thread.start()
        later(0.3, press).join()
        with pytest.raises(Interrupted):
            process.run(["sleep", "30"])
        with pytest.raises(Interrupted):
            interrupt.sleep(30)
        thread.join()
        assert outcome["restored"].stdout == "restored\n"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while len(notices) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert notices == [interrupt.Level.STOP, interrupt.Level.RESTORE]


def test_the_whole_process_group_of_a_stopped_program_ends(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    presser = later(0.5, press)
    with pytest.raises(Interrupted):
        process.run(["sh", "-c", f"sleep 300 & echo $! > {pids}; sleep 301"])
    presser.join()
    assert _gone(int(pids.read_text()))


def test_children_run_in_sessions_of_their_own() -> None:
    result = process.run([sys.executable, "-c", "import os; print(os.getsid(0), os.getpid())"])
    sid, pid = result.stdout.split()
    assert sid == pid  # a terminal's Ctrl-C reaches the tool alone


def test_an_interrupted_wait_for_an_event_returns() -> None:
    event = threading.Event()
    presser = later(0.2, press)
    assert interrupt.wait(event, 30)
    presser.join()


# -- fleet-host run ----------------------------------------------------------------------


def host_run(*argv: str, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOST_PROGRAM), "run", "--", *argv],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_host_run_passes_output_and_exit_code_through() -> None:
    proc = host_run("sh", "-c", "echo out; echo err >&2; exit 7")
    proc.wait(timeout=10)  # its stdin held open, as the tool holds it
    out, err = proc.communicate()
    assert (proc.returncode, out, err) == (7, "out\n", "err\n")


def test_host_run_ends_the_command_and_its_children_when_the_session_ends(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 301"
    proc = host_run("sh", "-c", script)
    deadline = time.monotonic() + 10
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pids.read_text())
    assert proc.stdin is not None
    proc.stdin.close()  # what the end of the ssh session looks like to the host
    proc.wait(timeout=15)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 143, err
    assert "the session ended" in err
    assert _gone(child)


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its new parent has not reaped yet."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_host_run_says_when_the_command_cannot_start() -> None:
    proc = host_run("/nonexistent/program")
    proc.wait(timeout=10)
    _, err = proc.communicate()
    assert proc.returncode == 127
    assert "/nonexistent/program" in err
