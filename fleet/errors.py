"""Errors the tool reports to an operator, each mapped to a documented exit code."""

from __future__ import annotations

from enum import IntEnum


def printable(text: str, limit: int | None = 200) -> str:
    """Another machine's text, fit for a terminal: every character that is not printable
    (an escape sequence's ESC, a carriage return, a newline) becomes ``?``, so that no host
    can move the cursor, retitle the window, write the clipboard or forge a line; cut to
    ``limit`` characters (None: whole)."""
    kept = text if limit is None else text[:limit]
    return "".join(c if c.isprintable() else "?" for c in kept)


def printable_lines(text: str) -> str:
    """Text that may hold another machine's words, its lines kept, each ``printable``."""
    return "\n".join(printable(line, None) for line in text.split("\n"))


class ExitCode(IntEnum):
    """Process exit codes; README.md documents them for scripts and CI."""

    OK = 0
    ERROR = 1  # an operation failed in a way no other code describes
    USAGE = 2  # bad input: nothing was touched
    ROLLED_BACK = 3  # the change failed and every touched host is back on its known-good generation
    ATTENTION = 4  # some host needs an operator: unreachable, or not restored
    INTERRUPTED = 130  # Ctrl-C: hosts in flight finished or were restored, none started after


class FleetError(Exception):
    """A failure with a one-line message meant for the operator."""

    exit_code: ExitCode = ExitCode.ERROR
    # A failed remote step's equivalent command line, for the operator to run it again.
    command: str | None = None


class UsageError(FleetError):
    """The operator asked for something impossible; raised before anything is touched."""

    exit_code = ExitCode.USAGE


class InventoryError(UsageError):
    """The fleet inventory does not match the schema."""


class NixError(FleetError):
    """A local Nix command failed."""


class DeclarationError(UsageError, NixError):
    """The fleet's declaration does not evaluate: bad input, nothing was touched."""


class SshError(FleetError):
    """A remote command could not be run: connection, authentication or host key."""


class HostKeyError(SshError):
    """The host presented a key that does not match the pinned or known one."""


class Interrupted(FleetError):
    """The operator pressed Ctrl-C (twice, in a rollout): this step was stopped midway."""

    exit_code = ExitCode.INTERRUPTED
