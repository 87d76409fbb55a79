"""What the operator types. Every number the command line takes: nothing that is not
one, nothing outside its range, never ``nan`` or an infinity (a deadline that never comes)
gets past the parser; each is exit 2 with one line naming the option, before the flake is
read. Text handed to hosts (a drain's reason, a command) is bounded and one line."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import click
import pytest

from fleet import cli

importlib.import_module("fleet.lab.cli")  # `fleet lab`'s commands, loaded when asked for

# Python reads " 1\n" as 1, harmlessly: what is refused is what is no number in range.
HOSTILE = ["nan", "NaN", "inf", "-inf", "1e400", "-1", "0x10", "", "1 2", "1\n2", "\x00"]


def numeric_options() -> Iterator[tuple[list[str], click.Option]]:
    """(the command's path, the option) for every option typed as a number."""

    def walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Option]]:
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(
                param.type, (cli.Seconds, click.IntRange, click.FloatRange)
            ):
                yield path, param
            if isinstance(param, click.Option) and param.type in (click.INT, click.FLOAT):
                yield path, param
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                yield from walk(sub, [*path, name])

    yield from walk(cli.cli, [])


OPTIONS = [(path, option.opts[0]) for path, option in numeric_options()]


def test_numbers_are_never_a_click_float_range() -> None:
    """click's FloatRange lets nan through every bound: seconds are ``cli.Seconds``."""
    floats = [
        (path, option.opts[0])
        for path, option in numeric_options()
        if isinstance(option.type, click.FloatRange) or option.type is click.FLOAT
    ]
    assert floats == []
    assert len(OPTIONS) >= 12, OPTIONS  # the walk found the commands' options


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    ("path", "option"), OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else x
)
def test_a_bad_number_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], path: list[str], option: str, value: str
) -> None:
    argv = ["--flake", "/nonexistent/flake", *path, f"{option}={value}"]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    [line] = err.strip().splitlines() or [""]
    assert option in line, line


@pytest.mark.parametrize(
    ("value", "low", "high", "ok"),
    [("1", 1, 10, True), ("10", 1, 10, True), ("2.5", 1, 10, True), ("0.99", 1, 10, False),
     ("10.01", 1, 10, False), ("nan", 1, 10, False), ("inf", 1, 10, False),
     ("86400", 1, 86400, True), ("86401", 1, 86400, False)],
)  # fmt: skip
def test_seconds_bounds(value: str, low: float, high: float, ok: bool) -> None:
    kind = cli.Seconds(low, high)
    if ok:
        assert kind.convert(value, None, None) == float(value)
    else:
        with pytest.raises(click.BadParameter):
            kind.convert(value, None, None)


@pytest.mark.parametrize("reason", ["", "two\nlines", "a\x1b[2Jb", "tab\there", "x" * 501])
def test_a_drain_reason_is_one_printable_line(reason: str) -> None:
    """Checked before the session is touched: kept in every record, shown in history."""
    from fleet import day2
    from fleet.errors import UsageError

    with pytest.raises(UsageError, match=r"^--reason: one printable line"):
        day2.drain(None, [], True, reason)  # type: ignore[arg-type]


def test_a_command_too_long_for_ssh_is_bad_input_not_a_traceback() -> None:
    from fleet import day2, process
    from fleet.errors import FleetError, UsageError

    with pytest.raises(UsageError, match=r"^exec: the command is 200\d+ bytes quoted"):
        day2.run_everywhere(None, [], ["echo", "x" * 200_000])  # type: ignore[arg-type]
    with pytest.raises(FleetError, match=r"^echo: cannot start: Argument list too long"):
        process.run(["echo", "x" * 200_000])
