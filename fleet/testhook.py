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
_seen: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def pause(point: str, host: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    with _lock:
        _seen[f"{point}@{host}"] += 1
        count = _seen[f"{point}@{host}"]
    if wanted in (point, f"{point}@{host}", f"{point}@{host}#{count}"):
        sys.stderr.write(f"fleet-test-paused {point} {host}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
