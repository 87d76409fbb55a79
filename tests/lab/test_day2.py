"""generations, health, diff, gc, exec, report and operator configuration, on the lab."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time

import pytest

from fleet import health
from fleet.inventory import Check, CheckType
from fleet.lab import ops
from tests.browser import dump_dom, needs_chromium
from tests.lab.fleetrun import faulted, host_states, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


def test_generations_mark_running_booted_current(lab):
    code, data, err = run_fleet(lab, "generations", "lab1")
    assert code == 0, err
    rows = data["hosts"]["lab1"]
    state = host_states(lab)["lab1"]
    [current] = [r for r in rows if r["current"]]
    assert current["number"] == state.current and current["running"]
    assert any(r["booted"] for r in rows)


def test_health_and_exec(lab):
    code, data, err = run_fleet(lab, "health")
    assert code == 0 and all(h["healthy"] for h in data["hosts"].values()), err
    code, data, err = run_fleet(lab, "exec", "lab2", "--", "systemctl", "stop", "lab-web")
    assert code == 0, err
    try:
        code, data, _ = run_fleet(lab, "health", "--health-timeout", "2")
        assert code == 4
        assert not data["hosts"]["lab2"]["healthy"] and data["hosts"]["lab1"]["healthy"]
    finally:
        run_fleet(lab, "exec", "lab2", "--", "systemctl", "start", "lab-web")
    tricky = 'it\'s; $(not run) `x` "q"'
    code, data, err = run_fleet(lab, "exec", "@odd", "--", "printf", "%s", tricky)
    assert code == 0, err
    assert {h: r["stdout"] for h, r in data["hosts"].items()} == {"lab1": tricky, "lab3": tricky}
    code, data, _ = run_fleet(lab, "exec", "--", "sh", "-c", 'test "$(hostname)" != lab2')
    assert code == 1
    assert {h: r["exitCode"] for h, r in data["hosts"].items()} == {"lab1": 0, "lab2": 1, "lab3": 0}


def test_diff_shows_the_package_that_changes(lab):
    set_release(lab, "7.1")
    code, data, err = run_fleet(lab, "diff", "lab3")
    assert code == 0, err
    [change] = data["hosts"]["lab3"]
    assert change["package"] == "lab-system-lab3" and change["new"] == ["7.1"]
    assert change["change"] == "changed"


def test_gc_keeps_the_rollback_target(lab):
    for version in ("gc1", "gc2", "gc3"):
        set_release(lab, version)
        code, _, err = run_fleet(lab, "deploy", "lab2", "--canary", "0")
        assert code == 0, err
    before = host_states(lab)["lab2"]
    code, data, err = run_fleet(lab, "gc", "lab2", "--keep", "1")
    assert code == 0, err
    after = host_states(lab)["lab2"]
    kept = {g.number for g in after.generations}
    assert kept == {before.current, before.current - 1} | {
        g.number for g in before.generations if g.path == before.booted
    }
    assert data["hosts"]["lab2"]["deleted"]
    code, report, err = run_fleet(lab, "rollback", "lab2", "--yes")
    assert code == 0, err
    assert report["hosts"]["lab2"]["new"]["number"] == before.current - 1


@needs_chromium
def test_html_report_shows_hosts_and_releases_in_a_browser(lab, tmp_path):
    page = tmp_path / "report.html"
    code, _, err = run_fleet(lab, "report", "--html", str(page))
    assert code == 0, err
    dom = dump_dom(page, tmp_path / "profile")
    assert "3 of 3 hosts reachable and healthy" in dom
    for host in ("lab1", "lab2", "lab3"):
        assert f'data-host="{host}"' in dom
    assert "Recent releases" in dom and "Recent rollouts" in dom
    assert "<script" not in page.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: red\n", "unknown key 'colour'"),
        ("parallel: many\n", "key 'parallel': expected a whole number of hosts"),
        ("- a list\n", "expected a mapping"),
        ("parallel: [\n", "not valid YAML"),
    ],
)
def test_bad_operator_config_is_refused_by_name(lab, tmp_path, text, message):
    (tmp_path / "fleet").mkdir()
    config = tmp_path / "fleet" / "config.yaml"
    config.write_text(text)
    before = host_states(lab)
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    code, _, err = run_fleet(lab, "deploy", env=env)
    assert code == 2
    [line] = err.strip().splitlines()
    assert str(config) in line and message in line
    assert host_states(lab) == before


class SlowRelay:
    """A TCP relay on 127.0.0.1 to a lab host's sshd that holds every chunk back for
    ``delay`` seconds: a slow or distant link, a jump host far away."""

    def __init__(self, address: str, port: int, delay: float) -> None:
        self.target, self.delay = (address, port), delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(self.delay)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_tcp_checks_over_a_slow_link_prove_the_connection(lab):
    """A closed port fails and an open one passes even when the link takes longer than any
    timer the tool could guess to answer."""
    endpoint = ops.endpoints(lab)[0]
    relay = SlowRelay(endpoint.address, endpoint.port, delay=0.6)
    try:
        slow = dataclasses.replace(endpoint, address="127.0.0.1", port=relay.port)
        with ops.transport(lab) as transport:
            remote = transport.remote(slow)
            web = Check("web", None, CheckType.TCP, timeout=2, interval=0.2, retries=1, port=8080)
            closed = dataclasses.replace(web, name="closed", port=9)
            verdict = health.run_checks(remote, [web, closed], time.monotonic() + 60)
    finally:
        relay.close()
    found = {c.name: c for c in verdict.checks}
    assert found["web"].ok and found["web"].message == "connected"
    assert not found["closed"].ok and "refused" in found["closed"].message.lower()


def test_every_check_kind_fails_and_passes(lab, lab_remotes):
    """Each kind of check, against the lab's real service, passes when it should and fails
    when it should, in its own words, within its time-out."""
    http = Check("http", None, CheckType.HTTP, timeout=2, interval=0.2, retries=1, port=8080,
                 path="/health", expect_status=200, expect_body="ok")  # fmt: skip
    tcp = Check("tcp", None, CheckType.TCP, timeout=2, interval=0.2, retries=1, port=8080)
    command = Check("command", None, CheckType.COMMAND, timeout=5, interval=0.2, retries=1,
                    command=("systemctl", "is-active", "lab-web.service"))  # fmt: skip
    cases = {
        http: (True, "HTTP 200"),
        dataclasses.replace(http, name="http-status", path="/nowhere"): (False, "HTTP 404"),
        dataclasses.replace(http, name="http-body", expect_body="elsewhere"): (False, "lacks"),
        dataclasses.replace(http, name="http-closed", port=9): (False, ""),
        tcp: (True, "connected"),
        dataclasses.replace(tcp, name="tcp-closed", port=9): (False, "refused"),
        command: (True, "exit 0"),
        dataclasses.replace(
            command, name="command-failing", command=("systemctl", "is-active", "nothing.service")
        ): (False, "exit 3"),
        dataclasses.replace(command, name="command-hung", timeout=2, command=("sleep", "60")): (
            False,
            "no exit within 2 s",
        ),
    }
    start = time.monotonic()
    verdict = health.run_checks(lab_remotes["lab1"], list(cases), time.monotonic() + 30)
    assert time.monotonic() - start < 20
    found = {c.name: c for c in verdict.checks}
    for check, (ok, words) in cases.items():
        result = found[check.name]
        assert result.ok is ok, (check.name, result)
        assert words.lower() in result.message.lower(), (check.name, result.message)
    assert not verdict.ok
    # The host stopped the hung command; nothing of it is left there.
    left = lab_remotes["lab1"].run(["pgrep", "-f", "^sleep 60$"], check=False)
    assert left.returncode == 1, left.stdout


def test_tcp_checks_are_made_by_the_host(lab, lab_remotes):
    """A TCP check is a connection the host proves, never a channel left open."""
    web = Check("web", None, CheckType.TCP, timeout=2, interval=0.2, retries=1, port=8080)
    closed = dataclasses.replace(web, name="closed", port=9)
    verdict = health.run_checks(lab_remotes["lab1"], [web, closed], time.monotonic() + 20)
    found = {c.name: c for c in verdict.checks}
    assert found["web"].ok and found["web"].message == "connected"
    assert not found["closed"].ok and "refused" in found["closed"].message.lower()
    assert not verdict.ok


def test_an_unreachable_host_needs_attention_in_exec_and_report(lab, tmp_path):
    """Exit 4, as every command says of a host it could not reach; the JSON names it."""
    with faulted(lab, "lab3", ops.Fault.PARTITION):
        code, data, err = run_fleet(lab, "exec", "--", "true", timeout=120)
        assert code == 4, err
        assert set(data["unreachable"]) == {"lab3"} and set(data["hosts"]) == {"lab1", "lab2"}
        code, data, err = run_fleet(lab, "report", "--html", str(tmp_path / "r.html"))
        assert code == 4, err
        assert data["attention"] == ["lab3"] and (tmp_path / "r.html").exists()
