"""Deploy events: the file and HTTP sinks, the Grafana annotation, the bound on what a
slow or dead server may cost, what may configure them, and a rollout's whole stream
against a stand-in for the hosts."""

from __future__ import annotations

import contextlib
import http.server
import io
import itertools
import json
import shlex
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet import config, events
from fleet.cli import main
from fleet.errors import ExitCode, UsageError
from fleet.events import AnnotationSink, Events, FileSink, HttpSink
from fleet.inventory import Host
from fleet.models import HostReport, HostResult, Phase
from fleet.output import Reporter
from fleet.process import Result
from fleet.rollout import DeployOptions, Release, Report, Rollout
from fleet.ssh import Endpoint

AT = 1_800_000_000.0  # 2027-01-15T08:00:00Z
RELEASE = Release("20270115T080000Z-ab12", "deploy", "alice@laptop", "/srv/fleet", "5c1e0d4",
                  "2027-01-15T08:00:00+00:00")  # fmt: skip


def ticks(step: float = 1.0) -> Any:
    """A clock that moves ``step`` seconds on every reading."""
    count = itertools.count()
    return lambda: AT + step * next(count)


def one_release(recorder: Events) -> None:
    """web1 fails its checks and is rolled back; web2 is never reached."""
    recorder.release_start(["web1", "web2"])
    web1 = HostReport("web1", changed=True)
    recorder.phase_start(web1, "connect")
    recorder.phase_end(web1, Phase.CONNECT, "connect", 0.1234, None)
    recorder.phase_start(web1, "health")
    recorder.phase_end(web1, Phase.HEALTH, "health", 5.1, None)
    web1.fail(HostResult.FAILED, Phase.HEALTH, 'check api: HTTP 503, "expected" 200')
    recorder.phase_start(web1, "rollback")
    recorder.phase_end(web1, Phase.ROLLBACK, "rollback", 0.6, None)
    web1.result = HostResult.ROLLED_BACK
    recorder.host_end(web1)
    stopped = "wave 1 of 2 brought failures to 1 (more than --max-failures 0)"
    recorder.release_end(Report(RELEASE, [web1, HostReport("web2")], 7.5, stopped))


def stamp(second: int) -> str:
    return f"2027-01-15T08:00:{second:02d}.000+00:00"


COMMON = {"release": RELEASE.id, "action": "deploy", "operator": "alice@laptop"}
EXPECTED = [
    COMMON | {"event": "release-start", "time": stamp(0), "flake": "/srv/fleet",
              "revision": "5c1e0d4", "hosts": ["web1", "web2"]},
    COMMON | {"event": "phase-start", "time": stamp(1), "host": "web1", "phase": "connect"},
    COMMON | {"event": "phase-end", "time": stamp(2), "host": "web1", "phase": "connect",
              "result": "ok", "message": None, "seconds": 0.123},
    COMMON | {"event": "phase-start", "time": stamp(3), "host": "web1", "phase": "health"},
    COMMON | {"event": "phase-end", "time": stamp(4), "host": "web1", "phase": "health",
              "result": "failed", "message": 'check api: HTTP 503, "expected" 200',
              "seconds": 5.1},
    COMMON | {"event": "phase-start", "time": stamp(5), "host": "web1", "phase": "rollback"},
    COMMON | {"event": "phase-end", "time": stamp(6), "host": "web1", "phase": "rollback",
              "result": "ok", "message": None, "seconds": 0.6},
    COMMON | {"event": "host-end", "time": stamp(7), "host": "web1", "result": "rolled-back",
              "phase": "health", "message": 'check api: HTTP 503, "expected" 200',
              "changed": True, "seconds": 6.0},
    COMMON | {"event": "release-end", "time": stamp(8), "result": "rolled-back", "exitCode": 3,
              "stopped": "wave 1 of 2 brought failures to 1 (more than --max-failures 0)",
              "seconds": 7.5, "hosts": {"web1": "rolled-back", "web2": "skipped"}},
]  # fmt: skip


def lines(found: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e, sort_keys=True) + "\n" for e in found)


def test_the_file_sink_appends_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    recorder = Events(RELEASE, [FileSink(path)], clock=ticks())
    one_release(recorder)
    recorder.close()
    assert path.read_text() == lines(EXPECTED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Events(RELEASE, [FileSink(path)], clock=ticks())
    one_release(again)
    again.close()
    assert path.read_text() == lines(EXPECTED) * 2  # appended, never rewritten


def test_a_file_that_cannot_be_written_costs_one_warning(tmp_path: Path) -> None:
    warned: list[str] = []
    missing = tmp_path / "no/such/folder/events.jsonl"
    recorder = Events(RELEASE, [FileSink(missing)], clock=ticks(), warn=warned.append)
    one_release(recorder)
    recorder.close()
    assert warned == [f"events: 9 not written to {missing}: No such file or directory"]


class QuietServer(http.server.ThreadingHTTPServer):
    """A client that gave up (the point of some tests) is no error to print."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@dataclass
class Server:
    """A local HTTP server: what it was sent, and how it answers."""

    url: str
    received: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    location: str | None = None


@pytest.fixture()
def server() -> Iterator[Server]:
    state = Server("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(state.delay)
            state.received.append((self.path, dict(self.headers), json.loads(body)))
            self.send_response(state.status)
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: object) -> None:
            pass

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_http_sinks_post_every_event_and_one_annotation(server: Server, tmp_path: Path) -> None:
    token = tmp_path / "grafana-token"
    token.write_text("glsa_t0k3n\n")
    cfg = config.Config({
        "events": {"url": f"{server.url}/fleet"},
        "annotations": {"url": f"{server.url}/api/annotations", "tokenFile": str(token)},
    }, ())  # fmt: skip
    warned: list[str] = []
    recorder = Events(RELEASE, events.sinks(cfg, warned.append), clock=ticks(), warn=warned.append)
    one_release(recorder)
    recorder.close()
    assert warned == []
    posted = [body for path, _, body in server.received if path == "/fleet"]
    assert posted == EXPECTED
    [(_, headers, annotation)] = [r for r in server.received if r[0] == "/api/annotations"]
    assert annotation == {
        "time": 1_800_000_000_000,
        "timeEnd": 1_800_000_008_000,
        "tags": ["fleet", "deploy", "rolled-back"],
        "text": f"fleet deploy {RELEASE.id} by alice@laptop on web1, web2: rolled-back",
    }
    assert headers["Authorization"] == "Bearer glsa_t0k3n"
    assert headers["Content-Type"] == "application/json"
    assert all("Authorization" not in h for p, h, _ in server.received if p == "/fleet")


def test_an_annotation_names_at_most_twenty_hosts(server: Server) -> None:
    sink = AnnotationSink(HttpSink(server.url))
    names = [f"h{i}" for i in range(25)]
    event = dict(COMMON, event="release-end", time=stamp(9), result="deployed",
                 hosts=dict.fromkeys(names, "deployed"))  # fmt: skip
    sink.send(event)
    assert sink.close(time.monotonic() + 5) is None
    [(_, _, body)] = server.received
    assert body["time"] == body["timeEnd"] == 1_800_000_009_000
    assert body["text"].endswith(f"on {', '.join(names[:20])} and 5 more: deployed")


def test_a_redirect_is_not_followed_with_the_token(server: Server) -> None:
    server.status, server.location = 302, f"{server.url}/elsewhere"
    sink = HttpSink(f"{server.url}/api/annotations", "annotations", {"Authorization": "Bearer x"})
    sink.post({"text": "t"})
    warning = sink.close(time.monotonic() + 5)
    assert [path for path, _, _ in server.received] == ["/api/annotations"]
    assert warning == f"annotations: 1 of 1 not delivered to {server.url}/api/annotations: HTTP 302"


def test_a_slow_server_costs_the_rollout_at_most_the_bound(server: Server) -> None:
    server.delay = 5.0
    warned: list[str] = []
    recorder = Events(RELEASE, [HttpSink(f"{server.url}/fleet", timeout=1.0)], clock=ticks(),
                      warn=warned.append, flush_wait=1.0)  # fmt: skip
    started = time.monotonic()
    for _ in range(20):
        one_release(recorder)  # 180 events
    emitted = time.monotonic() - started
    recorder.close()
    closed = time.monotonic() - started
    assert emitted < 0.5, emitted  # nothing waits on the server while hosts are deployed
    assert closed < 1.0 + 0.5, closed  # then the flush's bound, and no more
    [warning] = warned
    assert warning.startswith(f"events: 180 of 180 not delivered to {server.url}/fleet: ")


def test_a_dead_server_is_one_warning_line() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/fleet"
    warned: list[str] = []
    recorder = Events(RELEASE, [HttpSink(url)], clock=ticks(), warn=warned.append)
    started = time.monotonic()
    one_release(recorder)
    recorder.close()
    assert time.monotonic() - started < events.FLUSH_WAIT + 0.5
    assert warned == [f"events: 9 of 9 not delivered to {url}: Connection refused"]


def test_a_full_queue_drops_events_instead_of_waiting(server: Server) -> None:
    server.delay = 2.0
    sink = HttpSink(f"{server.url}/fleet", capacity=3)
    started = time.monotonic()
    for i in range(50):
        sink.post({"n": i})
    assert time.monotonic() - started < 0.5
    warning = sink.close(time.monotonic() + 0.2)
    assert warning is not None and warning.startswith("events: 50 of 50 not delivered")


def test_a_missing_token_file_sends_no_annotation(tmp_path: Path) -> None:
    cfg = config.Config({"annotations": {"url": "https://grafana.example.org/api/annotations",
                                         "tokenFile": str(tmp_path / "absent")}}, ())  # fmt: skip
    warned: list[str] = []
    assert events.sinks(cfg, warned.append) == []
    assert warned == [
        f"annotations: {tmp_path / 'absent'}: No such file or directory; none is sent"
    ]


def test_a_release_that_ends_on_an_error_still_ends(tmp_path: Path, server: Server) -> None:
    path = tmp_path / "events.jsonl"
    cfg = config.Config({"events": {"file": str(path)},
                         "annotations": {"url": f"{server.url}/api/annotations"}}, ())  # fmt: skip
    with pytest.raises(KeyboardInterrupt), events.recording(cfg, RELEASE, ["web1"]) as recorder:
        recorder.phase_start(HostReport("web1"), "copy")
        raise KeyboardInterrupt
    found = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in found] == ["release-start", "phase-start", "release-end"]
    assert found[-1] | {"time": None} == COMMON | {
        "event": "release-end", "time": None, "result": "error", "exitCode": 130,
        "message": "KeyboardInterrupt"}  # fmt: skip
    [(_, _, annotation)] = server.received
    assert annotation["tags"] == ["fleet", "deploy", "error"]
    assert annotation["text"] == f"fleet deploy {RELEASE.id} by alice@laptop on web1: error"


# -- configuration ----------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg/fleet").mkdir(parents=True)
    (tmp_path / "flake").mkdir()
    (tmp_path / "flake/flake.nix").write_text("{ outputs = { self }: { }; }\n")
    return tmp_path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "events:\n  file: /tmp/x\n",
        "events:\n  url: https://logs.example.org/\n",
        "annotations:\n  url: https://grafana.example.org/api/annotations\n",
    ],
)
def test_a_checkout_may_not_choose_where_events_go(
    home: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "flake/fleet.yaml").write_text(text)
    with pytest.raises(UsageError) as exc:
        config.load(str(home / "flake"))
    key = text.split(":")[0]
    assert str(exc.value) == (
        f"{home / 'flake/fleet.yaml'}: key {key!r} may only be set in the operator's own "
        f"{home / 'xdg/fleet/config.yaml'}: a checkout must not choose it"
    )
    assert exc.value.exit_code == ExitCode.USAGE
    code, err = run_cli(["--flake", str(home / "flake"), "status"], capsys)
    assert code == 2 and err == f"fleet: {exc.value}\n"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://logs.example.org/",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "logs.example.org/fleet",
        "http://",
        "https://user:secret@grafana.example.org/api/annotations",
        "http://logs.example.org:port/",
        "http://logs example.org/",
        "http://logs.example.org/\n",
        5,
    ],
)
@pytest.mark.parametrize("key", ["events", "annotations"])
def test_an_event_url_is_http_or_https(
    home: Path, key: str, url: object, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "xdg/fleet/config.yaml").write_text(json.dumps({key: {"url": url}}))
    with pytest.raises(UsageError) as exc:
        config.load_user()
    assert f"key '{key}.url': expected an http or https URL without credentials" in str(exc.value)
    code, err = run_cli(["status"], capsys)
    assert code == 2 and err.startswith("fleet: ") and err.count("\n") == 1


def test_event_keys_are_checked_and_paths_made_absolute(home: Path) -> None:
    own = home / "xdg/fleet/config.yaml"
    own.write_text(
        "events:\n  file: fleet-events.jsonl\n  url: http://127.0.0.1:8686/fleet\n"
        "annotations:\n  url: https://grafana.example.org/api/annotations\n"
        "  tokenFile: ~/grafana-token\n"
    )
    cfg = config.load_user()
    assert cfg.get("events") == {
        "file": str(own.parent / "fleet-events.jsonl"),
        "url": "http://127.0.0.1:8686/fleet",
    }
    assert cfg.get("annotations")["tokenFile"] == str(Path("~/grafana-token").expanduser())
    for text, words in [
        ("annotations:\n  token: glsa_x\n", "unknown key 'annotations.token'"),
        ("annotations:\n  tokenFile: /t\n", "key 'annotations': expected"),
        ("events: {}\n", "key 'events': expected"),
        ("events: /var/log/fleet\n", "key 'events': expected a mapping"),
        ("events:\n  file: ''\n", "key 'events.file': expected a path"),
    ]:
        own.write_text(text)
        with pytest.raises(UsageError, match=words):
            config.load_user()


# -- a whole rollout against stand-ins for the hosts ------------------------------------

OLD = "/nix/store/" + "a" * 32 + "-nixos-system-1"
NEW = "/nix/store/" + "b" * 32 + "-nixos-system-2"


@dataclass
class FakeHost:
    """fleet-host's answers to each step, and what the tool sent with each; ``old``: a
    helper from before `begin --activate` and `--checks`, which refuses them."""

    name: str
    switch_exit: int = 0
    old: bool = False
    sent: list[tuple[str, Any]] = field(default_factory=list)
    argvs: list[list[str]] = field(default_factory=list)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "192.0.2.1")

    def command_line(self, argv: list[str]) -> str:
        return shlex.join(["ssh", "--", "192.0.2.1", shlex.join(argv)])

    def connect(self) -> None:
        pass

    def run(self, argv: list[str], *, input: str | None = None, **_: Any) -> Result:
        command = argv[1]
        if self.old and {"--activate", "--checks"} & set(argv):
            usage = "usage: fleet-host ...\nfleet-host: error: unrecognized arguments: --checks"
            return Result(tuple(argv), 2, "", usage)
        self.sent.append((command, json.loads(input) if input else None))
        self.argvs.append(argv)
        recorded = {"number": 1, "path": OLD}
        activation: dict[str, Any] = {
            "switchExit": self.switch_exit, "output": "", "settled": True, "failedUnits": [],
            "deadline": time.time() + 60, "checks": [], "seconds": 0.0}  # fmt: skip
        if "--checks" in argv and not self.switch_exit:
            activation["health"] = {"ok": True, "checks": [], "seconds": 0.0}
        answer: dict[str, Any] = {
            "state": {"current": 1, "running": OLD, "generations": [[1, 0, OLD]], "checks": []},
            "begin": {"begun": True, "recorded": recorded},
            "activate": activation,
            "commit": {"committed": True, "new": {"number": 2, "path": NEW}},
            "undo": {"undone": True, "recorded": recorded, "checks": [], "switch_exit": 0},
        }[command]  # fmt: skip
        if command == "begin" and "--activate" in argv:
            answer = answer | {"activation": activation}
        return Result(tuple(argv), 0, json.dumps(answer | {"ok": True}), "")


@dataclass
class FakeTransport:
    hosts: dict[str, FakeHost]

    def remote(self, endpoint: Endpoint, *, pinned: bool = False) -> FakeHost:
        return self.hosts[endpoint.name]

    @contextlib.contextmanager
    def hold(self, _remote: FakeHost) -> Iterator[None]:
        yield


def test_a_rollout_tells_every_phase_and_sends_its_timings_to_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """web1, the canary, deploys; web2 fails its switch and is undone; the release stops
    and web1 is reverted with it. Each switch locks, activates and proves in one call of the
    host's: one `activate` phase, its time split into the steps in the records."""
    monkeypatch.setattr("fleet.nix.copy_closure", lambda remote, *paths, **_how: None)
    fakes = {"web1": FakeHost("web1"), "web2": FakeHost("web2", switch_exit=4)}
    hosts = [Host(n, "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ()) for n in fakes]
    options = DeployOptions(parallel=1, canary=1, batch_size=10, max_failures=0,
                            health_timeout=10, confirm_timeout=5)  # fmt: skip
    path = tmp_path / "events.jsonl"
    recorder = Events(RELEASE, [FileSink(path)])
    progress = io.StringIO()
    rollout = Rollout(hosts, options, RELEASE, FakeTransport(fakes), Reporter(progress),
                      events=recorder)  # type: ignore[arg-type]  # fmt: skip
    recorder.release_start(list(fakes))  # as flows does, around the rollout
    report = rollout.run(dict.fromkeys(fakes, NEW), list(fakes))
    recorder.release_end(report)
    recorder.close()
    found = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e.get("host"), e.get("phase"), e.get("result")) for e in found] == [
        ("release-start", None, None, None),
        *[(kind, "web1", phase, result)
          for phase in ("connect", "copy", "activate", "confirm")
          for kind, result in (("phase-start", None), ("phase-end", "ok"))],
        ("host-end", "web1", None, "deployed"),
        *[(kind, "web2", phase, result)
          for phase, outcome in (("connect", "ok"), ("copy", "ok"), ("activate", "failed"),
                                 ("rollback", "ok"))
          for kind, result in (("phase-start", None), ("phase-end", outcome))],
        ("host-end", "web2", "activate", "rolled-back"),
        *[(kind, "web1", f"revert-{phase}", result)
          for phase in ("activate", "confirm")
          for kind, result in (("phase-start", None), ("phase-end", "ok"))],
        ("host-end", "web1", None, "rolled-back"),
        ("release-end", None, None, "rolled-back"),
    ]  # fmt: skip
    failed = next(e for e in found if e["event"] == "phase-end" and e["result"] == "failed")
    assert failed["host"] == "web2" and failed["message"].startswith("a unit failed to start")
    assert found[-1]["exitCode"] == 3 and found[-1]["hosts"] == {
        "web1": "rolled-back", "web2": "rolled-back"}  # fmt: skip
    # The records carry the phases the tool timed, up to the step that writes them.
    [first_commit, revert_commit] = [r for c, r in fakes["web1"].sent if c == "commit"]
    assert set(first_commit["timings"]) == {"connect", "copy", "lock", "activate", "health"}
    assert set(revert_commit["timings"]) == {"lock", "activate", "health"}
    [(_, undo)] = [(c, r) for c, r in fakes["web2"].sent if c == "undo"]
    assert set(undo["timings"]) == {"connect", "copy", "lock", "activate"}
    assert report.as_json()["hosts"]["web2"]["timings"].keys() >= undo["timings"].keys()
    # Where each host's transaction sits, for the report's timeline: its wave, its start.
    assert (first_commit["wave"], revert_commit["wave"], undo["wave"]) == (1, 1, 2)
    assert first_commit["started"] <= undo["started"] <= revert_commit["started"]
    # The failed host: what it attempted beside what it was restored to, and the step.
    web2 = report.as_json()["hosts"]["web2"]
    assert web2["attempted"]["path"] == NEW and web2["new"]["path"] == OLD
    # Its switch was begin's own call (`begin --activate`); the line to run again is the
    # activation alone (begin would start a transaction outside the tool).
    [begin] = [argv for argv in fakes["web2"].argvs if argv[1] == "begin"]
    assert "--activate" in begin
    token = begin[begin.index("--token") + 1]
    activate = [f"{NEW}/sw/bin/fleet-host", "activate", "--token", token, "--health", "10",
                "--confirm", "5"]  # fmt: skip
    assert web2["command"] == shlex.join(["ssh", "--", "192.0.2.1", shlex.join(activate)])
    assert report.as_json()["hosts"]["web1"]["command"] is None
    assert progress.getvalue().splitlines()[0] == "wave 1 of 2: web1"


def test_a_helper_from_before_one_call_is_driven_step_by_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It refuses `begin --activate` and `--checks` before doing anything: the tool begins,
    activates and makes the checks itself, as it did before them."""
    monkeypatch.setattr("fleet.nix.copy_closure", lambda remote, *paths, **_how: None)
    fake = FakeHost("web1", old=True)
    hosts = [Host("web1", "192.0.2.1", 22, "root", (), "x86_64-linux", None, (), ())]
    options = DeployOptions(parallel=1, canary=1, batch_size=10, max_failures=0,
                            health_timeout=10, confirm_timeout=5)  # fmt: skip
    rollout = Rollout(hosts, options, RELEASE, FakeTransport({"web1": fake}),
                      Reporter(io.StringIO()))  # type: ignore[arg-type]  # fmt: skip
    report = rollout.run({"web1": NEW}, ["web1"])
    [host] = report.reports
    assert host.result.value == "deployed", host.message
    assert [c for c, _ in fake.sent] == ["begin", "activate", "commit"]
    assert set(host.timings) == {"connect", "copy", "lock", "activate", "health", "confirm"}
