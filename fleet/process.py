"""Running local programs: one place that turns a failed command into a readable error."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.errors import FleetError


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
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        if not lines:
            return f"exit code {self.returncode}"
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if first is None:
            return lines[-1]
        builder_log = [line[2:] for line in lines if line.startswith("> ")]
        if not builder_log and first > 0 and lines[first].startswith("error: builder for"):
            builder_log = [lines[first - 1]]
        return lines[first] + (f" ({builder_log[-1]})" if builder_log else "")

    def error_text(self, limit: int = 2000) -> str:
        """All that Nix says from its first ``error:`` on, in one line: every problem of a
        declaration, the file, a "did you mean"; not the pointer to ``--show-trace``."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
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
) -> Result:
    """Run argv (never through a shell) and capture its output.

    With check, a non-zero exit raises ``error`` whose message names ``what`` (or the
    program) and the last line the program printed on stderr.
    """
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise error(f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what or argv[0]}: no answer within {timeout:g} s") from exc
    result = Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and not result.ok:
        raise error(f"{what or argv[0]}: {result.last_error_line()}")
    return result
