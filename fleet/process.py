"""Running local programs: one place that turns a failed command into a readable error."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet import interrupt
from fleet.errors import FleetError, Interrupted, printable

# A stderr line in a one-line message: long enough for any Nix error, bounded for a host's.
ERROR_LINE_MAX = 2000


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_error_line(self) -> str:
        """The most telling line of stderr, for a one-line message.

        Nix and many tools start the cause with ``error:`` and print hints after it. A
        failed Nix builder's own last words follow as ``> ...`` lines (``nix build``) or
        come just before the error (``nix-store --realise``).
        """
        lines = self._lines()
        if not lines:
            return f"exit code {self.returncode}"
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if first is None:
            return lines[-1]
        builder_log = [line[2:] for line in lines if line.startswith("> ")]
        if not builder_log and first > 0 and lines[first].startswith("error: builder for"):
            builder_log = [lines[first - 1]]
        return lines[first] + (f" ({builder_log[-1]})" if builder_log else "")

    def _lines(self) -> list[str]:
        """stderr's lines, stripped, printable and cut: what it says ends up on a terminal
        (and a host's ssh or program may say anything)."""
        stripped = (line.strip() for line in self.stderr.splitlines())
        return [printable(line, ERROR_LINE_MAX) for line in stripped if line]

    def error_text(self, limit: int = 2000) -> str:
        """All that Nix says from its first ``error:`` on, in one line: every problem of a
        declaration, the file, a "did you mean"; not the pointer to ``--show-trace``."""
        lines = self._lines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if first is None:
            return self.last_error_line()
        kept = [line for line in lines[first:] if not line.startswith("(use '--show-trace'")]
        text = " ".join(kept)
        return text if len(text) <= limit else text[: limit - 1] + "…"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    error: type[FleetError] = FleetError,
    what: str | None = None,
    hold_stdin: bool = False,
    limit: int | None = None,
) -> Result:
    """Run argv (never through a shell) and capture its output.

    With check, a non-zero exit raises ``error`` whose message names ``what`` (or the
    program) and the last line the program printed on stderr. The program runs in a
    session of its own, so that Ctrl-C is the tool's to handle (fleet/interrupt.py); one
    it stops raises Interrupted. ``hold_stdin``: its stdin stays open (and empty) until it
    ends, so that a remote ``fleet-host run`` sees the session end only when ours does.
    ``limit``: a program that prints more bytes than that (a host may say anything) is
    stopped, and that is its error, before it can fill the operator's memory.
    """
    interrupt.check()
    held: int | None = None
    stdin: int = subprocess.DEVNULL
    if input is not None:
        stdin = subprocess.PIPE
    elif hold_stdin:
        stdin, held = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise error(f"{argv[0]}: command not found") from exc
    except (OSError, ValueError) as exc:  # an argument list too long, a NUL in one
        raise error(f"{argv[0]}: cannot start: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        if held is not None:
            os.close(stdin)
    try:
        with interrupt.child(proc):
            try:
                stdout, stderr = _communicate(proc, input, timeout, limit)
            except subprocess.TimeoutExpired as exc:
                _kill(proc)
                raise error(f"{what or argv[0]}: no answer within {timeout:g} s") from exc
            except _TooLarge:
                _kill(proc)
                size = f"{limit >> 20} MiB" if limit and limit >= 1 << 20 else f"{limit} bytes"
                raise error(f"{what or argv[0]}: printed more than {size}: stopped") from None
            except BaseException:
                _kill(proc)
                raise
    finally:
        if held is not None:
            os.close(held)
    if interrupt.interrupted(proc):
        raise Interrupted(f"{what or argv[0]}: interrupted (Ctrl-C)")
    result = Result(tuple(argv), proc.returncode, stdout, stderr)
    if check and not result.ok:
        raise error(f"{what or argv[0]}: {result.last_error_line()}")
    return result


# How often a wait looks whether the program ended while its pipes stay open.
POLL = 0.2


class _TooLarge(Exception):
    """The program printed more than run's ``limit``."""


def _communicate(
    proc: subprocess.Popen[str], input: str | None, timeout: float | None, limit: int | None
) -> tuple[str, str]:
    """Its output once it ends, or TimeoutExpired (or _TooLarge past ``limit`` bytes,
    looked at every POLL). An ssh that rides a master connection
    hands its descriptors to the master, which holds them while the remote command runs:
    when the ssh itself is ended (a Ctrl-C), its pipes may never close, so the wait ends
    with the program, and what it had printed by then is its output."""
    end = None if timeout is None else time.monotonic() + timeout
    given = input
    while True:
        left = POLL if end is None else min(POLL, end - time.monotonic())
        try:
            out, err = proc.communicate(given, timeout=max(left, 0.001))
            return out, err
        except subprocess.TimeoutExpired as exc:
            given = None  # sent with the first call
            # What it printed so far, all of it (communicate keeps it between calls).
            if limit is not None and len(exc.output or b"") + len(exc.stderr or b"") > limit:
                raise _TooLarge from None
            if proc.poll() is not None:  # ended: what is left in its pipes, then no more
                try:
                    out, err = proc.communicate(timeout=POLL)
                    return out, err
                except subprocess.TimeoutExpired as held:
                    return _text(held.output), _text(held.stderr)
            if end is not None and time.monotonic() >= end:
                raise exc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _kill(proc: subprocess.Popen[str]) -> None:
    """The program and whatever it started (its session's process group); its pipes are
    not waited for (a master may hold them, see _communicate)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
