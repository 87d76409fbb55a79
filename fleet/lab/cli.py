"""The `fleet lab` commands: loaded by fleet.cli only when `fleet lab` runs, so that no
other command loads the lab's modules."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from fleet.cli import Context, Seconds, _emit, lab
from fleet.lab import boot as lab_boot
from fleet.lab import flake as lab_flake_files
from fleet.lab import ops as lab_ops
from fleet.lab.layout import MAX_HOSTS
from fleet.lab.layout import Lab as LabInstance


def _lab() -> LabInstance:
    return LabInstance.from_env()


def _state_rows(states: list[lab_ops.HostState]) -> list[dict[str, Any]]:
    return [
        {
            "host": s.name,
            "address": s.address,
            "container": "up" if s.running else "down",
            "link": "up" if s.link_up else "cut",
            "ssh": "yes" if s.ssh else "no",
        }
        for s in states
    ]


@lab.command("up")
@click.option(
    "--hosts",
    "count",
    type=click.IntRange(1, MAX_HOSTS),
    default=None,
    help=f"Number of hosts (default {lab_ops.DEFAULT_HOSTS}; 1 to {MAX_HOSTS}).",
)
@click.option(
    "--balancers",
    type=click.IntRange(0),
    default=0,
    help="How many of the hosts (the last ones, before the monitoring host) run HAProxy in "
    "front of the others' lab-web (a new lab only).",
)
@click.option(
    "--monitoring",
    is_flag=True,
    help="The last host (before the cache host) runs Prometheus, Alertmanager and the "
    "blackbox exporter, and every host the node exporter (a new lab only).",
)
@click.option(
    "--cache",
    is_flag=True,
    help="The last host serves the fleet's binary cache with nginx; deploys publish to it "
    "and the hosts fetch from it (a new lab only).",
)
@click.option(
    "--timeout",
    type=Seconds(1),
    default=None,
    help=f"Seconds for every host to boot and answer ssh (default {lab_boot.PACE.base:g} + "
    f"{lab_boot.PACE.per_host:g} per host started).",
)
@click.pass_obj
def lab_up(
    ctx: Context,
    count: int | None,
    balancers: int,
    monitoring: bool,
    cache: bool,
    timeout: float | None,
) -> None:
    """Start the lab (or the hosts of it that are down) and wait until every host answers ssh."""
    states = lab_ops.up(_lab(), count, ctx.say, balancers, monitoring, cache, timeout=timeout)
    _emit(ctx, [asdict(s) for s in states], _state_rows(states))


@lab.command("down")
@click.pass_obj
def lab_down(ctx: Context) -> None:
    """Remove every container, namespace, link, bridge, mount and file the lab made."""
    lab_ops.down(_lab())
    ctx.say("lab is down")


@lab.command("status")
@click.pass_obj
def lab_status(ctx: Context) -> None:
    """List the lab's hosts, their addresses and whether each is up."""
    states = lab_ops.status(_lab())
    if not states and not ctx.json:
        ctx.say("no lab is up")
        return
    _emit(ctx, [asdict(s) for s in states], _state_rows(states))


@lab.command("fault")
@click.argument("host")
@click.argument("action", type=click.Choice([f.value for f in lab_ops.Fault]))
@click.pass_obj
def lab_fault(ctx: Context, host: str, action: str) -> None:
    """Break (or mend) one lab host: cut its link, stop sshd, crash it, fill its disk."""
    lab_ops.fault(_lab(), host, lab_ops.Fault(action))
    ctx.say(f"{host}: {action}")


@lab.command("flake")
def lab_flake() -> None:
    """Print the path of the lab's flake (use it as --flake)."""
    click.echo(str(_lab().flake))


@lab.command("release")
@click.option("--version", "version", required=True, help="The release the lab flake builds next.")
@click.option(
    "--broken",
    default=None,
    metavar="|".join(lab_flake_files.BROKEN_KINDS),
    help="health: the service fails its check; start: its unit fails to start; "
    "build: the system fails to build; boot: its boot loader entry cannot be installed; "
    "errors:N: it passes its check but answers 500 to N of every 100 requests.",
)
@click.option(
    "--on",
    "broken_hosts",
    multiple=True,
    metavar="HOST",
    help="Break only this host (repeatable); default: every host.",
)
@click.option(
    "--start-delay",
    type=Seconds(0),
    default=0.0,
    metavar="S",
    help="The service takes S seconds to become ready (a slow activation).",
)
@click.option(
    "--payload",
    type=click.IntRange(0, 1024),
    default=0,
    metavar="MIB",
    help="Every app host's system of the release shares MIB of incompressible data, as "
    "hosts share their packages (what a binary cache saves).",
)
@click.pass_obj
def lab_release(
    ctx: Context,
    version: str,
    broken: str | None,
    broken_hosts: tuple[str, ...],
    start_delay: float,
    payload: int,
) -> None:
    """Change what the lab's flake builds next."""
    wanted = lab_flake_files.LabRelease(
        version, broken, start_delay, broken_hosts, payload_mib=payload
    )
    lab_ops.release(_lab(), wanted)
    ctx.say(f"lab flake now builds release {version}" + (f" (broken: {broken})" if broken else ""))
