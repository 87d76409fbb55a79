"""Ctrl-C as a designed path.

Every program the tool starts runs in a session of its own, so the terminal's Ctrl-C
reaches the tool alone, and the tool decides what stops:

- Outside a rollout, the first Ctrl-C stops the command: the programs it runs (``nix``,
  ``ssh``) are ended, and nothing new starts. ``fleet exec`` (``collecting``) then says
  which hosts' commands were stopped: each ends with its ssh session (``fleet-host run``).
- In a rollout (``graceful``), the first Ctrl-C stops starting hosts: the hosts in flight
  finish or restore, as they would have. The second stops them at once: each step that
  can be stopped is (a copy, an activation, a health check's wait), and the host undoes
  its transaction; what puts a host back (undo, commit, a revert's verification), and
  begin, which no token fences yet, run to their end (``protected``). The third leaves at
  once: every host still in flight undoes itself by its own deadline, as when the tool is
  killed.

A signal handler may run between any two bytecodes of the main thread, even one holding a
lock; so the handler only counts and hands the rest to a thread of its own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import IntEnum
from functools import wraps
from types import FrameType
from typing import ParamSpec, TypeVar

from fleet.errors import ExitCode, Interrupted


class Level(IntEnum):
    NONE = 0
    STOP = 1  # no new host starts; hosts in flight go on
    RESTORE = 2  # hosts in flight stop what they do and are restored
    LEAVE = 3  # the tool exits now; the hosts' dead-man switches restore them


class _State:
    def __init__(self) -> None:
        self.level = Level.NONE
        self.rollout = False  # a rollout began: Ctrl-C counts rather than stops
        self.collecting = False  # Ctrl-C stops the programs; the command reports on them
        self.notice: Callable[[Level], None] | None = None  # told of each, in a rollout
        self.children: dict[subprocess.Popen[bytes] | subprocess.Popen[str], bool] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.pending: queue.SimpleQueue[Level] = queue.SimpleQueue()
        self.worker: threading.Thread | None = None
        self.local = threading.local()


_state = _State()


def level() -> Level:
    return _state.level


def stopping() -> bool:
    """No new host may start (first Ctrl-C of a rollout, or any Ctrl-C outside one)."""
    return _state.level >= Level.STOP


def _is_protected() -> bool:
    return bool(getattr(_state.local, "protected", 0))


def _stops_here() -> bool:
    """Whether work of this thread is to stop now: outside a rollout at any Ctrl-C, in a
    rollout from the second, and never inside ``protected``."""
    if _is_protected():
        return False
    wanted = Level.RESTORE if _state.rollout else Level.STOP
    return _state.level >= wanted


def check() -> None:
    """Raise Interrupted where the work of this thread must stop."""
    if _stops_here():
        raise Interrupted(_reason())


def _reason() -> str:
    if _state.rollout:
        return "interrupted (Ctrl-C twice)"
    return "interrupted (Ctrl-C)"


@contextlib.contextmanager
def protected() -> Iterator[None]:
    """What must run to its end once started: putting a host back, or finishing it."""
    depth = getattr(_state.local, "protected", 0)
    _state.local.protected = depth + 1
    try:
        yield
    finally:
        _state.local.protected = depth


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def gather(
    pool: concurrent.futures.Executor, func: Callable[[T], R], items: Iterable[T]
) -> list[R]:
    """``list(pool.map(func, items))`` whose wait a Ctrl-C does not sit behind: the kernel
    may hand SIGINT to any thread, and Python runs its handler on the main thread only
    once that thread wakes, so the main thread must never sleep unbounded."""
    futures = [pool.submit(func, item) for item in items]
    pending = set(futures)
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=0.2)
    return [f.result() for f in futures]


def protecting(func: Callable[P, R]) -> Callable[P, R]:
    """``protected`` for the whole of a function."""

    @wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with protected():
            return func(*args, **kwargs)

    return run


def carried(func: Callable[P, R]) -> Callable[P, R]:
    """``func`` for another thread, as protected as the thread that hands it over (a
    restored system's checks run on threads of their own)."""
    return protecting(func) if _is_protected() else func


def sleep(seconds: float) -> None:
    """time.sleep that a Ctrl-C meant for this thread ends (with Interrupted)."""
    check()
    end = time.monotonic() + seconds
    with _state.lock:
        while not _stops_here():
            left = end - time.monotonic()
            if left <= 0:
                return
            _state.changed.wait(left)
    raise Interrupted(_reason())


def wait(event: threading.Event, seconds: float) -> bool:
    """Event.wait that a Ctrl-C meant for this thread also ends (True: set or stopped)."""
    end = time.monotonic() + seconds
    while not _stops_here():
        left = end - time.monotonic()
        if left <= 0:
            return event.is_set()
        if event.wait(min(left, 0.2)):
            return True
    return True


@contextlib.contextmanager
def child(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> Iterator[None]:
    """Track a running program (started with ``start_new_session=True``) so that a
    Ctrl-C meant for its thread ends it."""
    protect = _is_protected()
    with _state.lock:
        _state.children[proc] = protect
    try:
        if not protect and _stops_here():
            _terminate(proc)
        yield
    finally:
        with _state.lock:
            _state.children.pop(proc, None)


def interrupted(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> bool:
    """Whether the program was ended by a Ctrl-C rather than by itself."""
    return bool(getattr(proc, "_fleet_interrupted", False))


def _terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    proc._fleet_interrupted = True  # type: ignore[union-attr]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)


def _end_children(everything: bool) -> None:
    with _state.lock:
        doomed = [p for p, protect in _state.children.items() if everything or not protect]
    for proc in doomed:
        _terminate(proc)


def _handle(_signum: int, _frame: FrameType | None) -> None:
    _state.level = Level(min(_state.level + 1, Level.LEAVE))
    _state.pending.put(_state.level)
    if not _state.rollout and not (_state.collecting and _state.level < Level.RESTORE):
        raise KeyboardInterrupt


def _work() -> None:
    """The handler's second half, on a thread of its own: end what must end, say so."""
    while True:
        now = _state.pending.get()
        with _state.lock:
            _state.changed.notify_all()
        if not _state.rollout or now >= Level.RESTORE:
            _end_children(everything=now >= Level.LEAVE)
        notice = _state.notice
        if notice is not None:
            notice(now)
        if _state.rollout and now >= Level.LEAVE:
            sys.stderr.flush()
            os._exit(ExitCode.INTERRUPTED)


def install() -> None:
    """Take SIGINT over for this process (from the main thread, once)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handle)
    if _state.worker is None:
        _state.worker = threading.Thread(target=_work, name="fleet-interrupt", daemon=True)
        _state.worker.start()


@contextlib.contextmanager
def graceful(notice: Callable[[Level], None]) -> Iterator[None]:
    """A rollout: from here to the command's end, Ctrl-C counts (``Level``) instead of
    stopping the command, so that the report is still written; ``notice`` is told of each
    press during the rollout, from another thread."""
    _state.rollout, _state.notice = True, notice
    try:
        yield
    finally:
        _state.notice = None


@contextlib.contextmanager
def collecting() -> Iterator[None]:
    """A command that reports on every host (``fleet exec``): the first Ctrl-C ends the
    programs it runs and lets it say where; the second stops it."""
    _state.collecting = True
    try:
        yield
    finally:
        _state.collecting = False


def reset() -> None:
    """Forget every Ctrl-C (tests)."""
    _state.level, _state.rollout, _state.notice = Level.NONE, False, None
    _state.collecting = False
