"""The `fleet` command: parse, call the core, print. No logic of its own lives here."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from fleet import interrupt
from fleet.errors import ExitCode, FleetError, Interrupted, printable, printable_lines
from fleet.errors import UsageError as FleetUsageError
from fleet.models import READ_PARALLEL
from fleet.waves import Order


class _Lazy:
    """A module imported when a command first uses it, not when the CLI loads: `--help`
    loads no core module, and each command only what it runs."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


if TYPE_CHECKING:
    from fleet import day2, flows, nix, opening, output
    from fleet import report as html_report
    from fleet.rollout import Report
else:
    day2 = _Lazy("fleet.day2")
    flows = _Lazy("fleet.flows")
    nix = _Lazy("fleet.nix")
    opening = _Lazy("fleet.opening")
    output = _Lazy("fleet.output")
    html_report = _Lazy("fleet.report")  # jinja2: only `report --html` renders a page

# The command line as typed, kept for `exec` (click drops the `--` that ends selectors).
_ARGV: list[str] = []

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Context:
    flake: str | None
    json: bool
    verbose: bool
    argv: list[str]  # as typed: `exec` needs to see where `--` was
    parallel: int | None = None  # --parallel of a command other than deploy and rollback
    show_trace: bool = False
    # --option and --override-input, given to Nix once a command opens the flake.
    nix_options: tuple[tuple[str, str], ...] = ()
    override_inputs: tuple[tuple[str, str], ...] = ()

    def say(self, message: str) -> None:
        """Progress for people: stderr, so stdout stays a clean report (printable: it may
        hold a host's words)."""
        click.echo(printable_lines(message), err=True)


def _emit(ctx: Context, data: Any, table: list[dict[str, Any]] | None = None) -> None:
    if ctx.json:
        click.echo(json.dumps(data, indent=2))
    elif table is not None:
        click.echo(output.table(table))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--flake",
    default=None,
    metavar="REF",
    help="The flake that declares the fleet (default: the config's flake, else .).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Say more about what is done.")
@click.option(
    "--show-trace",
    is_flag=True,
    help="When the declaration does not evaluate, print Nix's whole trace.",
)
@click.option(
    "--option",
    "nix_options",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="Set a Nix setting for every evaluation and build of the flake (repeatable).",
)
@click.option(
    "--override-input",
    "override_inputs",
    nargs=2,
    multiple=True,
    metavar="INPUT REF",
    help="Evaluate the flake with this input at another flake reference (repeatable).",
)
@click.version_option(package_name="fleet")
@click.pass_context
def cli(
    click_ctx: click.Context,
    flake: str | None,
    as_json: bool,
    verbose: bool,
    show_trace: bool,
    nix_options: tuple[tuple[str, str], ...],
    override_inputs: tuple[tuple[str, str], ...],
) -> None:
    """Deploy NixOS configurations to a fleet, health-gated, with atomic rollback."""
    argv = list(_ARGV)
    click_ctx.obj = Context(
        flake=flake,
        json=as_json,
        verbose=verbose,
        argv=argv,
        show_trace=show_trace,
        nix_options=nix_options,
        override_inputs=override_inputs,
    )
    _JSON[0] = as_json


def _report(ctx: Context, report: Report) -> NoReturn:
    if ctx.json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        click.echo(output.host_table(report.reports))
        summary = f"release {report.release.id}: {report.result.value}"
        click.echo(printable(summary + (f" ({report.stopped})" if report.stopped else ""), None))
    sys.exit(report.exit_code)


def _session(ctx: Context, **build: Any) -> flows.Session:
    """The flake opened with the command line's Nix options (checked here, exit 2): only
    the commands that evaluate it load nix. ``build``: deploy's --max-jobs, --builders.
    Called in a statement of its own: in ``flows.f(_session(ctx))`` Python would import
    the flows (the callee) before Nix is asked anything."""
    nix.configure(nix.NixArgs(ctx.nix_options, ctx.override_inputs, ctx.show_trace, **build))
    # Nix evaluates the inventory while the core the command runs loads (importing flows).
    opened = opening.start(ctx.flake)
    return flows.open_session(opened, ctx.parallel)


class Seconds(click.ParamType):  # type: ignore[type-arg,unused-ignore]  # generic from click 8.2
    """A number of seconds from ``low`` to ``high``: finite, unlike click's FloatRange,
    which lets ``nan`` through every bound (each comparison with it is false) and ``inf``
    through an open one; either would become a deadline that never comes."""

    name = "seconds"

    def __init__(self, low: float, high: float = 86400.0) -> None:
        self.low, self.high = low, high

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and self.low <= seconds <= self.high):
            self.fail(f"{value!r}: seconds from {self.low:g} to {self.high:g}", param, ctx)
        return seconds


def parallel_option(command: F) -> F:
    """``--parallel`` of the commands that read or act on hosts outside a rollout."""

    def remember(click_ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
        if value is not None:
            click_ctx.find_object(Context).parallel = value  # type: ignore[union-attr]

    return click.option(
        "--parallel",
        type=click.IntRange(1),
        metavar="N",
        expose_value=False,
        callback=remember,
        help=f"Hosts worked on at once (default {READ_PARALLEL}).",
    )(command)


def rollout_options(command: F) -> F:
    """The wave, timeout and lock options that deploy and rollback share."""
    options = [
        click.option("--parallel", type=click.IntRange(1), help="Hosts worked on at once."),
        click.option("--canary", type=click.IntRange(0),
                     help="Hosts done first, alone: those tagged with the policy's canaryTag "
                     "(default canary), else the first in order (default: the fleet's "
                     "deploy.canary)."),
        click.option("--batch-size", metavar="N|P%",
                     help="Hosts per wave after the canary (default: the fleet's "
                     "deploy.batchSize)."),
        click.option("--health-timeout", type=Seconds(1), metavar="S",
                     help="Seconds from the start of activation for systemd to settle and "
                     "every check to pass."),
        click.option("--confirm-timeout", type=Seconds(2), metavar="S",
                     help="Seconds past the health timeout the host waits for the commit; "
                     "then its dead-man switch re-activates the recorded generation (it "
                     "fires at activation start + health + confirm timeout)."),
        click.option("--break-lock", is_flag=True,
                     help="Take deploy locks even if held (on purpose)."),
        click.option("--no-drain", is_flag=True,
                     help="Activate without taking the hosts' instances out of rotation on "
                     "the balancers first, nor reading the balancers at all."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@rollout_options
@click.option(
    "--max-failures",
    type=click.IntRange(0),
    help="Failed hosts tolerated before the rollout stops (default 0).",
)
@click.option(
    "--no-rollback",
    is_flag=True,
    help="When the rollout stops, leave hosts that already deployed this release "
    "on it (failing hosts still revert).",
)
@click.option("--dry-run", is_flag=True, help="Build and show what would change; touch nothing.")
@click.option(
    "--boot",
    is_flag=True,
    help="Make it the next boot generation only (reported pending-reboot).",
)
@click.option(
    "--reboot",
    is_flag=True,
    help="Boot the new generation once, prove it healthy, then make it the default; "
    "a host that does not come back healthy boots its old generation.",
)
@click.option(
    "--boot-timeout",
    type=Seconds(10, 3600),
    metavar="S",
    help="With --reboot: seconds a host may take to come back (default 300).",
)
@click.option(
    "--canary-weight",
    type=click.IntRange(1, 99),
    metavar="P",
    help="Send the canaries' new systems P % of each balanced service's traffic, and hold "
    "it (--canary-hold) while their checks keep passing; a failure takes them out of "
    "rotation and rolls them back.",
)
@click.option(
    "--canary-hold",
    type=Seconds(1, 3600),
    metavar="S",
    help="Seconds a weighted canary is held before the rollout continues (default 30).",
)
@click.option(
    "--skip-analysis",
    is_flag=True,
    help="Do not run the declared canary analyses (deploy.analysis) after the canaries: "
    "for emergencies.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Copy every closure from this machine, even when the fleet has a binary cache.",
)
@click.option(
    "-s",
    "--substitute-on-destination",
    is_flag=True,
    help="Each host first fetches what it can of its closure from its own substituters.",
)
@click.option(
    "--build-host",
    metavar="HOST",
    help="Build the systems on HOST (a host of the inventory, or [user@]address) instead "
    "of this machine; evaluation stays here, and the outputs come back here once.",
)
@click.option("--max-jobs", metavar="N", help="Nix's builds at once (a number, or auto).")
@click.option("--builders", metavar="SPEC", help="Nix's remote builders for this build.")
@click.option(
    "--order",
    type=click.Choice([o.value for o in Order]),
    help="Waves by dependencies (default: a dependency's hosts before its dependents') "
    "or by the inventory's order of names alone.",
)
@click.pass_obj
def deploy(
    ctx: Context, /, selectors: tuple[str, ...], batch_size: str | None, **overrides: Any
) -> None:
    """Build, copy, activate behind a dead-man switch, prove healthy, persist: in waves."""
    if overrides.get("boot") and overrides.get("reboot"):
        raise click.UsageError("--boot and --reboot exclude each other")
    build = {"max_jobs": overrides.pop("max_jobs"), "builders": overrides.pop("builders")}
    session = _session(ctx, **build)
    session.inventory.select(selectors)  # an unknown selector fails before any build
    overrides["batch_size"] = flows.parse_batch_size(batch_size) if batch_size else None
    options = flows.deploy_options(session, overrides)
    outcome = flows.deploy(session, selectors, options, output.reporter_for())
    if isinstance(outcome, list):
        rows = [
            {
                "host": p.host,
                "running": output.short_path(p.running),
                "desired": output.short_path(p.desired),
                "change": ("unreachable: " + p.message)
                if not p.reachable
                else ("switch" if p.changed else "none"),
                "wave": p.wave,
                "why": p.why,
            }
            for p in sorted(outcome, key=lambda p: p.wave)
        ]
        analyses = flows.analyses_to_run(session.inventory, options, outcome)
        if not ctx.json:
            ctx.say(f"analysis after the canaries: {', '.join(analyses) or 'none'}")
        _emit(
            ctx,
            {
                "dryRun": True,
                "analysis": analyses,
                "hosts": {
                    p.host: {
                        "running": p.running,
                        "desired": p.desired,
                        "changed": p.changed,
                        "reachable": p.reachable,
                        "wave": p.wave,
                        "why": p.why,
                    }
                    for p in outcome
                },
            },
            rows,
        )
        return
    _report(ctx, outcome)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option(
    "--desired",
    is_flag=True,
    help="Also show drift: whether each host runs what the flake builds now.",
)
@click.pass_obj
def status(ctx: Context, selectors: tuple[str, ...], desired: bool) -> None:
    """One row per host: running, current and booted generation, failed units, health,
    last release, lock. Read from the hosts, in parallel. With monitoring, also each
    host's alerts in Prometheus (firing, and pending marked), asked of the first
    monitoring host that answers; they do not change the exit code."""
    session = _session(ctx)
    found = flows.status(session, selectors, desired)
    _emit(ctx, found.as_json(), found.table())
    if not ctx.json:
        for r in found.hosts:
            for breach in r.breaches:
                ctx.say(f"{r.name}: {breach.message}; repair: {breach.repair}")
    if found.note:
        ctx.say(found.note)
    if not found.ok:
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.pass_obj
def traffic(ctx: Context, selectors: tuple[str, ...]) -> None:
    """Per balancer, service and instance: state, weight, sessions, health as the balancer
    sees it. Exit 4 when an instance is out of rotation or a balancer cannot be read."""
    session = _session(ctx)
    servers, errors = flows.traffic_view(session, selectors)
    rows = [
        {
            "service": s.service,
            "instance": s.host,
            "balancer": s.balancer,
            "state": s.status,
            "weight": s.weight,
            "sessions": s.sessions,
            "check": s.check,
            "agent": s.agent,
        }
        for s in servers
    ]
    _emit(ctx, {"servers": [s.as_json() for s in servers], "unreadable": errors}, rows)
    if not ctx.json:
        for name, why in errors.items():
            ctx.say(f"{name}: {why}")
    if errors or not all(s.serving for s in servers):
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option(
    "--force",
    is_flag=True,
    help="Also end transactions whose holder may still be alive (undo them now).",
)
@click.pass_obj
def recover(ctx: Context, selectors: tuple[str, ...], force: bool) -> None:
    """Finish or undo what an interrupted deploy, rollback or gc left on each host, as
    the host's transaction record says; then check the invariant."""
    session = _session(ctx)
    good, bad = _split(flows.recover(session, selectors, force))
    rows = []
    data: dict[str, Any] = {}
    attention = bool(bad)
    for name, done in good.items():
        breaches = done.state.breaches(name)
        attention = attention or bool(breaches)
        rows.append(
            {
                "host": name,
                "recovered": done.action,
                "invariant": "; ".join(b.message for b in breaches) or "ok",
            }
        )
        data[name] = {
            "recovered": done.action,
            "detail": done.detail,
            "breaches": [b.as_json() for b in breaches],
        }
    _emit(ctx, {"hosts": data, "failed": bad}, rows + _unreachable_rows(bad))
    if attention:
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option(
    "--to",
    "to",
    type=click.IntRange(1),
    metavar="GENERATION",
    help="Go to this generation (it must exist on every selected host).",
)
@click.option(
    "--release",
    "release",
    metavar="ID",
    help="Undo release ID: every host that took part goes back to what it ran before.",
)
@rollout_options
@click.option("--yes", is_flag=True, help="Do not ask before changing hosts.")
@click.pass_obj
def rollback(
    ctx: Context,
    /,
    selectors: tuple[str, ...],
    to: int | None,
    release: str | None,
    batch_size: str | None,
    yes: bool,
    **overrides: Any,
) -> None:
    """Put hosts back on an earlier generation, through the deploy protocol.

    Without options each host goes back to the generation before its current one.
    """
    if to is not None and release is not None:
        raise click.UsageError("--to and --release exclude each other")
    session = _session(ctx)
    session.inventory.select(selectors)
    overrides["batch_size"] = flows.parse_batch_size(batch_size) if batch_size else None
    options = flows.deploy_options(session, overrides)
    with session.transport(parallel=options.parallel) as transport:
        plan = flows.plan_rollback(session, selectors, transport, to, release)
        for name, target in plan.targets.items():
            ctx.say(
                f"{name}: {output.short_path(plan.running[name])} -> "
                f"{output.generation_cell(target)}"
            )
        for name, why in plan.unreachable.items():
            ctx.say(f"{name}: unreachable, not rolled back: {why}")
        if plan.targets and not yes:
            if not sys.stdin.isatty():
                raise FleetUsageError("rollback changes hosts: pass --yes when not on a terminal")
            click.confirm(f"roll back {len(plan.targets)} hosts?", abort=True, err=True)
        report = flows.rollback(session, plan, transport, options, output.reporter_for())
    _report(ctx, report)


@cli.command()
@parallel_option
@click.option("--host", "host", metavar="HOST", help="Only this host's releases.")
@click.option("--limit", type=click.IntRange(1), help="The newest N releases.")
@click.pass_obj
def history(ctx: Context, host: str | None, limit: int | None) -> None:
    """Releases, newest first, merged from the records on the hosts."""
    session = _session(ctx)
    entries, missing = flows.history(session, host, limit)
    rows = [{"release": e.id, "action": e.action, "time": e.time, "operator": e.operator,
             "hosts": len(e.hosts), "result": e.result} for e in entries]  # fmt: skip
    _emit(ctx, {"releases": [e.as_json() for e in entries], "unreachable": missing}, rows)
    if missing:
        ctx.say(f"not read (unreachable): {', '.join(missing)}; the history may be incomplete")
        sys.exit(ExitCode.ATTENTION)


def _split(
    found: dict[str, T | FleetError],
) -> tuple[dict[str, T], dict[str, str]]:
    """Answers by host, and why the other hosts gave none."""
    good = {n: v for n, v in found.items() if not isinstance(v, FleetError)}
    bad = {n: str(v) for n, v in found.items() if isinstance(v, FleetError)}
    return good, bad


def _unreachable_rows(bad: dict[str, str]) -> list[dict[str, Any]]:
    return [{"host": n, "error": why} for n, why in bad.items()]


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.pass_obj
def generations(ctx: Context, selectors: tuple[str, ...]) -> None:
    """Each host's generations: number, date, store path; running, booted, current."""
    session = _session(ctx)
    good, bad = _split(day2.list_generations(session, selectors))
    rows = [{"host": host, "generation": g.number, "created": g.created,
             "path": output.short_path(g.path),
             "": " ".join(m for m, on in (("running", g.running), ("booted", g.booted),
                                          ("current", g.current)) if on)}
            for host, gens in good.items() for g in gens]  # fmt: skip
    data = {h: [dataclasses.asdict(g) for g in gens] for h, gens in good.items()}
    _emit(ctx, {"hosts": data, "unreachable": bad}, rows + _unreachable_rows(bad))
    if bad:
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option("--health-timeout", type=Seconds(1), metavar="S")
@click.pass_obj
def health(ctx: Context, selectors: tuple[str, ...], health_timeout: float | None) -> None:
    """Run the health checks only (failed units, then every declared check)."""
    session = _session(ctx)
    good, bad = _split(day2.check_health(session, selectors, health_timeout))
    rows = [{"host": h, "healthy": "yes" if v.ok else "no", "detail": v.message}
            for h, v in good.items()]  # fmt: skip
    data = {
        h: {
            "healthy": v.ok,
            "failedUnits": list(v.failed_units),
            "checks": [dataclasses.asdict(c) for c in v.checks],
        }
        for h, v in good.items()
    }
    _emit(ctx, {"hosts": data, "unreachable": bad}, rows + _unreachable_rows(bad))
    if bad or not all(v.ok for v in good.values()):
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.pass_obj
def diff(ctx: Context, selectors: tuple[str, ...]) -> None:
    """What a deploy would change on each host: packages added, removed, other versions."""
    session = _session(ctx)
    good, bad = _split(day2.diff(session, selectors))
    if ctx.json:
        data = {
            h: [
                {"package": c.package, "change": c.kind, "old": list(c.old), "new": list(c.new)}
                for c in changes
            ]
            for h, changes in good.items()
        }
        click.echo(json.dumps({"hosts": data, "unreachable": bad}, indent=2))
    else:
        for host, changes in good.items():
            click.echo(
                f"{host}: "
                + ("no package changes" if not changes else f"{len(changes)} package changes")
            )
            for change in changes:
                click.echo(printable(f"  {change}", None))
        for host, why in bad.items():
            click.echo(printable(f"{host}: {why}", None))
    if bad:
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option(
    "--keep",
    type=click.IntRange(1),
    required=True,
    help="Newest generations to keep (running, booted, current and the rollback "
    "target are always kept).",
)
@click.option("--break-lock", is_flag=True, help="Take deploy locks even if held (on purpose).")
@click.pass_obj
def gc(ctx: Context, selectors: tuple[str, ...], keep: int, break_lock: bool) -> None:
    """Delete old generations and collect garbage on each host."""
    session = _session(ctx)
    good, bad = _split(day2.gc(session, selectors, keep, break_lock))
    rows = [{"host": h, "deleted": " ".join(f"#{n}" for n in v.deleted) or "-",
             "nix": v.summary} for h, v in good.items()]  # fmt: skip
    data = {h: {"deleted": v.deleted, "summary": v.summary} for h, v in good.items()}
    _emit(ctx, {"hosts": data, "failed": bad}, rows + _unreachable_rows(bad))
    if bad:
        sys.exit(ExitCode.ATTENTION)


def _drain(ctx: Context, selectors: tuple[str, ...], on: bool, reason: str | None) -> None:
    if not selectors:
        raise FleetUsageError(f"fleet {'drain' if on else 'undrain'}: name the hosts")
    # It goes into every host's records and onto terminals: one short printable line.
    if reason is not None and (len(reason) > 200 or not reason.isprintable()):
        raise FleetUsageError("--reason: at most 200 printable characters, on one line")
    session = _session(ctx)
    good, bad = _split(day2.drain(session, selectors, on, reason))
    rows = [{"host": h, "was": "drained" if v.before else "serving",
             "balancers": v.balancers} for h, v in good.items()]  # fmt: skip
    data = {h: {"wasDrained": v.before, "balancers": v.balancers} for h, v in good.items()}
    _emit(ctx, {"hosts": data, "failed": bad}, rows + _unreachable_rows(bad))
    wanted = "drained" if on else "serving"
    if bad or any(v.balancers not in (wanted, "not balanced") for v in good.values()):
        sys.exit(ExitCode.ATTENTION)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="SELECTOR...")
@click.option("--reason", help="Why, for the host's records.")
@click.pass_obj
def drain(ctx: Context, selectors: tuple[str, ...], reason: str | None) -> None:
    """Take whole hosts out of rotation on every balancer (maintenance), recorded on each
    host; waits until their sessions end or the drain timeout. Lasts until undrain, even
    across reboots."""
    _drain(ctx, selectors, True, reason)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="SELECTOR...")
@click.option("--reason", help="Why, for the host's records.")
@click.pass_obj
def undrain(ctx: Context, selectors: tuple[str, ...], reason: str | None) -> None:
    """Put drained hosts back in rotation; waits until every balancer sends to them."""
    _drain(ctx, selectors, False, reason)


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@parallel_option
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[SELECTOR]... -- COMMAND...")
@click.pass_obj
def exec_(ctx: Context, words: tuple[str, ...]) -> None:
    """Run a command on many hosts in parallel; output prefixed by host, then a summary."""
    if "--" not in ctx.argv:
        raise FleetUsageError(
            "fleet exec: put the command after --, e.g. fleet exec @web -- uptime"
        )
    command = ctx.argv[ctx.argv.index("--") + 1 :]
    selectors = list(words[: len(words) - len(command)])
    if not command:
        raise FleetUsageError("fleet exec: no command after --")
    session = _session(ctx)
    with interrupt.collecting():
        results = day2.run_everywhere(session, selectors, command)
    stopped = sorted(h for h, r in results.items() if isinstance(r, Interrupted))
    good, bad = _split({h: r for h, r in results.items() if h not in stopped})
    if ctx.json:
        data = {h: {"exitCode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
                for h, r in good.items()}  # fmt: skip
        click.echo(
            json.dumps({"hosts": data, "unreachable": bad, "interrupted": stopped}, indent=2)
        )
    else:
        # Each line the host's own, printable: no escape sequence from one host may move
        # the cursor, rewrite another host's lines or reach the terminal (--json: as is).
        for host, result in good.items():
            for stream, text in ((None, result.stdout), (True, result.stderr)):
                for line in text.splitlines():
                    click.echo(f"{host}: {printable(line, None)}", err=bool(stream))
        rows = [{"host": h, "exit": r.returncode} for h, r in good.items()]
        rows += [{"host": h, "exit": f"unreachable: {why}"} for h, why in bad.items()]
        rows += [{"host": h, "exit": "interrupted: the command was stopped"} for h in stopped]
        click.echo(output.table(rows), err=True)
    if stopped:  # after the one document of --json, if any
        plural = "s" if len(stopped) != 1 else ""
        ctx.say(
            f"fleet: interrupted (Ctrl-C): the command was stopped on {len(stopped)} "
            f"host{plural}: {', '.join(stopped)}"
        )
        sys.exit(ExitCode.INTERRUPTED)
    if bad:
        sys.exit(ExitCode.ATTENTION)  # as every command: an unreachable host needs attention
    if any(r.returncode != 0 for r in good.values()):
        sys.exit(ExitCode.ERROR)


@cli.command()
@parallel_option
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]...")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True),
    required=True,
    help="Where to write the page.",
)
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="Releases shown."
)
@click.option(
    "--timelines",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    metavar="N",
    help="The newest rollouts drawn as a timeline of their hosts' phases.",
)
@click.pass_obj
def report(
    ctx: Context, selectors: tuple[str, ...], html_file: str, limit: int, timelines: int
) -> None:
    """A self-contained HTML page: the status table, each host's alerts (with monitoring),
    a timeline of the last rollouts and the recent releases."""
    folder = Path(html_file).parent
    if not folder.is_dir():  # before any host is asked
        raise FleetUsageError(f"--html {html_file}: the folder {folder} does not exist")
    session = _session(ctx)
    found = flows.status(session, selectors)
    releases, unread = flows.history(session, None, limit)
    page = html_report.render(session.flake, found, releases, unread, timelines)
    html_report.write(Path(html_file), page)
    ctx.say(f"wrote {html_file}")
    if found.note:
        ctx.say(found.note)
    attention = sorted(s.name for s in found.hosts if not s.ok)
    if ctx.json:
        click.echo(json.dumps({"file": html_file, "attention": attention}, indent=2))
    if attention:
        sys.exit(ExitCode.ATTENTION)  # the page says why, as status would


class _LabGroup(click.Group):
    """`fleet lab`: its commands live in fleet.lab.cli, loaded (with the lab's modules)
    only when a lab command, or the group's help, is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        importlib.import_module("fleet.lab.cli")  # registers the commands on `lab`
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        importlib.import_module("fleet.lab.cli")
        return super().get_command(ctx, cmd_name)


@cli.group(cls=_LabGroup)
def lab() -> None:
    """A practice fleet of local hosts: Debian containers with Nix and systemd (not NixOS)."""


# --json, once the command line is parsed (before that: whether it was typed).
_JSON: list[bool] = [False]


def _fail(message: str, code: int) -> NoReturn:
    """The error on stderr; with --json also one JSON document on stdout, so that a script
    reading stdout always gets one."""
    click.echo(f"fleet: {printable_lines(message)}", err=True)
    if _JSON[0] or "--json" in _ARGV[: _ARGV.index("--") if "--" in _ARGV else None]:
        click.echo(json.dumps({"error": message, "exitCode": int(code)}, indent=2))
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error is one line on stderr and a documented exit code."""
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    interrupt.install()
    try:
        cli.main(args=argv, prog_name="fleet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click's word for a KeyboardInterrupt, too
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _fail("interrupted (Ctrl-C)", ExitCode.INTERRUPTED)
        _fail("aborted", ExitCode.ERROR)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        _fail(where + exc.format_message().replace("\n", " "), ExitCode.USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), ExitCode.USAGE)
    except FleetError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C)", ExitCode.INTERRUPTED)
    sys.exit(ExitCode.OK)
