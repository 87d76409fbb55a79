"""Deploy events: each phase of each host, each host's outcome, and each release's start
and end, for the operator's own log file, log shipper or Grafana (docs/events.md).

The sinks come from the operator's own configuration only: a checkout may not have the
operator's deploys (or a Grafana token) sent anywhere. None may slow or fail a deploy:
the file is local; HTTP deliveries run on a thread of their own behind a bounded queue,
with short timeouts and a bounded wait at the end, and whatever they lose is one warning
line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fleet.config import Config
from fleet.errors import ExitCode, FleetError
from fleet.models import HostReport, Phase

if TYPE_CHECKING:
    import urllib.request
    from email.message import Message

    from fleet.analysis import Run
    from fleet.rollout import Release, Report

TIMEOUT = 2.0  # seconds per HTTP delivery
FLUSH_WAIT = 2.0  # seconds at the end for every HTTP sink together
CAPACITY = 1000  # events an HTTP sink holds; more are dropped, and counted
NAMED_HOSTS = 20  # an annotation names this many hosts, then counts the rest


class Kind(StrEnum):
    RELEASE_START = "release-start"
    PHASE_START = "phase-start"
    PHASE_END = "phase-end"
    HOST_END = "host-end"
    ANALYSIS = "analysis"
    RELEASE_END = "release-end"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


class Sink(Protocol):
    def send(self, event: dict[str, Any]) -> None: ...

    def close(self, deadline: float) -> str | None:
        """Stop by ``deadline`` (monotonic); a warning if events were lost."""


class FileSink:
    """JSON lines appended to the operator's file, created 0600: events name hosts,
    operators and what failed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.lost = 0
        self.error = ""

    def send(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
        try:
            if self.fd is None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                self.fd = os.open(self.path, flags, 0o600)
            os.write(self.fd, line)
        except OSError as exc:
            self.lost += 1
            self.error = exc.strerror or str(exc)

    def close(self, deadline: float) -> str | None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self.lost:
            return None
        return f"events: {self.lost} not written to {self.path}: {self.error}"


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener, but a POST is never sent on elsewhere, nor its token with it.

    urllib (with http.client, ssl and email) is imported here: only an operator's HTTP
    sink needs it, and it would weigh on every command's start."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(
            self,
            req: urllib.request.Request,
            fp: IO[bytes],
            code: int,
            msg: str,
            headers: Message,
            newurl: str,
        ) -> urllib.request.Request | None:
            return None

    return urllib.request.build_opener(NoRedirect)


class HttpSink:
    """POSTs each body as JSON from a thread of its own: a slow or dead server costs the
    deploy nothing but the bounded wait at the end."""

    def __init__(
        self,
        url: str,
        what: str = "events",
        headers: dict[str, str] | None = None,
        timeout: float = TIMEOUT,
        capacity: int = CAPACITY,
    ) -> None:
        self.url, self.what, self.timeout = url, what, timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "fleet"}
        self.headers.update(headers or {})
        self.queue: queue.Queue[bytes | None] = queue.Queue(capacity)
        self.offered = self.delivered = 0
        self.error = ""
        self.opener = _opener()
        self.thread = threading.Thread(target=self._deliver, name=f"fleet {what}", daemon=True)
        self.thread.start()

    def send(self, event: dict[str, Any]) -> None:
        self.post(event)

    def post(self, body: dict[str, Any]) -> None:
        self.offered += 1
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(json.dumps(body, sort_keys=True, default=str).encode())

    def _deliver(self) -> None:
        import http.client
        import urllib.error
        import urllib.request

        while (data := self.queue.get()) is not None:
            request = urllib.request.Request(self.url, data, self.headers, method="POST")
            try:
                with self.opener.open(request, timeout=self.timeout) as answer:
                    answer.read(1 << 16)
                self.delivered += 1
            except urllib.error.HTTPError as exc:
                self.error = f"HTTP {exc.code}"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                self.error = getattr(reason, "strerror", None) or str(reason)

    def close(self, deadline: float) -> str | None:
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        self.thread.join(max(0.0, deadline - time.monotonic()))
        lost = self.offered - self.delivered
        if not lost:
            return None
        why = self.error or "no answer in time"
        return f"{self.what}: {lost} of {self.offered} not delivered to {self.url}: {why}"


class AnnotationSink:
    """One Grafana annotation per release (``POST /api/annotations``): its span, tagged
    fleet, action and result, its text naming release, operator, hosts and result."""

    def __init__(self, http: HttpSink) -> None:
        self.http = http
        self.start: str | None = None
        self.hosts: list[str] = []

    def send(self, event: dict[str, Any]) -> None:
        if event["event"] == Kind.RELEASE_START:
            self.start, self.hosts = event["time"], list(event["hosts"])
        if event["event"] != Kind.RELEASE_END:
            return
        names = list(event.get("hosts") or self.hosts)  # an error's end names none
        shown = ", ".join(names[:NAMED_HOSTS]) or "no host"
        if len(names) > NAMED_HOSTS:
            shown += f" and {len(names) - NAMED_HOSTS} more"
        action, result = event["action"], event["result"]

        def ms(stamp: str) -> int:
            return round(datetime.fromisoformat(stamp).timestamp() * 1000)

        self.http.post({
            "time": ms(self.start or event["time"]),
            "timeEnd": ms(event["time"]),
            "tags": ["fleet", action, result],
            "text": f"fleet {action} {event['release']} by {event['operator']} "
                    f"on {shown}: {result}",
        })  # fmt: skip

    def close(self, deadline: float) -> str | None:
        return self.http.close(deadline)


def _stderr(message: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"fleet: {message}\n")
        sys.stderr.flush()


@dataclass
class _Ended:
    """A phase that ended. Its event waits for the host's next step, which tells whether
    the phase failed: a failed switch or check is found after its step returned."""

    report: HostReport
    phase: Phase
    label: str
    time: float
    seconds: float
    error: str | None


class Events:
    """What a release tells its sinks; thread-safe (hosts run in parallel). Without
    sinks it does nothing."""

    def __init__(
        self,
        release: Release,
        sinks: Sequence[Sink] = (),
        clock: Callable[[], float] = time.time,
        warn: Callable[[str], None] = _stderr,
        flush_wait: float = FLUSH_WAIT,
    ) -> None:
        self.release, self.sinks, self.clock, self.warn = release, list(sinks), clock, warn
        self.flush_wait = flush_wait
        self.lock = threading.Lock()
        self.ended: dict[str, _Ended] = {}
        self.began: dict[str, float] = {}  # host -> its first phase's start

    def _emit(self, kind: Kind, at: float, **fields: Any) -> None:
        if not self.sinks:
            return
        release = self.release
        event = {"event": kind.value, "time": iso(at), "release": release.id,
                 "action": release.action, "operator": release.operator} | fields  # fmt: skip
        for sink in self.sinks:
            sink.send(event)

    def _flush(self, host: str, final: HostReport | None = None) -> None:
        """The phase-end event of ``host``'s last phase, now that its outcome is known.
        ``final``: the host's report, when it replaced the one the phase ran under (an
        error nobody foresaw)."""
        ended = self.ended.pop(host, None)
        if ended is None:
            return
        report = ended.report if final is None or ended.report.reverting else final
        blamed = report.phase == ended.phase
        failed = blamed or (ended.error is not None and report.result.needs_attention)
        self._emit(Kind.PHASE_END, ended.time, host=host, phase=ended.label,
                   result="failed" if failed else "ok",
                   message=(report.message if blamed else ended.error) if failed else None,
                   seconds=round(ended.seconds, 3))  # fmt: skip

    def release_start(self, hosts: Sequence[str]) -> None:
        with self.lock:
            self._emit(Kind.RELEASE_START, self.clock(), flake=self.release.flake,
                       revision=self.release.revision, hosts=list(hosts))  # fmt: skip

    def phase_start(self, report: HostReport, label: str) -> None:
        with self.lock:
            self._flush(report.name)
            at = self.clock()
            self.began.setdefault(report.name, at)
            self._emit(Kind.PHASE_START, at, host=report.name, phase=label)

    def phase_end(
        self, report: HostReport, phase: Phase, label: str, seconds: float, error: str | None
    ) -> None:
        with self.lock:
            self.ended[report.name] = _Ended(report, phase, label, self.clock(), seconds, error)

    def host_end(self, report: HostReport) -> None:
        with self.lock:
            self._flush(report.name, report)
            at = self.clock()
            self._emit(Kind.HOST_END, at, host=report.name, result=report.result.value,
                       phase=report.phase.value if report.phase else None,
                       message=report.message, changed=report.changed,
                       seconds=round(at - self.began.get(report.name, at), 3))  # fmt: skip

    def analysis(self, run: Run) -> None:
        """One canary analysis's verdict, once its measurements are in."""
        with self.lock:
            self._emit(Kind.ANALYSIS, self.clock(), name=run.analysis.name, query=run.query,
                       result=run.result.value if run.result else None, message=run.message,
                       measurements=len(run.measurements))  # fmt: skip

    def release_end(self, report: Report) -> None:
        with self.lock:
            for host in list(self.ended):
                self._flush(host)
            self._emit(Kind.RELEASE_END, self.clock(), result=report.result.value,
                       exitCode=int(report.exit_code), stopped=report.stopped,
                       seconds=round(report.duration, 3),
                       hosts={r.name: r.result.value for r in report.reports})  # fmt: skip

    def release_failed(self, error: BaseException) -> None:
        """The release ended on an error of the tool's (or an interrupt): still an end."""
        code = (
            error.exit_code
            if isinstance(error, FleetError)
            else 130
            if isinstance(error, KeyboardInterrupt)
            else ExitCode.ERROR
        )
        with self.lock:
            for host in list(self.ended):
                self._flush(host)
            self._emit(Kind.RELEASE_END, self.clock(), result="error", exitCode=int(code),
                       message=str(error) or type(error).__name__)  # fmt: skip

    def close(self) -> None:
        """Flush every sink, all of them within ``flush_wait``; one line per sink that lost
        events."""
        deadline = time.monotonic() + self.flush_wait
        for sink in self.sinks:
            warning = sink.close(deadline)
            if warning:
                self.warn(warning)


def sinks(config: Config, warn: Callable[[str], None] = _stderr) -> list[Sink]:
    """The sinks the operator's configuration names (config.py checked their shape)."""
    found: list[Sink] = []
    events = config.get("events") or {}
    if "file" in events:
        found.append(FileSink(Path(events["file"])))
    if "url" in events:
        found.append(HttpSink(events["url"], "events"))
    annotations = config.get("annotations") or {}
    if "url" in annotations:
        headers: dict[str, str] = {}
        if "tokenFile" in annotations:
            try:
                token = Path(annotations["tokenFile"]).read_text().strip()
            except OSError as exc:
                warn(f"annotations: {annotations['tokenFile']}: {exc.strerror}; none is sent")
                return found
            if not token or not all(c.isprintable() and not c.isspace() for c in token):
                warn(f"annotations: {annotations['tokenFile']} holds no bearer token; none is sent")
                return found
            headers["Authorization"] = f"Bearer {token}"
        found.append(AnnotationSink(HttpSink(annotations["url"], "annotations", headers)))
    return found


@contextlib.contextmanager
def recording(config: Config, release: Release, hosts: Sequence[str]) -> Iterator[Events]:
    """Events of one release, from its start to its end (``Events.release_end``, or the
    error that ended it), then a bounded flush."""
    events = Events(release, sinks(config))
    events.release_start(hosts)
    try:
        yield events
    except BaseException as exc:
        events.release_failed(exc)
        raise
    finally:
        events.close()
