"""A pause between two remote steps, for the fault-matrix tests only.

With ``FLEET_TEST_PAUSE=POINT`` (or ``POINT@HOST``, or ``POINT@HOST#N`` for the Nth time
that host reaches it) in its environment, the tool stops itself with SIGSTOP at that step
boundary, after printing one line that names it; the test then injects a fault and kills
or continues the process. Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading

ENV = "FLEET_TEST_PAUSE"
RAISE_ENV = "FLEET_TEST_RAISE"  # the same spelling: raise an error nobody foresaw there
_seen: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _hit(env: str, point: str, host: str) -> bool:
    wanted = os.environ.get(env)
    if not wanted:
        return False
    with _lock:
        _seen[f"{env}:{point}@{host}"] += 1
        count = _seen[f"{env}:{point}@{host}"]
    return wanted in (point, f"{point}@{host}", f"{point}@{host}#{count}")


def pause(point: str, host: str) -> None:
    """Stop here (FLEET_TEST_PAUSE), or fail here as a bug would (FLEET_TEST_RAISE)."""
    if _hit(ENV, point, host):
        sys.stderr.write(f"fleet-test-paused {point} {host}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    if _hit(RAISE_ENV, point, host):
        raise RuntimeError(f"injected at {point} on {host}")
