"""What comes back from a broken or compromised host, followed to where it ends: every
answer of another shape is that host's own error (never a traceback, never the other
hosts' loss), every number a host names is checked before it is used, and none of its
words reaches a terminal with an escape sequence or the report's page as markup."""

from __future__ import annotations

import html.parser
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fleet import analysis, flows, opening, report, timeline, traffic
from fleet.cache import Published, fetch_or_copy
from fleet.cli import main
from fleet.errors import FleetError, UsageError
from fleet.history import merge, rollback_target
from fleet.hostops import (
    RUNNING_HELPER,
    HostOps,
    HostState,
    Malformed,
    clock,
    generation,
    helper_of,
    parse_state,
)
from fleet.inventory import Host
from fleet.models import Generation, HostReport, HostResult, Phase
from fleet.output import LiveReporter, Reporter, host_table, table
from fleet.process import Result
from fleet.rollout import DeployOptions, Rollout, _tail
from fleet.status import FleetStatus, HostStatus
from tests.unit.test_events import NEW, OLD, RELEASE, FakeHost, FakeTransport
from tests.unit.test_hostops import FakeRemote
from tests.unit.test_traffic import TRAFFIC, row

P = "/nix/store/" + "a" * 32 + "-nixos-system-web1"
STATE: dict[str, Any] = {"ok": True, "current": 1, "running": P, "generations": [[1, 0, P]]}

# Text a host may send that a terminal would act on: CSI (cursor, erase), OSC 52 (write
# the clipboard), OSC 8 (a hyperlink), a carriage return or newline that forges a line,
# C1's one-byte CSI, a backspace, a bell, and a right-to-left override.
HOSTILE_TEXT = [
    "\x1b[1A\x1b[2Kweb2: deployed", "\x1b]52;c;ZXZpbA==\x07", "\x1b]8;;https://x.example/\x07",
    "ok\rweb2: deployed", "a\nweb2: deployed", "\x9b2J", "abc\b\b\bxyz", "\x07", "\u202etxt.exe",
]  # fmt: skip


def clean(text: str) -> bool:
    return all(c.isprintable() for c in text)


def line(answer: dict[str, Any]) -> tuple[int, str, str]:
    return 0, json.dumps(answer), ""


# -- answers of another shape: the host's error ------------------------------------------

BAD_STATES: list[dict[str, Any]] = [
    {"generations": 5}, {"generations": [[1, 2]]}, {"generations": [["1", 0, P]]},
    {"generations": [[True, 0, P]]}, {"generations": [[0, 0, P]]}, {"generations": [[-1, 0, P]]},
    {"generations": [[1, 1e300, P]]}, {"generations": [[1, -5, P]]}, {"generations": [{}]},
    {"watchers": 5}, {"failedUnits": {"a": 1}}, {"heldSecrets": "ab"}, {"missingSecrets": 5},
    {"txn": {"deadline": "soon"}}, {"txn": {"deadline": 10**400}}, {"txn": {"deadline": [1]}},
    {"txn": {"deadline": True}},
]  # fmt: skip
# Lines that are not RFC 8259 JSON objects, though Python's own parser takes some of them.
BAD_LINES = [
    '{"ok": true, "now": NaN}', '{"ok": true, "now": Infinity}', '{"ok": true, "x": -Infinity}',
    '{"ok": true, "now": 1e400}', '{"ok": true, "x": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"ok": true, "x": ' + "9" * 5000 + "}", "[1, 2]", '"ok"', "Traceback (most recent call",
]  # fmt: skip


@pytest.mark.parametrize("answer", [line(STATE | bad) for bad in BAD_STATES]
                         + [(0, bad, "") for bad in BAD_LINES])  # fmt: skip
def test_a_state_of_another_shape_is_that_hosts_error(answer: tuple[int, str, str]) -> None:
    host, _ = ops(answer)
    with pytest.raises(Malformed) as error:
        host.state()
    assert str(error.value).startswith("web1: fleet-host state: ") and clean(str(error.value))


def ops(*answers: tuple[int, str, str]) -> tuple[HostOps, FakeRemote]:
    remote = FakeRemote(list(answers))
    return HostOps(remote), remote  # type: ignore[arg-type]


ACTIVATION: dict[str, Any] = {
    "ok": True,
    "switchExit": 0,
    "settled": True,
    "failedUnits": [],
    "deadline": 9.0,
}


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        *[("activate", ACTIVATION | bad) for bad in (
            {"switchExit": "0"}, {"switchExit": True}, {"switchExit": None}, {"deadline": "9"},
            {"deadline": 10**400}, {"failedUnits": "a"})],
        *[("records", {"ok": True, "records": bad}) for bad in (5, "abc", {"a": 1})],
        *[("settle", {"ok": True, "settled": True, "failedUnits": bad}) for bad in (5, "a")],
        *[("gc", {"ok": True, "deleted": bad}) for bad in ([True], ["1"], [0], 5)],
        *[("weight", {"ok": True, "deadline": bad}) for bad in ("9", None, False)],
    ],
)  # fmt: skip
def test_every_answer_of_another_shape_is_that_hosts_error(
    call: str, answer: dict[str, Any]
) -> None:
    host, _ = ops(line(answer))
    calls: dict[str, Callable[[], object]] = {
        "activate": lambda: host.activate(helper_of(P), "ab" * 16, 10, 5),
        "records": host.records,
        "settle": lambda: host.settle(5),
        "gc": lambda: host.gc("ab" * 16, {}, [1], False),
        "weight": lambda: host.weight(helper_of(P), "ab" * 16, {"api": 50}, 5),
    }
    with pytest.raises(Malformed, match=f"^web1: fleet-host {call}: "):
        calls[call]()


def test_one_hosts_bad_answer_is_its_result_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """status, generations, history: the other hosts' answers stand."""
    from fleet import config, day2
    from fleet.inventory import DeployPolicy, Inventory

    names = ["web1", "web2", "web3"]
    bad = {"web2": line(STATE | {"generations": [[True, 0, P]]}), "web3": (0, "NaN", "")}
    remotes = {n: FakeRemote([bad.get(n, line(STATE))]) for n in names}
    inventory = Inventory(
        {n: Host(n, "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ()) for n in names},
        DeployPolicy(1, 1, 1, 0, 1.0, 1.0),
    )
    session = flows.Session("/flake", config.Config({}, ()), inventory)

    class NoTransport:
        def __enter__(self) -> NoTransport:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def hold(self, _remote: object) -> NoTransport:
            return self

    monkeypatch.setattr(flows.Session, "transport", lambda *_a, **_k: NoTransport())
    monkeypatch.setattr(flows.Session, "ops", lambda _s, _t, h: HostOps(remotes[h.name]))  # type: ignore[arg-type]
    found = day2.list_generations(session, [])
    assert [g.number for g in found["web1"]] == [1]  # type: ignore[union-attr]
    assert isinstance(found["web2"], Malformed) and isinstance(found["web3"], Malformed)


# -- numbers a host names ------------------------------------------------------------------

NOT_COUNTS = [True, False, 0, -1, "3", 3.0, None, [3], {"n": 3}]


@pytest.mark.parametrize("number", NOT_COUNTS)
def test_a_generation_a_host_names_is_checked(number: Any) -> None:
    """Its number reaches `--generation`, its path `--target` and nix-copy-closure."""
    assert generation({"number": number, "path": P}) == Generation(None, P)
    assert generation({"number": 3, "path": P}) == Generation(3, P)
    for path in ("-oProxyCommand=x", "/etc/passwd", P + "\n", P + "/bin", 5, None):
        assert generation({"number": 3, "path": path}) is None


@pytest.mark.parametrize("number", NOT_COUNTS)
def test_a_record_names_no_generation_to_roll_back_to_but_a_number(number: Any) -> None:
    """JSON's true is Python's 1: never generation #1."""
    state = parse_state(STATE | {"current": 2, "generations": [[1, 0, P], [2, 0, P]]})
    record = {"release": "r1", "action": "deploy", "result": "deployed",
              "previous": {"number": number, "path": P}}  # fmt: skip
    with pytest.raises(UsageError, match="use --to"):
        rollback_target("web1", state, [record], release="r1")


@pytest.mark.parametrize(
    "epoch", [float("nan"), float("inf"), 1e300, 10**400, -1, "12", True, None]
)
def test_a_deadline_that_is_no_time_is_shown_as_unknown(epoch: Any) -> None:
    assert clock(epoch) == "?"


@pytest.mark.parametrize("count", [True, -1, "3", 2.5, None, [1]])
def test_counts_a_host_reports_are_whole_numbers_or_nothing(count: Any) -> None:
    """The report's copy figures and a balancer's weight and sessions."""
    host, _ = ops(line({"ok": True, "fetched": count, "downloadBytes": count}))
    published = Published("http://192.0.2.5:5080", frozenset([P]), 0.0)
    assert fetch_or_copy(host, published, P) == {
        "source": "cache", "paths": None, "downloadBytes": None}  # fmt: skip
    [server] = traffic.read(TRAFFIC, "lb1", FakeRemote([line(  # type: ignore[arg-type]
        {"ok": True, "servers": [row("app1", "UP", weight=count, sessions=count)]})]))  # fmt: skip
    assert (server.weight, server.sessions, server.serving) == (None, None, False)


@pytest.mark.parametrize("servers", [5, "app1", {"api": []}])
def test_a_balancer_answer_of_another_shape_is_that_balancers_error(servers: Any) -> None:
    remote = FakeRemote([line({"ok": True, "servers": servers})])
    with pytest.raises(traffic.BalancerError, match=r"^balancer lb1: "):
        traffic.read(TRAFFIC, "lb1", remote)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", [["api"], {"api": 1}, 5, None])
def test_a_balancer_row_of_another_shape_is_passed_over(backend: Any) -> None:
    rows = [row("app1", "UP", backend=backend), row("app2", "UP")]
    remote = FakeRemote([line({"ok": True, "servers": rows})])
    assert [s.host for s in traffic.read(TRAFFIC, "lb1", remote)] == ["app2"]  # type: ignore[arg-type]


# -- a host's words on the terminal ---------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_a_hosts_words_reach_the_terminal_printable(text: str) -> None:
    # stderr, in every error message that quotes it
    result = Result(("ssh",), 1, "", f"banner\nerror: {text}\n")
    assert clean(result.last_error_line()) and clean(result.error_text())
    # what fleet-host reports: failed units, a switch's output
    host, _ = ops(line({"ok": True, "settled": True, "failedUnits": [text]}))
    assert all(clean(u) for u in host.settle(5)[1])
    assert clean(_tail(f"{text}\n{text}"))
    # a release record's words, in history and status
    record = {"release": text, "action": text, "operator": text, "time": text, "result": text}
    [entry] = merge({"web1": [record]})
    assert all(clean(w) for w in (entry.id, entry.action, entry.operator, entry.time, entry.result))
    state = HostState(current=1, running=P, booted=P, generations=(), last_release=record)
    assert all(clean(cell) for cell in HostStatus("web1", True, state=state).row().values())
    # Prometheus's error, relayed by a monitoring host
    _, _, why = analysis.judge(
        {"status": "error", "error": text}, analysis.parse_condition("result > 1")
    )
    assert why is not None and clean(why)


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_what_the_operator_sees_holds_no_escape_of_a_host(text: str) -> None:
    """Whatever a message holds: the plain lines, the live view, the tables."""
    report = HostReport("web1", result=HostResult.FAILED, phase=Phase.HEALTH, message=text,
                        command=f"ssh web1 {text}")  # fmt: skip
    plain = io.StringIO()
    Reporter(plain).phase("web1", Phase.HEALTH, text)
    Reporter(plain).note(f"web1: {text}")
    Reporter(plain).done(report)
    assert all(clean(out) for out in plain.getvalue().splitlines())
    view = LiveReporter(io.StringIO(), size=lambda: os.terminal_size((80, 24)), interval=3600)
    view.start(["web1", "web2"])
    view.phase("web2", Phase.COPY, text)
    view.done(report)
    assert all(clean(out) for out in view.frame())
    view.finish()
    assert all(clean(out) for out in host_table([report]).splitlines())
    assert all(clean(out) for out in table([{"host": "web1", "message": text}]).splitlines())


@pytest.mark.parametrize("wide", ["界" * 80, "🚀" * 80, "e\u0301" * 80])
def test_a_wide_message_never_wraps_a_line_of_the_live_view(wide: str) -> None:
    """A wrapped line would throw the redraw's count of lines off."""
    import unicodedata

    view = LiveReporter(io.StringIO(), size=lambda: os.terminal_size((60, 24)), interval=3600)
    view.start(["web1"])
    view.done(HostReport("web1", result=HostResult.FAILED, message=wide))
    for out in view.frame():
        assert sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in out) < 60
    view.finish()


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_exec_shows_each_line_of_a_host_as_that_hosts_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """No host may move the cursor, or forge or erase another host's line (--json keeps
    the output whole: JSON escapes it)."""
    from fleet import day2

    out = Result(("x",), 0, f"one\n{text}\n", text)
    monkeypatch.setattr(opening, "start", lambda flake: flake)
    monkeypatch.setattr(flows, "open_session", lambda _flake, _parallel=None: None)
    monkeypatch.setattr(day2, "run_everywhere", lambda *_: {"web1": out})
    for argv, check in ((["exec", "--", "x"], 0), (["--json", "exec", "--", "x"], 1)):
        with pytest.raises(SystemExit):
            main(argv)
        shown = capsys.readouterr()
        if check == 0:
            printed = (shown.out + shown.err).splitlines()
            assert all(clean(s) for s in printed)
            assert [s for s in printed if s.startswith("web")] == [
                s for s in printed if s.startswith("web1: ") or s.startswith("web1 ")
            ]
        else:
            assert json.loads(shown.out)["hosts"]["web1"]["stdout"] == out.stdout


# -- the page ---------------------------------------------------------------------------------

MARKUP = '"><script>alert(1)</script><img src=x onerror=alert(1) style="x'
ODD_RECORDS: list[dict[str, Any]] = [
    {},
    {"release": "r1"},
    {"release": MARKUP, "action": MARKUP, "operator": MARKUP, "time": MARKUP, "result": MARKUP},
    {"release": "r1", "action": {"a": [1]}, "result": ["x"], "operator": 5, "time": None},
]


class Tags(html.parser.HTMLParser):
    """Every element and attribute of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


def timed(host: str, **fields: Any) -> dict[str, Any]:
    return {"release": "r1", "action": "deploy", "host": host, "result": "deployed",
            "time": "2027-01-15T08:00:30+00:00", "started": 1_800_000_000.0, "wave": 1,
            "timings": {"connect": 0.2, "copy": 1.0}} | fields  # fmt: skip


@pytest.mark.parametrize("last", ODD_RECORDS)
def test_the_page_stands_whatever_a_host_says_and_runs_nothing(last: dict[str, Any]) -> None:
    state = HostState(current=1, running=P, booted=P, generations=(), last_release=last)
    records = {
        "web1": [timed("web1")],
        "web2": [timed("web2", phase=MARKUP, result="failed", message=MARKUP,
                       timings={MARKUP: 1.0, "health": 2.0}, wave=MARKUP)],
    }  # fmt: skip
    page = report.render(
        "/srv/fleet", FleetStatus([HostStatus("web1", True, state=state)]), merge(records), []
    )
    tags = Tags()
    tags.feed(page)
    assert {t for t, _ in tags.found} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "span", "code",
        "em", "table", "thead", "tbody", "tr", "th", "td", "div", "ul", "li"}  # fmt: skip
    attributes = {name for _, attrs in tags.found for name, _ in attrs}
    assert attributes <= {"charset", "lang", "id", "class", "style", "title", "data-host",
                          "data-release", "colspan"}  # fmt: skip
    classes = [str(dict(attrs).get("class")).split() for tag, attrs in tags.found if tag == "span"]
    bars = [c for c in classes if c[0] == "bar"]
    known = {f"p-{p}" for p in timeline.COLOURS} | {"p-other"}
    assert bars and all(c[1] in known and set(c[2:]) <= {"failed", "revert"} for c in bars)


@pytest.mark.parametrize(
    "odd",
    [{"started": 0.0}, {"started": True}, {"started": 10**400}, {"started": -1e300},
     {"timings": {"connect": 1e300}}, {"timings": {"connect": 10**400, "copy": True}},
     {"started": None, "time": "0001-01-01T00:00:00+14:00"}, {"wave": True}],
)  # fmt: skip
def test_no_record_can_make_the_timeline_grow_without_bound(odd: dict[str, Any]) -> None:
    """One host's record sets the axis of the whole release: it gets a few ticks, always."""
    [found] = timeline.recent(merge({"web1": [timed("web1")], "web2": [timed("web2", **odd)]}), 1)
    assert len(found.ticks) <= timeline.TICKS + 1
    assert all(lane.wave in (1, None) for lane in found.lanes)
    assert all(0 <= found.at(b.start) <= 100 for lane in found.lanes for b in lane.bars)


# -- Prometheus's answers, relayed by a monitoring host ----------------------------------------


@pytest.mark.parametrize(
    "data",
    [[1], "x", None, {"resultType": "vector", "result": {"a": 1}},
     {"resultType": ["vector"] * 10000, "result": []},
     *[{"resultType": "vector", "result": [{"value": [1, v]}]}
       for v in (1, True, None, [1], "x")],
     {"resultType": "scalar", "result": [1, 10**400]}],
)  # fmt: skip
def test_a_prometheus_answer_of_another_shape_is_inconclusive(data: Any) -> None:
    """Never an error that stops the rollout: the canary analysis knows nothing from it."""
    values, outcome, why = analysis.judge(
        {"status": "success", "data": data}, analysis.parse_condition("result >= 0")
    )
    assert outcome is analysis.Outcome.INCONCLUSIVE and values == ()
    assert why is not None and clean(why) and len(why) < 200


# -- a whole rollout with one host that lies -------------------------------------------------


@dataclass
class Lying(FakeHost):
    """A host whose answer to ``command`` has these fields changed (or is this line)."""

    lies: dict[str, dict[str, Any] | str] = field(default_factory=dict)

    def run(self, argv: list[str], **kwargs: Any) -> Result:
        if argv[1] == "record":  # a correction of its record
            return Result(tuple(argv), 0, json.dumps({"ok": True, "recordError": None}), "")
        result = super().run(argv, **kwargs)
        lie = self.lies.get(argv[1])
        if lie is None:
            return result
        told = lie if isinstance(lie, str) else json.dumps(json.loads(result.stdout) | lie)
        return Result(result.argv, result.returncode, told, result.stderr)


BEGUN = {"ok": True, "begun": True, "recorded": {"number": 1, "path": OLD}}


@pytest.mark.parametrize(
    ("lies", "undone"),
    [
        ({"begin": {"recorded": {"number": 1, "path": "--option build-hook /tmp/x"}}}, True),
        ({"begin": {"recorded": None}}, True),
        ({"begin": {"helper": "/bin/sh"}}, True),
        ({"begin": {"activation": {"switchExit": "0", "deadline": 1.0}}}, True),
        ({"begin": {"activation": ACTIVATION | {"deadline": 10**400}}}, True),
        ({"begin": json.dumps(BEGUN)[:-1] + ', "seconds": NaN}'}, True),
        ({"begin": "[]"}, True),
        ({"commit": {"new": {"number": True, "path": "/etc/passwd\x1b[2J"},
                     "record_error": {"x": "\x1b]52;c;x\x07"}}}, False),
        ({"commit": {"new": ["x"]}}, False),
    ],
)  # fmt: skip
def test_a_lying_host_is_undone_or_reported_and_the_others_deploy(
    monkeypatch: pytest.MonkeyPatch, lies: dict[str, Any], undone: bool
) -> None:
    monkeypatch.setattr("fleet.nix.copy_closure", lambda remote, *paths, **_how: None)
    liar = Lying("web2", lies=lies)
    fakes = {"web1": FakeHost("web1"), "web2": liar}
    hosts = [Host(n, "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ()) for n in fakes]
    options = DeployOptions(parallel=2, canary=0, batch_size=10, max_failures=1,
                            health_timeout=10, confirm_timeout=5)  # fmt: skip
    rollout = Rollout(hosts, options, RELEASE, FakeTransport(fakes), Reporter(io.StringIO()))  # type: ignore[arg-type]
    done = rollout.run(dict.fromkeys(fakes, NEW), list(fakes)).as_json()["hosts"]
    assert done["web1"]["result"] == "deployed"
    web2 = done["web2"]
    assert ("undo" in [c for c, _ in liar.sent]) is undone
    assert web2["result"] == ("rolled-back" if undone else "deployed"), web2["message"]
    assert clean(web2["message"] or "") and clean(web2["recordError"] or "")
    json.dumps(web2, allow_nan=False)  # a document any JSON reader takes
    for generation_ in (web2["previous"], web2["new"], web2["attempted"]):
        assert generation_ is None or generation_["path"] in (OLD, NEW)
        assert generation_ is None or generation_["number"] in (1, 2, None)
    # Only fleet-host itself ever ran on the host: the target's, or the running system's.
    assert {argv[0] for argv in liar.argvs} <= {helper_of(NEW), RUNNING_HELPER}


def test_a_failed_hosts_message_quotes_its_words_printable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A switch that fails: its output, failed units and the undo's report."""
    monkeypatch.setattr("fleet.nix.copy_closure", lambda remote, *paths, **_how: None)
    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2J"
    liar = Lying("web1", switch_exit=4, lies={
        "begin": {"activation": ACTIVATION | {"switchExit": 4, "output": f"{evil}\n{evil}",
                                               "deadline": 1.0}},
        "undo": {"switch_exit": evil, "failed_units": [evil], "output": evil,
                 "profile_error": evil, "record_error": evil}})  # fmt: skip
    hosts = [Host("web1", "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ())]
    options = DeployOptions(parallel=1, canary=0, batch_size=10, max_failures=0,
                            health_timeout=10, confirm_timeout=5)  # fmt: skip
    transport: Any = FakeTransport({"web1": liar})
    rollout = Rollout(hosts, options, RELEASE, transport, Reporter(io.StringIO()))
    [web1] = rollout.run({"web1": NEW}, ["web1"]).reports
    assert web1.result is HostResult.FAILED
    assert web1.message is not None and clean(web1.message) and "?]52;c;" in web1.message


def test_a_state_error_is_a_fleet_error() -> None:
    """Every command's per-host collection catches FleetError alone."""
    assert issubclass(Malformed, FleetError)


@pytest.mark.parametrize("stream", ["1", "2"])
def test_a_program_that_prints_without_end_is_stopped_at_the_limit(stream: str) -> None:
    """A host may answer gigabytes: what it prints, on stdout or stderr, is bounded, and
    the program (and its pipes' writer) is stopped, not waited for."""
    from fleet import process

    script = f"head -c 50000000 /dev/zero >&{stream}; sleep 30"
    with pytest.raises(FleetError, match=r"^h: ssh: printed more than 1 MiB: stopped$"):
        process.run(["sh", "-c", script], limit=1 << 20, what="h: ssh", timeout=60)
    small = process.run(["sh", "-c", "head -c 1000 /dev/zero"], limit=1 << 20)
    assert len(small.stdout) == 1000


def test_every_remote_command_is_bounded() -> None:
    """Remote.run hands process.run the remote limit (fleet/ssh.py)."""
    import inspect

    from fleet import ssh

    assert "limit=REMOTE_OUTPUT_MAX" in inspect.getsource(ssh.Remote.run)
    assert ssh.REMOTE_OUTPUT_MAX == 64 << 20
