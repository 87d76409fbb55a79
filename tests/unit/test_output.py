"""What the operator sees: the live view of a rollout, the plain lines, the final table."""

from __future__ import annotations

import io
import os

from fleet.models import Generation, HostReport, HostResult, Phase
from fleet.output import LiveReporter, Reporter, host_table

OLD = Generation(4, "/nix/store/" + "a" * 32 + "-nixos-system-web-4")
NEW = Generation(None, "/nix/store/" + "b" * 32 + "-nixos-system-web-5")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live(lines: int = 40) -> tuple[LiveReporter, io.StringIO, Clock]:
    """A live view on a terminal of ``lines`` lines whose ticker never fires by itself."""
    out, clock = io.StringIO(), Clock()
    size = os.terminal_size((100, lines))
    return LiveReporter(out, clock=clock, size=lambda: size, interval=3600), out, clock


def last_frame(view: LiveReporter, out: io.StringIO) -> list[str]:
    """The lines of the last redraw: the last ``drawn`` (the next redraw erases them)."""
    return out.getvalue().rsplit("\x1b[J", 1)[-1].splitlines()[-view.drawn :]


def ended(name: str, result: HostResult, message: str | None = None) -> HostReport:
    return HostReport(name, result=result, message=message)


def test_the_live_view_counts_hosts_and_freezes_a_finished_hosts_time() -> None:
    view, out, clock = live()
    view.start(["web1", "web2", "web3", "web4"])
    view.wave(1, 2, ["web1"])
    view.phase("web1", Phase.CONNECT)
    clock.now += 1
    view.phase("web1", Phase.HEALTH)
    clock.now += 2
    view.done(ended("web1", HostResult.DEPLOYED))
    view.wave(2, 2, ["web2", "web3"])
    view.phase("web2", Phase.COPY)
    view.phase("web3", Phase.COPY)
    clock.now += 1
    view.phase("web3", Phase.ACTIVATE)
    clock.now += 4
    view.done(ended("web3", HostResult.ROLLED_BACK, "a unit failed to start (exit 4)"))
    clock.now += 30  # the finished hosts' times stand still
    view.finish()
    frame = last_frame(view, out)
    assert frame[0] == "wave 2 of 2 · 1 done · 1 failed · 1 in flight · 1 waiting · 38.0s"
    assert frame[1].split() == ["web1", "deployed", "3.0s"]
    assert frame[2].split() == ["web2", "copy", "35.0s"]
    assert frame[3].split(maxsplit=3) == [
        "web3", "rolled-back", "5.0s", "a unit failed to start (exit 4)"]  # fmt: skip
    assert frame[4].split() == ["web4", "waiting"]


def test_events_do_not_redraw_and_a_revert_puts_a_host_back_in_flight() -> None:
    view, out, clock = live()
    view.start(["web1", "web2"])
    drawn = out.getvalue()
    view.wave(1, 1, ["web1", "web2"])
    for host in ("web1", "web2"):
        view.phase(host, Phase.CONNECT)
        view.done(ended(host, HostResult.DEPLOYED))
    assert out.getvalue() == drawn  # only the ticker redraws: a few times a second at most
    clock.now += 2
    view.phase("web1", Phase.LOCK)  # a fleet-wide revert of a host the release deployed
    view.note("stopping")
    assert last_frame(view, out)[0].startswith("wave 1 of 1 · 1 done · 0 failed · 1 in flight")
    clock.now += 1
    view.done(ended("web1", HostResult.ROLLED_BACK, "rolled back with the rest of the release"))
    view.finish()
    assert last_frame(view, out)[1].split()[:3] == ["web1", "rolled-back", "1.0s"]
    assert "stopping\n" in out.getvalue()


def test_a_tall_fleet_shows_what_fits_in_flight_and_failed_first() -> None:
    view, out, _ = live(lines=12)
    hosts = [f"web{i:04}" for i in range(3000)]
    view.start(hosts)
    view.wave(3, 40, hosts[:100])
    for host in hosts[:60]:
        view.phase(host, Phase.CONNECT)
        view.done(ended(host, HostResult.DEPLOYED))
    view.phase(hosts[60], Phase.CONNECT)
    view.done(ended(hosts[60], HostResult.FAILED, "check api: HTTP 503"))
    for host in hosts[61:100]:
        view.phase(host, Phase.HEALTH)
    view.finish()
    frame = last_frame(view, out)
    assert len(frame) == 11  # one line left for the cursor: nothing scrolls the view away
    assert frame[0].startswith("wave 3 of 40 · 60 done · 1 failed · 39 in flight · 2900 waiting")
    assert [line.split()[0] for line in frame[1:10]] == hosts[61:70]  # in flight first
    assert frame[10] == "  … 2991 more: 60 done, 1 failed, 30 in flight, 2900 waiting"
    view, out, _ = live(lines=12)
    view.start(hosts[:50])
    for host in hosts[:45]:
        view.phase(host, Phase.HEALTH)
    view.done(ended(hosts[45], HostResult.UNREACHABLE))
    view.finish()
    assert [line.split()[0] for line in last_frame(view, out)[1:4]] == hosts[:3]


def test_the_plain_lines_name_each_wave() -> None:
    out = io.StringIO()
    plain = Reporter(out)
    plain.wave(2, 5, [f"web{i}" for i in range(1, 10)])
    plain.done(ended("web1", HostResult.ROLLED_BACK, "check api: HTTP 503"))
    first, second = out.getvalue().splitlines()
    assert first == "wave 2 of 5: web1, web2, web3, web4, web5, web6 (+3 more)"
    assert second.startswith("web1: done: rolled-back (check api: HTTP 503) [")


def test_the_table_shows_attempted_and_restored_and_the_line_to_run_again() -> None:
    line = "ssh -o BatchMode=yes -p 22 -l root -- 10.0.0.5 'fleet-host activate'"
    back = HostReport("web1", HostResult.ROLLED_BACK, True, previous=OLD, new=OLD,
                      attempted=NEW, command=line)  # fmt: skip
    back.fail(HostResult.ROLLED_BACK, Phase.ACTIVATE, "a unit failed to start (exit 4)")
    done = HostReport("web2", HostResult.DEPLOYED, True, previous=OLD, new=NEW, attempted=NEW)
    table = host_table([back, done]).splitlines()
    assert "bbbbbbb-nixos-system-web-5 → #4 aaaaaaa-nixos-system-web-4" in table[2]
    assert "→" not in table[3] and "bbbbbbb-nixos-system-web-5" in table[3]
    assert table[-2:] == ["web1 (activate):", f"  to run it again: {line}"]
    assert back.as_json()["attempted"] == NEW.as_json() and back.as_json()["command"] == line
