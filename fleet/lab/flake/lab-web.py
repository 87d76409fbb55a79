#!/usr/bin/python3
"""The lab's service: answers its release on /version and its health on /health.

--start-delay S sleeps before it is ready, as a slow service does;
--broken start exits before telling systemd it is ready (the unit fails to start);
--broken health starts fine but answers 503 on /health;
--secret NAME answers the SHA-256 of its credential NAME on /secret;
--extra-port P also accepts connections on P (a second service, for a TCP check);
--healthy-after S answers 503 on /health for S seconds after it is ready (a service that
warms up);
--sick-after S answers 503 on /health and 500 on /version from S seconds after it is ready
(a release that passes its first checks, then fails under traffic);
--error-rate N answers 500 on N of every 100 requests for /version, and stays healthy (a
release whose health check passes while it fails a share of its clients).
GET /slow/N answers its release after N seconds (at most 120): a long-lived session.
GET /metrics answers Prometheus' text format: the requests served (other than /health and
/metrics) by status code, their durations as a histogram, and the release.
"""

import argparse
import errno
import hashlib
import itertools
import os
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.sendall(message.encode())


# Upper bounds of the request duration histogram, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """What a service's clients saw: the counts a canary's analysis asks about."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.buckets = [0] * len(BUCKETS)
        self.count = 0
        self.total = 0.0

    def observe(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1
            self.count += 1
            self.total += seconds

    def text(self) -> str:
        with self.lock:
            lines = [
                "# HELP lab_web_requests_total Requests answered, by HTTP status code.",
                "# TYPE lab_web_requests_total counter",
                *(
                    f'lab_web_requests_total{{code="{c}"}} {n}'
                    for c, n in sorted(self.requests.items())
                ),
                "# HELP lab_web_request_duration_seconds Time to answer a request.",
                "# TYPE lab_web_request_duration_seconds histogram",
                *(
                    f'lab_web_request_duration_seconds_bucket{{le="{b}"}} {n}'
                    for b, n in zip(BUCKETS, self.buckets, strict=True)
                ),
                f'lab_web_request_duration_seconds_bucket{{le="+Inf"}} {self.count}',
                f"lab_web_request_duration_seconds_sum {self.total}",
                f"lab_web_request_duration_seconds_count {self.count}",
                "# HELP lab_web_release_info The release this instance runs.",
                "# TYPE lab_web_release_info gauge",
                f'lab_web_release_info{{release="{self.release}"}} 1',
            ]
        return "\n".join(lines) + "\n"


def accept_and_close(server: socket.socket) -> None:
    """The second service: it accepts connections, which is all a TCP check asks."""
    while True:
        connection, _ = server.accept()
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--broken", choices=["start", "health"])
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--secret")
    parser.add_argument("--extra-port", type=int)
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--sick-after", type=float, default=0.0)
    parser.add_argument("--error-rate", type=int, choices=range(101), default=0)
    args = parser.parse_args()
    digest = "none"
    if args.secret:
        credentials = os.environ["CREDENTIALS_DIRECTORY"]
        with open(os.path.join(credentials, args.secret), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()

    time.sleep(args.start_delay)  # a slow service: activation waits for READY=1
    if args.broken == "start":
        print(f"lab-web {args.release}: refusing to start (broken release)", file=sys.stderr)
        return 1

    healthy = args.broken != "health"
    warm_at = time.monotonic() + args.healthy_after
    sick_at = time.monotonic() + args.sick_after if args.sick_after else float("inf")

    metrics = Metrics(args.release)
    asked = itertools.count(1)

    def erring() -> bool:
        """Exactly error_rate of every 100 requests, spread evenly."""
        n = next(asked)  # itertools.count is atomic under the GIL
        return (n * args.error_rate) // 100 != ((n - 1) * args.error_rate) // 100

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            started = time.monotonic()
            sick = started >= sick_at
            if self.path == "/metrics":
                status, body = 200, metrics.text().rstrip("\n")
            elif self.path == "/version":
                failing = sick or erring()
                status, body = (500, "sick") if failing else (200, args.release)
            elif self.path.startswith("/slow/") and self.path[6:].isdigit():
                time.sleep(min(120, int(self.path[6:])))
                status, body = 200, args.release
            elif self.path == "/secret":
                status, body = 200, digest
            elif self.path == "/health":
                warm = time.monotonic() >= warm_at
                ok = healthy and warm and not sick
                status, body = (200, "ok") if ok else (503, "unhealthy")
            else:
                status, body = 404, "not found"
            data = (body + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if self.path not in ("/health", "/metrics"):
                metrics.observe(status, time.monotonic() - started)

        def log_message(self, format: str, *log_args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer would look its own name up in DNS first, which hangs offline.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "lab-web", args.port

    for attempt in range(50):  # the previous release's socket may linger an instant
        try:
            server = Server(("0.0.0.0", args.port), Handler)
            break
        except OSError as error:
            if error.errno != errno.EADDRINUSE or attempt == 49:
                raise
            time.sleep(0.1)
    if args.extra_port:
        extra = socket.create_server(("0.0.0.0", args.extra_port), reuse_port=True)
        threading.Thread(target=accept_and_close, args=(extra,), daemon=True).start()
    notify(f"READY=1\nSTATUS=serving release {args.release}")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
