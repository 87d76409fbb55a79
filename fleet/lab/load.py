"""A bounded load generator for the lab: clients asking a lab balancer for lab-web's
release, counting every answer that is not one.

It only sends to an address of the lab's own network, and it stops at its request budget
or its time budget, whichever comes first.
"""

from __future__ import annotations

import http.client
import ipaddress
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from fleet.errors import UsageError
from fleet.lab.layout import Lab


@dataclass
class Load:
    """What the clients saw."""

    requests: int = 0
    failed: int = 0
    releases: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # why, how often
    seconds: float = 0.0

    def summary(self) -> str:
        answers = ", ".join(f"{r}: {n}" for r, n in sorted(self.releases.items()))
        why = "; ".join(f"{w} ({n})" for w, n in self.failures.most_common(3))
        return (
            f"{self.requests} requests in {self.seconds:.1f} s, {self.failed} failed"
            + (f" ({why})" if why else "")
            + f"; answers: {answers}"
        )


def ask(address: str, port: int, path: str, timeout: float) -> tuple[str | None, str | None]:
    """One GET on a new connection: (its body, None) or (None, why it failed)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
        if response.status != 200:
            return None, f"HTTP {response.status}"
        return body, None
    except (OSError, http.client.HTTPException) as exc:
        return None, type(exc).__name__
    finally:
        conn.close()


class Clients:
    """``threads`` clients asking http://address:port/version until stopped or a budget
    ends; start() and stop() around what is measured."""

    def __init__(
        self,
        lab: Lab,
        address: str,
        port: int,
        threads: int = 4,
        max_requests: int = 50_000,
        max_seconds: float = 300.0,
    ) -> None:
        if ipaddress.ip_address(address) not in ipaddress.ip_network(f"{lab.prefix}.0/24"):
            raise UsageError(f"{address} is not a lab address ({lab.prefix}.0/24)")
        self.address, self.port = address, port
        self.threads = threads
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.load = Load()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._started = 0.0

    def _one(self) -> tuple[str | None, str | None]:
        """(release, None) or (None, why)."""
        return ask(self.address, self.port, "/version", 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if (
                    self.load.requests >= self.max_requests
                    or time.monotonic() - self._started >= self.max_seconds
                ):
                    return
                self.load.requests += 1
            release, why = self._one()
            with self._lock:
                if why is not None:
                    self.load.failed += 1
                    self.load.failures[why] += 1
                else:
                    assert release is not None
                    self.load.releases[release] += 1

    def start(self) -> Clients:
        self._started = time.monotonic()
        self._workers = [
            threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        for worker in self._workers:
            worker.join(10)
        self.load.seconds = time.monotonic() - self._started
        return self.load

    def __enter__(self) -> Clients:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
