"""Traffic behind HAProxy: the inventory's `traffic`, the one haproxy.cfg generator
(fleet/nix/haproxy.nix, checked with HAProxy's own parser and run against real
instances), the balancers' and the instances' host configurations, and discovery through
the balancers."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fleet.inventory import Balanced, CheckType, Instance, parse
from tests.nix.conftest import FIXTURES, Nix, nix_path

HOST_VIEW = """
let c = h.hostConfig f {host}; in {{
  haproxy = {{ inherit (c.services.haproxy) enable config; }};
  ports = c.networking.firewall.allowedTCPPorts;
  iptables = c.networking.firewall.extraCommands;
  stop = c.networking.firewall.extraStopCommands;
  nftables = c.networking.firewall.extraInputRules;
  sockets = c.systemd.sockets;
  agent = c.systemd.services."fleet-agent@" or null;
  agentUnit = c.systemd.services."fleet-agent@".unitConfig or null;
  env = builtins.mapAttrs (_: u: u.environment) c.systemd.services;
  manifest = builtins.fromJSON c.environment.etc."fleet/manifest.json".text;
  inherit (c) warnings failedAssertions;
}}
"""

HOSTS = ["lb1", "app1", "db1", "v6"]
BALANCERS = ["10.0.0.31", "10.0.0.32"]
FLEET = ["10.0.0.11", "10.0.0.12", "10.0.0.21", *BALANCERS, "2001:db8::41"]
SOCKET = "  stats socket /run/haproxy/admin.sock mode 600 level admin"

# What nixpkgs' services.haproxy puts before `config` (its hot-reload socket).
NIXOS_PREFIX = (
    "global\n"
    "  # needed for hot-reload to work without dropping packets in multi-worker mode\n"
    "  stats socket /run/haproxy/haproxy.sock mode 600 expose-fd listeners level user\n\n"
)


def views(nix: Nix, fleet: str) -> dict[str, Any]:
    body = " ".join(f"{n} = {HOST_VIEW.format(host=json.dumps(n))};" for n in HOSTS)
    return nix.eval(  # type: ignore[no-any-return]
        f"let f = {fleet}; b = f.config.build; in {{ hosts = {{ {body} }}; "
        "inherit (b) inventory services problems; "
        'generated = import (h.repo + "/fleet/nix/haproxy.nix") b.inventory.traffic; }'
    )


@pytest.fixture(scope="module")
def fixture(nix: Nix) -> dict[str, Any]:
    return views(nix, nix.fleet("traffic.nix"))


@pytest.fixture(scope="module")
def nftables(nix: Nix) -> dict[str, Any]:
    return views(
        nix,
        f"""(h.evalFleet [ {{
          imports = [ {nix_path(FIXTURES / "traffic.nix")} ];
          hosts = h.lib.genAttrs [ "lb1" "app1" "db1" "v6" ] (_: {{
            modules = [ {{ networking.nftables.enable = true; }} ];
          }});
        }} ])""",
    )


@pytest.fixture(scope="module")
def example(nix: Nix) -> dict[str, Any]:
    return nix.eval(  # type: ignore[no-any-return]
        "let b = h.example.config.build; in { inherit (b) inventory services; "
        'config = (h.planConfig h.example "lb1").services.haproxy.config; '
        'lb2 = (h.planConfig h.example "lb2").services.haproxy.config; }'
    )


def generate(nix: Nix, traffic: dict[str, Any], tmp_path: Path) -> str:
    source = tmp_path / "traffic.json"
    source.write_text(json.dumps(traffic))
    return nix.eval(  # type: ignore[no-any-return]
        'import (h.repo + "/fleet/nix/haproxy.nix") '
        f"(builtins.fromJSON (builtins.readFile {nix_path(source)}))"
    )


def section(config: str, header: str) -> list[str]:
    """The lines of one section of haproxy.cfg, indentation removed."""
    blocks = [
        [line for line in block.splitlines() if not line.startswith("#")]
        for block in config.split("\n\n")
    ]
    [block] = [b for b in blocks if b[0] == header]
    return [line.strip() for line in block[1:]]


# The inventory.


def test_the_inventory_says_what_the_balancers_serve(fixture: dict[str, Any]) -> None:
    assert fixture["problems"] == []
    traffic = fixture["inventory"]["traffic"]
    assert {k: v for k, v in traffic.items() if k != "services"} == {
        "agentPort": 9777,
        "drainTimeout": 30,
        "socket": "/run/haproxy/admin.sock",
        "balancers": ["lb1", "lb2"],
        "metricsPort": None,  # no monitoring host
    }
    services = traffic["services"]
    assert sorted(services) == ["api", "batch", "cache", "store"]
    assert {k: v for k, v in services["api"].items() if k != "check"} == {
        "mode": "http",
        "port": 80,
        "maxUnavailable": 1,  # "50%" of two instances
        "instances": {
            "app1": {"address": "10.0.0.11", "port": 8080},
            "app2": {"address": "10.0.0.12", "port": 8080},
        },
    }
    assert services["store"]["instances"] == {"v6": {"address": "2001:db8::41", "port": 9200}}
    assert (services["batch"]["mode"], services["batch"]["maxUnavailable"]) == ("tcp", 2)
    assert services["batch"]["check"] is None


def test_a_balanced_check_is_the_hosts_check(fixture: dict[str, Any]) -> None:
    hosts = fixture["inventory"]["hosts"]
    services = fixture["inventory"]["traffic"]["services"]
    assert services["api"]["check"] == hosts["app1"]["checks"][0]
    assert services["cache"]["check"] == hosts["db1"]["checks"][0]
    assert services["store"]["check"] == hosts["v6"]["checks"][0]


def test_the_inventory_parses_into_traffic(fixture: dict[str, Any]) -> None:
    traffic = parse(fixture["inventory"], "tests/nix/fixtures/traffic.nix").traffic
    assert traffic is not None
    assert (traffic.agent_port, traffic.drain_timeout) == (9777, 30.0)
    assert traffic.balancers == ("lb1", "lb2")
    api = traffic.services["api"]
    assert isinstance(api, Balanced)
    assert api.instances == (
        Instance("app1", "10.0.0.11", 8080),
        Instance("app2", "10.0.0.12", 8080),
    )
    assert api.check is not None and api.check.type is CheckType.HTTP
    assert api.check.expect_body == 'say "ok" # $HOME \\ done'
    assert traffic.services["batch"].check is None


def test_without_an_ingress_there_is_no_traffic(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "base.nix")} {{
      hosts.lb1 = {{ address = "10.0.0.31"; tags = [ "balancer" ]; }};
    }} ])"""
    result = nix.eval(
        f'let f = {fleet}; c = h.hostConfig f "lb1"; a = h.hostConfig f "app1"; in '
        "{ traffic = f.config.build.inventory.traffic; haproxy = c.services.haproxy.enable; "
        "sockets = a.systemd.sockets; }"
    )
    assert result == {"traffic": None, "haproxy": False, "sockets": {}}


SHARES = [
    (None, 4, 1),
    (3, 2, 3),
    ('"50%"', 2, 1),
    ('"100%"', 2, 2),
    ('"75%"', 4, 3),
    ('"25%"', 2, 1),  # a quarter of two is none: at least one
    ('"1%"', 150, 1),
]


@pytest.mark.parametrize(("value", "instances", "expected"), SHARES)
def test_max_unavailable_is_resolved_against_the_instances(
    nix: Nix, value: str | int | None, instances: int, expected: int
) -> None:
    given = "" if value is None else f"maxUnavailable = {value};"
    resolved = nix.eval(
        f"""(import (h.repo + "/fleet/nix/inventory.nix") {{
          hosts.a.address = "192.0.2.1";
          traffic = {{
            balancers = [ "a" ];
            services.s = {{
              port = 80; {given}
              instances = builtins.listToAttrs (builtins.genList (i: {{
                name = "h${{toString i}}"; value = {{ address = "192.0.2.9"; port = 8080; }};
              }}) {instances});
            }};
          }};
        }}).traffic.services.s.maxUnavailable"""
    )
    assert resolved == expected


def test_a_bad_share_fails_evaluation_naming_the_option(nix: Nix) -> None:
    error = nix.error(
        f"(h.evalFleet [ {nix_path(FIXTURES / 'traffic.nix')} "
        '{ services.api.ingress.maxUnavailable = h.lib.mkForce "150%"; } ]).config.build.inventory'
    )
    assert "services.api.ingress.maxUnavailable" in error


# Discovery.


def test_a_dependency_with_an_ingress_is_found_through_the_balancers(
    fixture: dict[str, Any],
) -> None:
    through = ["10.0.0.31:6379", "10.0.0.32:6379"]
    assert fixture["services"]["api"]["dependencies"] == {"cache": through}
    app1 = fixture["hosts"]["app1"]
    assert app1["env"]["fleet-api"]["FLEET_CACHE_ADDRS"] == ",".join(through)
    assert app1["manifest"]["services"]["api"]["dependencies"] == {"cache": through}
    # Its own view still lists the instances.
    assert fixture["services"]["cache"]["addresses"] == ["10.0.0.21:6379"]


def test_an_ipv6_balancer_is_written_with_brackets(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "traffic.nix")} {{
      hosts.lb2.address = h.lib.mkForce "2001:db8::32";
    }} ])"""
    dependencies = nix.eval(f"{fleet}.config.build.services.api.dependencies")
    assert dependencies == {"cache": ["10.0.0.31:6379", "[2001:db8::32]:6379"]}


# The generator.


def test_the_runtime_api_is_a_root_only_socket(fixture: dict[str, Any]) -> None:
    config = fixture["generated"]
    assert section(config, "global")[0] == SOCKET.strip()
    assert config.count("stats socket") == 1
    # No statistics page or port of any kind.
    assert "stats enable" not in config and "stats uri" not in config
    assert "listen " not in config


def test_the_defaults(fixture: dict[str, Any]) -> None:
    defaults = section(fixture["generated"], "defaults")
    for line in [
        "timeout connect 2s",
        "timeout client 30s",
        "timeout server 30s",
        "timeout check 2s",
        "retries 3",
        "option redispatch 1",
    ]:
        assert line in defaults


def test_an_http_service(fixture: dict[str, Any]) -> None:
    config = fixture["generated"]
    assert section(config, "frontend api") == [
        "mode http",
        "bind :80",
        "option httplog",
        "option forwardfor",
        "default_backend api",
    ]
    agent = 'agent-check agent-port 9777 agent-inter 1s agent-send "api\\n"'
    assert section(config, "backend api") == [
        "mode http",
        "balance roundrobin",
        "retry-on conn-failure empty-response response-timeout",
        "option httpchk",
        # `\`, `"` and `$` escaped within double quotes; `#` is safe there.
        'http-check send meth GET uri "/health?q=\\"a\\\\b\\"\\$HOME#top"',
        "http-check expect status 200",
        'http-check expect string "say \\"ok\\" # \\$HOME \\\\ done"',
        "timeout check 5000ms",
        f"server app1 10.0.0.11:8080 check inter 1s fall 2 rise 2 weight 100 {agent}",
        f"server app2 10.0.0.12:8080 check inter 1s fall 2 rise 2 weight 100 {agent}",
    ]


def test_a_tcp_service_is_checked_by_connecting(fixture: dict[str, Any]) -> None:
    config = fixture["generated"]
    assert section(config, "frontend cache")[:3] == ["mode tcp", "bind :6379", "option tcplog"]
    backend = section(config, "backend cache")
    assert backend[:3] == ["mode tcp", "balance roundrobin", "timeout check 5000ms"]
    assert not any(line.startswith(("retry-on", "option httpchk")) for line in backend)
    assert backend[3].startswith("server db1 10.0.0.21:6379 check inter 1s")


def test_a_service_without_a_check_is_checked_by_connecting(fixture: dict[str, Any]) -> None:
    backend = section(fixture["generated"], "backend batch")
    assert backend[:2] == ["mode tcp", "balance roundrobin"]
    assert [line.split()[:4] for line in backend[2:]] == [
        ["server", "app1", "10.0.0.11:7000", "check"],
        ["server", "app2", "10.0.0.12:7000", "check"],
    ]


def test_an_ipv6_instance_and_a_check_on_another_port(fixture: dict[str, Any]) -> None:
    backend = section(fixture["generated"], "backend store")
    assert 'http-check send meth GET uri "/_ping"' in backend
    assert "timeout check 500ms" in backend
    assert backend[-1].startswith("server v6 [2001:db8::41]:9200 check port 9300 inter 1s")


def test_control_characters_are_escaped(nix: Nix, tmp_path: Path) -> None:
    traffic = traffic_for([("a", "192.0.2.1", 8080)], "/", "a\nb\tc\x7fd\u00e9")
    backend = section(generate(nix, traffic, tmp_path), "backend api")
    assert 'http-check expect string "a\\x0ab\\x09c\\x7fd\u00e9"' in backend


def traffic_for(
    instances: list[tuple[str, str, int]],
    path: str,
    body: str | None,
    *,
    port: int = 80,
    agent_port: int = 9777,
    socket_path: str = "/run/haproxy/admin.sock",
) -> dict[str, Any]:
    """A normalised `traffic` with one HTTP service, `api`, on these instances."""
    return {
        "agentPort": agent_port,
        "drainTimeout": 30,
        "socket": socket_path,
        "balancers": ["lb"],
        "services": {
            "api": {
                "mode": "http",
                "port": port,
                "maxUnavailable": 1,
                "instances": {h: {"address": a, "port": p} for h, a, p in instances},
                "check": {
                    "name": "api",
                    "service": "api",
                    "type": "http",
                    "port": instances[0][2],
                    "path": path,
                    "expectStatus": 200,
                    "expectBody": body,
                    "timeout": 2,
                    "interval": 1,
                    "retries": 3,
                },
            }
        },
    }


REFUSED = {
    "service name": lambda t: t["services"].update({"bad name": t["services"].pop("api")}),
    "host name": lambda t: t["services"]["api"]["instances"].update(
        {"a b": {"address": "192.0.2.2", "port": 1}}
    ),
    "address": lambda t: t["services"]["api"]["instances"]["a"].update(address="192.0.2.1 x"),
    "bracketed address": lambda t: t["services"]["api"]["instances"]["a"].update(
        address="[2001:db8::1]"
    ),
    "port": lambda t: t["services"]["api"]["instances"]["a"].update(port=0),
    "socket path": lambda t: t.update(socket="run/haproxy.sock"),
    "socket path with ..": lambda t: t.update(socket="/run/../etc/admin.sock"),
    "mode": lambda t: t["services"]["api"].update(mode="udp"),
    "health check path": lambda t: t["services"]["api"]["check"].update(path="/a b"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_written_safely_is_refused(nix: Nix, tmp_path: Path, case: str) -> None:
    traffic = traffic_for([("a", "192.0.2.1", 8080)], "/", None)
    REFUSED[case](traffic)
    source = tmp_path / "traffic.json"
    source.write_text(json.dumps(traffic))
    error = nix.error(
        'import (h.repo + "/fleet/nix/haproxy.nix") '
        f"(builtins.fromJSON (builtins.readFile {nix_path(source)}))"
    )
    assert "fleet/nix/haproxy.nix:" in error and "cannot be written in haproxy.cfg" in error


# HAProxy's own parser, and HAProxy itself.


@pytest.fixture(scope="module")
def haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    return found


def haproxy_check(haproxy: str, config: str, tmp_path: Path, *flags: str) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    result = subprocess.run(
        [haproxy, "-c", *flags, "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_takes_the_examples_configuration(
    haproxy: str, example: dict[str, Any], tmp_path: Path
) -> None:
    config = example["config"]
    assert config == example["lb2"]
    assert "frontend api" in config and "server app1 192.0.2.11:8080 check" in config
    # -dW: a warning is an error too.
    haproxy_check(haproxy, config, tmp_path, "-dW")
    haproxy_check(haproxy, NIXOS_PREFIX + config, tmp_path, "-dW")


def test_haproxy_takes_the_fixtures_configuration(
    haproxy: str, fixture: dict[str, Any], tmp_path: Path
) -> None:
    config = fixture["hosts"]["lb1"]["haproxy"]["config"]
    assert config == fixture["generated"]
    haproxy_check(haproxy, config, tmp_path, "-dW")
    haproxy_check(haproxy, NIXOS_PREFIX + config, tmp_path, "-dW")


def test_an_instance_known_by_a_name_that_does_not_resolve_is_down_not_fatal(
    nix: Nix, haproxy: str, tmp_path: Path
) -> None:
    traffic = traffic_for([("a", "app1.invalid", 8080)], "/health", "ok")
    haproxy_check(haproxy, generate(nix, traffic, tmp_path), tmp_path)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def serving(server: Any) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


PATH = '/health?q="a\\b"$HOME'
BODY = 'say "ok" # $HOME \\ done\n'


class Instance6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Handler(http.server.BaseHTTPRequestHandler):
    """An instance: 200 and BODY on PATH only; it remembers what it was asked."""

    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        Handler.seen.append((self.path, self.headers.get("X-Forwarded-For")))
        found = self.path == PATH
        body = BODY.encode() if found else b"not here"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Agent:
    """A host's agent: answers each balancer's line with `answer`, remembers the lines."""

    def __init__(self, host: str, port: int, answer: str) -> None:
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen()
        self.answer = answer
        self.lines: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.lines.append(conn.recv(256))
                conn.sendall(self.answer.encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


def servers_state(sock: Path) -> dict[str, dict[str, str]]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(b"show servers state api\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = next(line for line in lines if line.startswith("# be_id")).split()[1:]
    rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line]
    return {row["srv_name"]: row for row in rows}


def test_haproxy_balances_checks_and_asks_the_agent(nix: Nix, haproxy: str, tmp_path: Path) -> None:
    """The generated configuration, run: HAProxy finds both instances (one over IPv6)
    healthy with the escaped path and body, sends the agent the service's line, takes its
    weight, and passes a request through with X-Forwarded-For."""
    v6 = ipv6_loopback()
    port = free_port()
    instances = [("v4", "127.0.0.1", port)] + ([("v6", "::1", port)] if v6 else [])
    frontend, agent_port = free_port(), free_port()
    sock = tmp_path / "admin.sock"
    if len(str(sock)) > 100:
        pytest.skip(f"{sock}: too long a path for a unix socket")
    traffic = traffic_for(instances, PATH, BODY, port=frontend, agent_port=agent_port)
    # The generator takes sockets in /run/haproxy only; this HAProxy runs as the test.
    config = generate(nix, traffic, tmp_path)
    assert SOCKET in config
    (tmp_path / "haproxy.cfg").write_text(
        config.replace(SOCKET, f"  stats socket {sock} mode 600 level admin")
    )
    Handler.seen = []
    with contextlib.ExitStack() as stack:
        agents = [Agent(address, agent_port, "ready 50%") for _, address, _ in instances]
        for agent in agents:
            stack.callback(agent.close)
        log = stack.enter_context((tmp_path / "haproxy.log").open("w"))
        stack.enter_context(serving(http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)))
        if v6:
            stack.enter_context(serving(Instance6Server(("::1", port), Handler)))
        proxy = subprocess.Popen(
            [haproxy, "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=log
        )
        stack.callback(proxy.wait, 10)
        stack.callback(proxy.terminate)
        wanted = {name: ("2", "50") for name, _, _ in instances}
        state: dict[str, tuple[str, str]] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and state != wanted:
            time.sleep(0.2)
            assert proxy.poll() is None, (tmp_path / "haproxy.log").read_text()
            with contextlib.suppress(OSError, StopIteration):
                rows = servers_state(sock)
                state = {n: (r["srv_op_state"], r["srv_uweight"]) for n, r in rows.items()}
        # 2: up; 50: the agent's "ready 50%" of weight 100.
        assert state == wanted, (tmp_path / "haproxy.log").read_text()
        assert {line for agent in agents for line in agent.lines} == {b"api\n"}
        assert (PATH, None) in Handler.seen  # the check, with the path as declared
        with socket.create_connection(("127.0.0.1", frontend), timeout=5) as client:
            client.sendall(b"GET " + PATH.encode() + b" HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(BODY.encode())
        assert (PATH, "127.0.0.1") in Handler.seen


# The hosts.


def test_a_balancer_runs_haproxy_with_the_generated_configuration(
    fixture: dict[str, Any],
) -> None:
    lb1 = fixture["hosts"]["lb1"]
    assert lb1["haproxy"] == {"enable": True, "config": fixture["generated"]}
    # The frontends, to everyone: they are the services' entry points.
    assert sorted(lb1["ports"]) == [80, 6379, 7000, 9200]
    # A balancer that runs no balanced instance has no agent.
    assert lb1["sockets"] == {} and lb1["agent"] is None
    assert lb1["failedAssertions"] == [] and lb1["warnings"] == []


def test_an_instances_host_runs_the_agent(fixture: dict[str, Any]) -> None:
    app1 = fixture["hosts"]["app1"]
    assert app1["haproxy"] == {"enable": False, "config": None}
    assert app1["ports"] == []
    assert app1["sockets"] == {
        "fleet-agent": {
            "description": "fleet agent, asked by the balancers",
            "wantedBy": ["sockets.target"],
            "listenStreams": ["9777"],
            "socketConfig": {
                "Accept": True,
                "MaxConnections": 64,
                "IPAddressAllow": BALANCERS,
                "IPAddressDeny": "any",
            },
        }
    }
    config = app1["agent"]["serviceConfig"]
    expected = {
        "ExecStart": "/run/current-system/sw/bin/fleet-host agent",
        "StandardInput": "socket",
        "StandardOutput": "socket",
        "RuntimeMaxSec": 5,
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": True,
        "PrivateNetwork": True,
        "RestrictAddressFamilies": "none",
        "ProtectSystem": "strict",
        "ProtectHome": True,
    }
    assert {k: config.get(k) for k in expected} == expected
    # Root, for the root-only deploy state: no User, no DynamicUser.
    assert "User" not in config and "DynamicUser" not in config
    # A failed instance never stays failed: it would fail every deploy's health check.
    assert app1["agentUnit"] == {"CollectMode": "inactive-or-failed"}
    assert app1["failedAssertions"] == [] and app1["warnings"] == []
    for host in ("db1", "v6"):
        assert "fleet-agent" in fixture["hosts"][host]["sockets"], host


def iptables(port: int, sources: list[str]) -> list[str]:
    return [
        f"{'ip6tables' if ':' in s else 'iptables'} -w -A nixos-fw -p tcp --dport {port} "
        f"-s {s} -j nixos-fw-accept"
        for s in sources
    ]


def test_the_agent_and_the_balanced_ports_are_open_to_the_balancers(
    fixture: dict[str, Any],
) -> None:
    rules = fixture["hosts"]["app1"]["iptables"].splitlines()
    assert rules == [
        "# fleet service api",
        *iptables(8080, FLEET),
        # allowFrom = [ ]: nobody but the balancers, which send it its traffic.
        "# fleet service batch",
        *iptables(7000, BALANCERS),
        "# fleet agent",
        *iptables(9777, BALANCERS),
    ]
    stop = fixture["hosts"]["app1"]["stop"]
    assert "iptables -w -D nixos-fw -p tcp --dport 9777 -s 10.0.0.31" in stop
    manifest = fixture["hosts"]["app1"]["manifest"]["services"]
    assert manifest["batch"]["allowFrom"] == BALANCERS


def test_the_agent_with_nftables(nftables: dict[str, Any]) -> None:
    rules = nftables["hosts"]["app1"]["nftables"].splitlines()
    assert [r for r in rules if "fleet agent" in r] == [
        f'ip saddr {b} tcp dport 9777 accept comment "fleet agent"' for b in BALANCERS
    ]
    assert 'ip saddr 10.0.0.31 tcp dport 7000 accept comment "fleet service batch"' in rules
    assert nftables["hosts"]["app1"]["iptables"] == ""


def test_balancers_known_by_name_get_a_warning(nix: Nix) -> None:
    fleet = f"""(h.evalFleet [ {nix_path(FIXTURES / "traffic.nix")} {{
      hosts.lb2.address = h.lib.mkForce "lb2.example.org";
    }} ])"""
    app1 = nix.eval(
        f'let c = h.hostConfig {fleet} "app1"; in {{ inherit (c) warnings; '
        "allow = c.systemd.sockets.fleet-agent.socketConfig.IPAddressAllow; }"
    )
    assert app1["allow"] == ["10.0.0.31"]
    assert [w for w in app1["warnings"] if "fleet agent" in w] == [
        "fleet: host app1: the fleet agent's port is open to the balancers, but the firewall "
        "cannot match DNS names (lb2.example.org): those balancers cannot ask it, and keep this "
        "host's instances in rotation while a deploy changes them; declare the balancers by IP "
        "address."
    ]
