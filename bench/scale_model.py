"""A model of `fleet` at 1,000 and 10,000 hosts: the real command line and core, driven
in this process against a simulated fleet whose latencies come from the lab.

Usage: python bench/scale_model.py [--hosts 64,200,1000,10000] [--speed 10]
           [--parallel 100] [--canary 1] [--batch-size 20%]
           [--commands deploy,status,rollback] [--cost NAME=SECONDS]... [--list-costs]
           [--operator-cores 2] [--nofile N] [--services 20] [--per-host 3] [--checks 1]
           [--spawn] [--tracemalloc] [--profile] [--json]

No lab, no Nix, no ssh, and nothing in the core patched: `fleet.cli.main` (this
checkout's) runs here with `subprocess.run` and `subprocess.Popen`, the process boundary
every command of the tool crosses, answered by a simulator that reads each argv. So the
model relies on the command line and that boundary alone, and survives refactors.

- `ssh ... -- ADDRESS 'fleet-host ...'` is answered by that host's small state machine
  (profile generations, running system, store, release records, the transaction and its
  lock) with the JSON fleet-host itself answers; `ssh -W` (an HTTP check) with a 200;
  `ssh -O exit` stops the host's master. A program the tool runs to its end does its
  work when the tool waits for it (`communicate`), in the tool's thread.
- Connections: a master (`ControlMaster=yes`) is a process the tool starts and does not
  wait for: its handshake runs on the simulator's clock (one thread, not the tool's),
  then its ControlPath socket file appears (the tool checks that it exists) and it echoes
  its remote command's word into its stdout, a real pipe the tool waits on; it ends when
  the tool stops it by its pid. A session whose master listens rides it; one without (or
  with ControlPath=none) is a handshake of its own.
- `nix-copy-closure` puts the path in the host's store; `nix eval` answers a generated
  inventory of N hosts (`inventory_document`) and the paths of their systems.
- Each command sleeps for its cost (`COSTS`, from the lab's measurements, each with its
  source; --cost overrides), divided by --speed, so the tool's threads really wait and
  its concurrency, bounded or not, is exercised. Contention: only the operator's CPU is
  shared; every child process (ssh, nix-copy-closure) holds one of --operator-cores for
  its `cpu_*` cost, first come, first served. Hosts have their own CPU, and the network
  does not saturate.
- A child needs file descriptors for its pipes: past the open-file limit (--nofile, by
  default this process's) it fails with EMFILE, as subprocess would.

Per command (deploy, status, rollback --release of that deploy) and size: wall time,
real, times --speed (an upper bound: the tool's own CPU is not compressed) and the floor
the operator's cores set (the CPU its children need, over the cores); the tool's own CPU
(RUSAGE_SELF less the simulator's bookkeeping, measured per call with the thread's CPU
clock) and per host; the model's CPU of the children per host; peak threads (counted
exactly), resident memory (sampled); handshakes and processes per host; the most
connections, child processes and file descriptors open at once.

Time compression is not neutral where the tool's own CPU paces the work (status at 10,000
hosts): children end --speed times sooner against it, so fewer are open at once, and fewer
threads live to be scanned at each thread's start. There, peaks and CPU are lower bounds;
--speed 1 gives them as they are (4 minutes for status at 10,000 hosts).

--profile adds a cProfile of every thread by CPU time (waiting counts nothing); its run's
figures then include the profiler's overhead, and functions called millions of times
look dearer than they are (each call pays the profiler's clock): a sampling profiler that
counts the interpreter lock's holder alone (`py-spy record --gil`) is the check.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import errno
import gc
import hashlib
import heapq
import io
import itertools
import json
import os
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The checkout's own fleet, whatever the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet import cli

# -- what things cost -------------------------------------------------------------------

# name -> (seconds, where the figure comes from). "The lab" is the machine of the project's
# benchmarks (2 cores, the hosts' containers on the same cores as the tool; README, Speed):
# its figures under load are upper bounds for a fleet whose hosts have their own CPU.
COSTS: dict[str, tuple[float, str]] = {
    # On the host and the network: each host has its own CPU, so these do not contend.
    "handshake": (0.2, "a new ssh connection (TCP, key exchange, host key, public-key auth, "
                  "session): 0.15-0.3 s in the lab under load; its connect phase (a handshake "
                  "and fleet-host state) was 0.95 s median with 16 hosts on 2 shared cores"),
    "mux": (0.015, "one command over an open master connection (channel, exec, exit "
            "status): 10-20 ms in the lab"),
    "state": (0.05, "fleet-host state on the host: ~50 ms in the lab, Python's start most "
              "of it (about 60 ms on an idle lab host)"),
    "begin": (0.3, "fleet-host begin: lock, transaction record, gc roots, systemd-run of the "
              "dead-man switch; the lab's lock phase 0.4-0.7 s with 16 hosts, round trip in"),
    "activate": (1.0, "fleet-host activate: switch-to-configuration test and settle; ~1 s in "
                 "the lab, 1.5-2.6 s with 16 hosts sharing its 2 cores"),
    "commit": (0.5, "fleet-host commit: nix-env, switch-to-configuration boot, record, fsync, "
               "unlock; the lab's confirm phase 1.3-1.6 s with 16 hosts, a new connection in"),
    "undo": (1.0, "fleet-host undo: a switch back and settle, as activate"),
    "helper": (0.05, "any other fleet-host call (records, settle, record, recover): Python's "
               "start and a read, as state"),
    "check": (0.01, "an HTTP check's answer through ssh -W over the master (the channel "
              "itself is the mux cost)"),
    "copy": (0.3, "nix-copy-closure of a small closure the host mostly has: ~0.3 s in the lab"),
    "copy_present": (0.05, "nix-copy-closure of a path the host has: one query of its valid "
                     "paths"),
    "exit": (0.002, "ssh -O exit: one message to the local master"),
    "eval": (0.0, "Nix's evaluation and build of the fleet, per nix call: the flake's cost, "
             "not the tool's; not modelled unless given"),
    # On the operator's machine: the CPU of each process the tool starts. It is served by
    # --operator-cores slots: a process waits for a free one, then holds it this long.
    "cpu_ssh": (0.005, "an ssh client process (exec, config, the mux exchange): `ssh -V` "
                "alone takes 4.4 ms of CPU on the lab machine"),
    "cpu_handshake": (0.015, "a new connection's client side on top of cpu_ssh: key "
                      "exchange, host key check, the auth signature (an estimate)"),
    "cpu_copy": (0.03, "nix-copy-closure's own process beside its ssh (an estimate)"),
}  # fmt: skip

FLEET_HOST = "fleet-host"
RUNNING_SYSTEM = "/run/current-system"
HELPER_SUFFIX = "/sw/bin/" + FLEET_HOST
# fleet-host subcommand -> its cost; any other costs "helper".
HOST_COSTS = {"state": "state", "begin": "begin", "activate": "activate",
              "commit": "commit", "undo": "undo"}  # fmt: skip
# fleet-host's exit codes (fleet/hostside/fleet_host.py's Exit).
FAILED, HELD, FENCED, EXPIRED = 1, 3, 4, 5

# -- the inventory ----------------------------------------------------------------------

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def store_path(name: str, suffix: str = "") -> str:
    """A store path as Nix names one (32 characters of its alphabet, then the name)."""
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX32[b % 32] for b in digest[:32]) + "-" + name + suffix


def system_path(host: str, version: str, suffix: str = "") -> str:
    return store_path(f"nixos-system-{host}-{version}", suffix)


def host_names(count: int) -> list[str]:
    width = len(str(count))
    return [f"h{i:0{width}d}" for i in range(1, count + 1)]


def inventory_document(
    hosts: int, services: int = 20, per_host: int = 3, checks: int = 1
) -> dict[str, Any]:
    """A valid inventory (inventory.schema.json) of ``hosts`` hosts: ``services`` services
    in a dependency tree (service i needs service (i-1)//2: a few tiers of waves), each host
    running ``per_host`` of them, ``checks`` HTTP checks per host (the lab's shape), pinned
    host keys (as the lab's), no balancers and no monitoring. Deterministic."""
    names = [f"svc{i:03d}" for i in range(services)]
    doc_hosts: dict[str, Any] = {}
    for index, name in enumerate(host_names(hosts)):
        mine = sorted({names[(index * 7 + k * 13) % services] for k in range(per_host)})
        key = hashlib.sha256(name.encode()).hexdigest()[:43]
        doc_hosts[name] = {
            "address": f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}",
            "sshPort": 22,
            "sshUser": "root",
            "tags": ["canary"] if index == 0 else ["fleet"],
            "system": "x86_64-linux",
            "hostKey": f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5{key}",
            "services": mine,
            "checks": [
                {"name": f"web-{c}", "service": mine[c % len(mine)] if mine else None,
                 "type": "http", "port": 8080 + c, "path": "/health", "expectStatus": 200,
                 "expectBody": "ok", "timeout": 2, "interval": 0.2, "retries": 25}
                for c in range(checks)
            ],
        }  # fmt: skip
    return {
        "schemaVersion": 1,
        "hosts": doc_hosts,
        "deploy": {"parallel": 10, "canary": 1, "batchSize": "20%", "maxFailures": 0,
                   "healthTimeout": 60, "confirmTimeout": 30, "canaryTag": "canary"},
        "services": {n: {"dependsOn": [names[(i - 1) // 2]] if i else []}
                     for i, n in enumerate(names)},
    }  # fmt: skip


# -- one simulated host -----------------------------------------------------------------


class HostFailure(Exception):
    """fleet-host's Failure: an exit code, a message and extra fields of its answer."""

    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


@dataclass
class SimHost:
    """What fleet-host reads and writes on one host, in memory."""

    name: str
    address: str
    checks: list[dict[str, Any]]  # every system's manifest declares these
    system: str  # the running system
    generations: dict[int, tuple[int, str]] = field(default_factory=dict)  # n -> created, path
    current: int = 1
    booted: str = ""
    boot_entry: str = ""
    store: set[str] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)
    txn: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.generations[1] = (int(time.time()) - 86400, self.system)
        self.booted = self.boot_entry = self.system
        self.store.add(self.system)

    def number_of(self, path: str) -> int | None:
        numbers = [n for n, (_, p) in self.generations.items() if p == path]
        if self.current in numbers:
            return self.current
        return max(numbers) if numbers else None

    def last_record(self) -> dict[str, Any] | None:
        kept = [r for r in self.records[-50:] if r.get("action") not in ("drain", "undrain")]
        return kept[-1] if kept else None

    def state(self) -> dict[str, Any]:
        """fleet_host.state_json, field for field."""
        txn = self.txn
        return {
            "protocol": 1,
            "current": self.current,
            "running": self.system,
            "booted": self.booted,
            "bootEntry": self.boot_entry,
            "generations": [[n, c, p] for n, (c, p) in sorted(self.generations.items())],
            "txn": txn,
            "abandoned": False,
            "watchers": [f"fleet-watch-{txn['token'][:16]}"] if txn else [],
            "failedUnits": [],
            "lastRecord": self.last_record(),
            "missingSecrets": [],
            "heldSecrets": [],
            "checks": self.checks,
            "traffic": {},
            "maintenance": None,
            "now": time.time(),
        }

    def ours(self, token: str) -> dict[str, Any]:
        if self.txn is None or self.txn["token"] != token:
            why = " (taken over)" if self.txn else " (it was released)"
            holder = self.txn["holder"] if self.txn else None
            raise HostFailure(FENCED, "the deploy lock is no longer this transaction's" + why,
                              holder=holder)  # fmt: skip
        return self.txn

    def compose(self, txn: dict[str, Any], result: str, new: dict[str, Any] | None,
                phase: str | None, message: str | None) -> dict[str, Any]:  # fmt: skip
        return dict(txn["base"]) | {
            "host": txn["base"].get("host") or self.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "previous": txn["recorded"],
            "new": new,
            "result": result,
            "phase": phase,
            "message": message,
        }

    def begin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.txn is not None:
            if self.txn["state"] != "committed":
                raise HostFailure(HELD, "the deploy lock is held", holder=self.txn["holder"],
                                  deadline=self.txn["deadline"])  # fmt: skip
            out["recovered"] = self.finish(self.txn) | {"action": "finished"}
        target = str(args["--target"])
        if target not in self.store:
            raise HostFailure(FAILED, f"{target} is not on the host (was it collected?)")
        mode = str(args["--mode"])
        if mode == "switch" and self.system == target and self.current_path() == target:
            running = {"path": target, "number": self.number_of(target)}
            return out | {"noop": True, "restarted": [], "checks": self.checks,
                          "running": running}  # fmt: skip
        recorded = {"path": self.system, "number": self.number_of(self.system)}
        number = args.get("--generation")
        self.txn = {
            "token": args["--token"],
            "holder": json.loads(str(args["--holder"])),
            "mode": mode,
            "recorded": recorded,
            "target": {"number": int(number) if number else None, "path": target},
            "state": "begun",
            "deadline": time.time() + float(args["--deadline"]),
            "confirm": float(args["--confirm"]),
            "helper": target + HELPER_SUFFIX,
            "base": json.loads(str(args.get("--base") or "{}")),
            "record": None, "switch_unit": None, "taken_over": [], "boot_id": "0" * 16,
            "restart": [], "prune": [], "newest": max(self.generations),
            "drained": list(args.get("--drain", [])), "began": time.time(), "version": 1,
        }  # fmt: skip
        return out | {"begun": True, "recorded": recorded}

    def current_path(self) -> str:
        return self.generations[self.current][1]

    def activate(self, args: Mapping[str, Any], before: bool) -> dict[str, Any]:
        """Before the switch: the transaction is ours and activating; after: activated."""
        txn = self.ours(str(args["--token"]))
        if before:
            if txn["state"] not in ("begun", "activated"):
                raise HostFailure(FAILED, f"cannot activate in state {txn['state']}")
            txn["state"] = "activating"
            txn["deadline"] = time.time() + float(args["--health"]) + float(args["--confirm"])
            return {}
        txn["state"] = "activated"
        self.system = txn["target"]["path"]
        return {"switchExit": 0, "output": "", "settled": True, "failedUnits": [],
                "deadline": txn["deadline"], "started": time.time(), "restarted": [],
                "checks": self.checks}  # fmt: skip

    def health(self) -> dict[str, Any]:
        """fleet-host's run of the system's checks (every one HTTP, every one passing)."""
        made = [{"name": c["name"], "ok": True, "attempts": 1, "message": "HTTP 200"}
                for c in self.checks]  # fmt: skip
        return {"ok": True, "checks": made, "seconds": 0.0}

    def proof(self) -> dict[str, Any]:
        """fleet-host health: settled, no failed unit, the running system's checks."""
        return {"settled": True, "failedUnits": [], "checks": self.checks,
                "health": self.health()}  # fmt: skip

    def commit(self, args: Mapping[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        txn = self.ours(str(args["--token"]))
        if time.time() > txn["deadline"] and txn["state"] != "committed":
            done = self.undo(txn, "confirm", "not confirmed before its deadline")
            raise HostFailure(EXPIRED, "the deadline passed: the host undid the change", **done)
        wanted = {"switch": "activated", "boot": "begun", "reboot": "booted"}
        if txn["state"] != wanted.get(txn["mode"]):
            raise HostFailure(FAILED, f"cannot commit a {txn['mode']} in state {txn['state']}")
        target = txn["target"]
        number = target["number"]
        if number is None or number not in self.generations:
            number = max(self.generations) + 1
            self.generations[number] = (int(time.time()), target["path"])
        self.current = number
        self.boot_entry = target["path"]
        new = {"number": number, "path": target["path"]}
        asked = record.get("result")
        result = ("pending-reboot" if txn["mode"] == "boot"
                  else asked if asked in ("deployed", "rolled-back") else "deployed")  # fmt: skip
        txn["record"] = self.compose(txn, result, new, None, None) | record | {
            "new": new, "result": result}  # fmt: skip
        txn["record"].setdefault("previous", txn["recorded"])
        txn["state"] = "committed"
        return {"committed": True, "new": new} | self.finish(txn)

    def finish(self, txn: dict[str, Any]) -> dict[str, Any]:
        record = txn["record"] or self.compose(txn, "deployed", txn["target"], None, None)
        self.records.append(record)
        self.txn = None
        return {"finished": True, "record_error": None, "record": record}

    def undo(self, txn: dict[str, Any], phase: str | None, message: str | None) -> dict[str, Any]:
        self.system = txn["recorded"]["path"]
        self.records.append(self.compose(txn, "rolled-back", txn["recorded"], phase, message))
        self.txn = None
        return {"undone": True, "recorded": txn["recorded"], "checks": self.checks,
                "switch_exit": 0, "output": "", "settled": True, "failed_units": [],
                "record_error": None}  # fmt: skip


def answer(data: dict[str, Any]) -> str:
    """fleet-host's answer line (its ``emit``)."""
    return json.dumps(data | {"ok": True}, sort_keys=True) + "\n"


def options(words: Sequence[str]) -> dict[str, Any]:
    """fleet-host's options: ``--name value``, flags, repeated ``--drain``."""
    flags = {"--take-over", "--secrets", "--force", "--activate", "--checks"}
    found: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in flags:
            found[word] = True
            i += 1
        elif word.startswith("--") and "=" in word:
            key, _, value = word.partition("=")
            found[key] = value
            i += 1
        elif word.startswith("--") and i + 1 < len(words):
            if word == "--drain":
                found.setdefault(word, []).append(words[i + 1])
            else:
                found[word] = words[i + 1]
            i += 2
        else:
            i += 1
    return found


# -- the simulator ----------------------------------------------------------------------

_REAL_POPEN = subprocess.Popen  # for --spawn, while subprocess.Popen is the simulator's

# ssh's options that take an argument (the destination follows `--`).
_SSH_ARGUMENT = {"-o", "-p", "-l", "-F", "-O", "-W", "-i", "-J", "-S"}


def ssh_options(words: Sequence[str]) -> tuple[dict[str, str], dict[str, str], int]:
    """``-o`` options (the first value wins, as in ssh), other options, and where ``--``
    (or the end) is."""
    config: dict[str, str] = {}
    other: dict[str, str] = {}
    i = 0
    while i < len(words) and words[i] != "--":
        word = words[i]
        if word == "-o" and i + 1 < len(words):
            key, _, value = words[i + 1].partition("=")
            config.setdefault(key, value)
            i += 2
        elif word in _SSH_ARGUMENT and i + 1 < len(words):
            other[word] = words[i + 1]
            i += 2
        else:
            i += 1
    return config, other, i


# A word of shlex.join's output: bare characters, '...' and "'" (a quote in a quoted word).
_WORD = re.compile(r"(?:[^\s'\"]+|'[^']*'|\"[^\"]*\")+")
_PART = re.compile(r"[^'\"]+|'([^']*)'|\"([^\"]*)\"")


def _part(match: re.Match[str]) -> str:
    quote = match[0][0]
    return match[1] if quote == "'" else match[2] if quote == '"' else match[0]


def unquote(line: str) -> list[str]:
    """shlex.split for what shlex.join makes, many times faster: the simulator's own time
    is taken out of the tool's, but it still holds the interpreter meanwhile."""
    return ["".join(map(_part, _PART.finditer(w))) for w in _WORD.findall(line)]


# A pid no process has (above Linux's PID_MAX_LIMIT): what the tool may signal by pid
# (its Ctrl-C path) finds nothing.
NO_PID = 2**22 + 1


def pipes_of(kwargs: Mapping[str, Any]) -> int:
    """The pipes between the tool and a child it starts with these Popen arguments."""
    return sum(kwargs.get(s) == subprocess.PIPE for s in ("stdin", "stdout", "stderr"))


@dataclass
class Counts:
    """What one command made the simulated fleet do."""

    calls: Counter[str] = field(default_factory=Counter)
    handshakes: int = 0
    processes: int = 0
    children_cpu: float = 0.0  # modelled CPU of the tool's child processes
    sim_cpu: float = 0.0  # the simulator's own bookkeeping, measured
    connections: int = 0  # open now: masters, and connections of their own
    peak_connections: int = 0
    running: int = 0  # child processes running now
    peak_running: int = 0
    peak_fds: int = 0  # the tool's open files at most: its own, and pipes to children
    emfile: int = 0  # children not started: no file descriptor left
    unknown: Counter[str] = field(default_factory=Counter)


class Clock:
    """Timed events, on one thread of the simulator's: what a child the tool starts and does
    not wait for (a master's handshake) does meanwhile, without a thread of its own (the
    tool's threads are what is counted). Its CPU is the simulator's."""

    def __init__(self, account: Callable[[float], None]) -> None:
        self.account = account
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="sim-clock", daemon=True)

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at ``when`` (time.monotonic)."""
        with self.cond:
            heapq.heappush(self.events, (when, next(self.order), action))
            self.cond.notify()

    def _run(self) -> None:
        mark = time.thread_time()
        while True:
            with self.cond:
                while not self.stopped:
                    left = self.events[0][0] - time.monotonic() if self.events else None
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(left)
                if self.stopped:
                    return
                _, _, action = heapq.heappop(self.events)
            action()
            now = time.thread_time()
            self.account(now - mark)
            mark = now

    def __enter__(self) -> Clock:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()


class Simulator:
    """Answers every command the tool runs, as the fleet and the local Nix would, after
    sleeping for what it costs (``COSTS`` / ``speed``)."""

    def __init__(
        self,
        document: dict[str, Any],
        costs: Mapping[str, float],
        speed: float,
        operator_cores: int,
        spawn: bool = False,
        nofile: int | None = None,  # the open-file limit; None: this process's
    ) -> None:
        self.nofile = nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fds_base = self.fds = 0
        self.costs = dict(costs)
        self.speed = speed
        self.spawn = spawn
        self.inventory = json.dumps(document)
        self.names = list(document["hosts"])
        self.hosts = {
            h["address"]: SimHost(name, h["address"], h["checks"], system_path(name, "v0"))
            for name, h in document["hosts"].items()
        }
        self.version = "v0"  # what the flake builds now
        self.operator_cores = operator_cores
        self.cores = [0.0] * operator_cores  # when each core is free (time.monotonic)
        self.lock = threading.Lock()
        self.masters: dict[str, MasterProcess] = {}  # ControlPath -> the master listening
        self.counts = Counts()
        self.clock = Clock(self._sim_cpu)

    # -- accounting

    def reset(self) -> Counts:
        """The counts so far, and new ones from now (the open files counted afresh)."""
        self.fds_base = len(os.listdir("/proc/self/fd"))
        with self.lock:
            done, self.counts = self.counts, Counts()
            self.counts.connections = done.connections
            self.counts.peak_connections = done.connections
        return done

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts.calls[what] += 1

    def _connections(self, delta: int) -> None:
        with self.lock:
            c = self.counts
            c.connections += delta
            c.peak_connections = max(c.peak_connections, c.connections)

    def _process(self, delta: int, pipes: int) -> None:
        """A child process starts (delta 1) or ends (-1) with ``pipes`` pipes to it. As
        in subprocess: each pipe needs both its ends at the start (and the exec error pipe
        two more), the parent keeps one end of each; past the open-file limit, EMFILE."""
        with self.lock:
            c = self.counts
            if delta > 0 and self.fds_base + self.fds + 2 * pipes + 2 > self.nofile:
                c.emfile += 1
                raise OSError(errno.EMFILE, "Too many open files")
            self.fds += delta * pipes
            c.peak_fds = max(c.peak_fds, self.fds_base + self.fds)
            c.running += delta
            c.processes += max(0, delta)
            c.peak_running = max(c.peak_running, c.running)

    def _sim_cpu(self, seconds: float) -> None:
        with self.lock:
            self.counts.sim_cpu += seconds

    def _sleep(self, cost: str) -> None:
        seconds = self.costs[cost] / self.speed
        if seconds > 0:
            time.sleep(seconds)

    def _core(self, cost: str, start: float) -> float:
        """CPU of a child process on the operator's machine, from ``start`` on: the first
        core free serves it (first come, first served). When it is done."""
        seconds = self.costs[cost]
        if seconds <= 0:
            return start
        with self.lock:
            self.counts.children_cpu += seconds
            core = min(range(len(self.cores)), key=self.cores.__getitem__)
            self.cores[core] = max(start, self.cores[core]) + seconds / self.speed
            return self.cores[core]

    def _client(self, cost: str) -> None:
        """CPU of a child process, waited for in the calling thread."""
        left = self._core(cost, time.monotonic()) - time.monotonic()
        if left > 0:
            time.sleep(left)

    def _real_spawn(self) -> float:
        """With --spawn, start /bin/true as the tool would start its child: the tool's own
        cost of a process (fork, exec, pipes) is then in its CPU. Its thread CPU."""
        if not self.spawn:
            return 0.0
        mark = time.thread_time()
        pipe = subprocess.PIPE
        with _REAL_POPEN(["true"], stdin=pipe, stdout=pipe, stderr=pipe) as child:
            child.communicate(b"")
        return time.thread_time() - mark

    # -- connections

    @contextlib.contextmanager
    def session(self, config: Mapping[str, str]) -> Iterator[None]:
        """One ssh client's connection: over the master listening on its ControlPath, else
        (none there, or ControlPath=none) a connection of its own, a handshake."""
        path = config.get("ControlPath", "none")
        self._client("cpu_ssh")
        with self.lock:
            rides = path != "none" and path in self.masters
            self.counts.handshakes += not rides
        if rides:
            self._sleep("mux")
            yield
            return
        self._connections(1)
        try:
            self._client("cpu_handshake")
            self._sleep("handshake")
            yield
        finally:
            self._connections(-1)

    def _exit_master(self, config: Mapping[str, str]) -> tuple[int, str, str]:
        """``ssh -O exit``: the master listening on the ControlPath stops."""
        path = config.get("ControlPath", "none")
        self._client("cpu_ssh")
        self._sleep("exit")
        with self.lock:
            master = self.masters.get(path)
        if master is None:
            return 255, "", f"Control socket connect({path}): No such file or directory\n"
        master.end(0)
        return 0, "", "Exit request sent.\n"

    # -- the process boundary

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        capture_output: bool = False,
        check: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run: Popen, then communicate."""
        if capture_output:
            kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        if input is not None:
            kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(argv, **kwargs)
        assert isinstance(proc, Child), "a master is started, never run"
        out, err = proc.communicate(input, timeout)
        code = proc.wait()
        if check and code:
            raise subprocess.CalledProcessError(code, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), code, out, err)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> Child | Tunnel | MasterProcess:
        """subprocess.Popen, for every program the tool starts: a master connection
        (ControlMaster=yes), an HTTP check of the tool's own (``ssh -W``), or a program it
        runs to its end (process.run)."""
        mark = time.thread_time()
        spawned = self._real_spawn()
        words = [str(a) for a in argv]
        pipes = pipes_of(kwargs)
        try:
            self._process(1, pipes)
        finally:
            self._sim_cpu(time.thread_time() - mark - spawned)
        if os.path.basename(words[0]) == "ssh":
            config, other, _ = ssh_options(words[1:])
            if config.get("ControlMaster") == "yes":
                return MasterProcess(self, words, pipes, kwargs.get("stderr"))
            if "-W" in other:
                return Tunnel(self, words, pipes)
        return Child(self, words, pipes, kwargs)

    def _answer(
        self, words: list[str], stdin: str | None, env: Mapping[str, str] | None
    ) -> tuple[int, str, str]:
        program = os.path.basename(words[0])
        if program == "ssh":
            return self._ssh(words, stdin)
        if program == "nix-copy-closure":
            return self._copy(words, str((env or {}).get("NIX_SSHOPTS", "")))
        if program in ("nix", "nix-store"):
            return self._nix(words)
        self._count(program)
        with self.lock:
            self.counts.unknown[program] += 1
        return 127, "", f"{program}: command not found\n"

    def _ssh(self, words: list[str], stdin: str | None) -> tuple[int, str, str]:
        config, other, end = ssh_options(words[1:])
        if other.get("-O") == "exit":
            self._count("ssh -O exit")
            return self._exit_master(config)
        rest = words[1 + end + 1 :]
        host = self.hosts.get(rest[0]) if rest else None
        if host is None:
            return 255, "", "ssh: Could not resolve hostname\n"
        remote = unquote(rest[1]) if len(rest) > 1 else []
        with self.session(config):
            return self._remote(host, remote, stdin)

    def _remote(self, host: SimHost, argv: list[str], stdin: str | None) -> tuple[int, str, str]:
        if argv[:2] == ["sudo", "-n"]:
            argv = argv[2:]
        if argv and argv[0].endswith("/" + FLEET_HOST):
            return self._helper(host, argv, stdin)
        if argv[:1] == ["timeout"]:  # a command check
            self._count("ssh timeout")
            self._sleep("check")
            return 0, "", ""
        if argv[:2] == ["nix-store", "-qR"]:
            self._count("ssh nix-store -qR")
            self._sleep("helper")
            return 0, host.system + "\n", ""
        what = argv[0] if argv else "(nothing)"
        self._count(f"ssh {what}")
        with self.lock:
            self.counts.unknown[f"ssh {what}"] += 1
        return 127, "", f"bash: {what}: command not found\n"

    def _helper(self, host: SimHost, argv: list[str], stdin: str | None) -> tuple[int, str, str]:
        """fleet-host: its JSON answer (the last line of stdout) and exit code."""
        helper, command = argv[0], argv[1] if len(argv) > 1 else ""
        self._count(f"{FLEET_HOST} {command}")
        system = helper.removesuffix(HELPER_SUFFIX)
        if helper != RUNNING_SYSTEM + HELPER_SUFFIX and system not in host.store:
            return 127, "", f"bash: {helper}: No such file or directory\n"
        if command == "run":  # `fleet exec`'s command, ended with its session
            wrapped = argv[2:]
            return self._remote(host, wrapped[1:] if wrapped[:1] == ["--"] else wrapped, None)
        args = options(argv[2:])
        try:
            if command == "activate":  # the switch runs outside the host's lock
                text = answer(self._activate(host, args))
            elif command == "begin":  # with --activate, the activation in the same call
                text = answer(self._begin(host, args))
            elif command == "health":
                self._sleep("helper")
                self._sleep("check")
                with host.lock:
                    text = answer(host.proof())
            else:
                self._sleep(HOST_COSTS.get(command, "helper"))
                with host.lock:  # the answer names the host's live records
                    text = answer(self._step(host, command, args, stdin))
        except HostFailure as exc:
            failure = {"ok": False, "error": str(exc), "code": exc.code} | exc.extra
            return exc.code, json.dumps(failure, sort_keys=True) + "\n", f"fleet-host: {exc}\n"
        return 0, text, ""

    def _begin(self, host: SimHost, args: Mapping[str, Any]) -> dict[str, Any]:
        """fleet-host begin (cmd_begin): the lock; with --activate, the activation at once;
        with --checks, the checks of the system activated, or of the one running when
        there is nothing to change."""
        started = time.monotonic()
        self._sleep("begin")
        with host.lock:
            data = host.begin(args)
        if data.get("noop"):
            if "--checks" in args:
                self._sleep("check")
                data |= host.proof()
            return data
        data["seconds"] = round(time.monotonic() - started, 3)
        if "--activate" in args:
            asked = {"--token": args["--token"], "--health": args["--health"],
                     "--confirm": args["--confirm-timeout"]}  # fmt: skip
            if "--checks" in args:
                asked["--checks"] = True
            data["activation"] = self._activate(host, asked)
        return data

    def _activate(self, host: SimHost, args: Mapping[str, Any]) -> dict[str, Any]:
        """The switch (outside the host's lock), then, with --checks, the host's checks."""
        with host.lock:
            host.activate(args, before=True)
        started = time.monotonic()
        self._sleep("activate")
        with host.lock:
            done = host.activate(args, before=False)
        done["seconds"] = round(time.monotonic() - started, 3)
        if "--checks" in args:
            self._sleep("check")
            done["health"] = host.health()
        return done

    def _step(
        self, host: SimHost, command: str, args: Mapping[str, Any], stdin: str | None
    ) -> dict[str, Any]:
        if command == "state":
            return host.state()
        if command == "commit":
            return host.commit(args, json.loads(stdin or "{}"))
        if command == "undo":
            txn = host.ours(str(args["--token"]))
            record = json.loads(stdin or "{}")
            return host.undo(txn, record.get("phase"), record.get("message"))
        if command == "records":
            return {"records": list(host.records), "unreadable": 0}
        if command == "record":
            host.records.append(json.loads(stdin or "{}"))
            return {"recordError": None}
        if command == "settle":
            return {"settled": True, "failedUnits": []}
        if command == "recover":
            return {"recovered": None, "undrained": []}
        if command == "version":
            return {"protocol": 1}
        if command == "probe-tcp":
            return {"connected": True}
        with self.lock:
            self.counts.unknown[f"{FLEET_HOST} {command}"] += 1
        raise HostFailure(2, f"{command}: not simulated")

    def _copy(self, words: list[str], sshopts: str) -> tuple[int, str, str]:
        """nix-copy-closure --to ADDRESS PATH, through Nix's ssh with NIX_SSHOPTS."""
        self._count("nix-copy-closure")
        host = self.hosts.get(words[words.index("--to") + 1]) if "--to" in words else None
        if host is None:
            return 1, "", "error: cannot connect\n"
        path = words[-1]
        self._client("cpu_copy")
        config, _, _ = ssh_options(sshopts.split())
        with self.session(config):
            present = path in host.store
            self._sleep("copy_present" if present else "copy")
        with host.lock:
            host.store.add(path)
        return 0, "", ""

    def _nix(self, words: list[str]) -> tuple[int, str, str]:
        """The local Nix: the inventory, the systems' paths, their build, metadata."""
        self._sleep("eval")
        if words[0] == "nix-store":
            self._count("nix-store " + words[1])
            outs = [w.removesuffix(".drv") for w in words if w.endswith(".drv")]
            return 0, "".join(o + "\n" for o in outs), ""
        if "eval" in words:
            installable = next(w for w in words if "#" in w)
            attribute = installable.split("#", 1)[1]
            self._count(f"nix eval {attribute}")
            if attribute == "fleet":
                return 0, self.inventory, ""
            if attribute == "nixosConfigurations":
                systems = {
                    n: {"drv": system_path(n, self.version, ".drv"),
                        "out": system_path(n, self.version)}
                    for n in self.names
                }  # fmt: skip
                return 0, json.dumps(systems), ""
        if "metadata" in words:
            self._count("nix flake metadata")
            return 0, json.dumps({"revision": "0" * 40}), ""
        if "sign" in words:
            self._count("nix store sign")
            return 0, "", ""
        with self.lock:
            self.counts.unknown[" ".join(words[:4])] += 1
        return 1, "", "error: not simulated\n"

    # -- in place

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """subprocess.run and subprocess.Popen answered by this simulator, its clock
        running."""
        real_run, real_popen = subprocess.run, subprocess.Popen
        subprocess.run = self.run  # type: ignore[assignment]
        subprocess.Popen = self.popen  # type: ignore[assignment,misc]
        try:
            with self.clock:
                yield
        finally:
            subprocess.run, subprocess.Popen = real_run, real_popen  # type: ignore[misc]


class Child:
    """A program the tool runs to its end (process.run, subprocess.run): its work is done
    when the tool waits for it (``communicate``), in the tool's thread, for as long as it
    would take."""

    def __init__(
        self, sim: Simulator, argv: list[str], pipes: int, kwargs: Mapping[str, Any]
    ) -> None:
        self.sim = sim
        self.args = argv
        self.pipes = pipes
        self.pid = NO_PID
        self.text = bool(kwargs.get("text") or kwargs.get("universal_newlines"))
        self.env: Mapping[str, str] | None = kwargs.get("env")
        self.stdin = self.stdout = self.stderr = None
        self.returncode: int | None = None

    def communicate(
        self, input: str | bytes | None = None, timeout: float | None = None
    ) -> tuple[str | bytes, str | bytes]:
        out = err = ""
        if self.returncode is None:
            mark = time.thread_time()
            given = input.decode() if isinstance(input, bytes) else input
            try:
                code, out, err = self.sim._answer(self.args, given, self.env)
            finally:
                self.sim._sim_cpu(time.thread_time() - mark)
            self._end(code)
        return (out, err) if self.text else (out.encode(), err.encode())

    def _end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self.sim._process(-1, self.pipes)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:  # waited for without its output: it runs all the same
            self.communicate()
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._end(-15)

    def kill(self) -> None:
        self._end(-9)


class Tunnel(Child):
    """An ``ssh -W 127.0.0.1:PORT`` process: one HTTP exchange with the host's service."""

    def __init__(self, sim: Simulator, argv: list[str], pipes: int) -> None:
        super().__init__(sim, argv, pipes, {})

    def communicate(
        self, input: str | bytes | None = None, timeout: float | None = None
    ) -> tuple[str | bytes, str | bytes]:
        if self.returncode is not None:
            return b"", b""
        sim = self.sim
        mark = time.thread_time()
        try:
            config, _, end = ssh_options(self.args[1:])
            rest = self.args[1 + end + 1 :]
            host = sim.hosts.get(rest[0]) if rest else None
            sim._count("ssh -W")
            if host is None:
                self._end(255)
                return b"", b"ssh: Could not resolve hostname\n"
            with sim.session(config):
                sim._sleep("check")
            self._end(0)
            return b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nok\n", b""
        finally:
            sim._sim_cpu(time.thread_time() - mark)


_ECHO = re.compile(r"echo ([\w-]+)")


class MasterProcess:
    """The tool's master connection to a host (``ControlMaster=yes``, ControlPersist=no),
    which it starts and does not wait for: its handshake takes its time on the simulator's
    clock (the operator's cores for its client's CPU, then the host's latency); then its
    socket listens (sessions on its ControlPath ride it) and it says the word its remote
    command echoes on its stdout, a real pipe the tool waits on; then nothing until it is
    stopped, by its pid."""

    def __init__(self, sim: Simulator, argv: list[str], pipes: int, stderr: Any) -> None:
        self.sim = sim
        self.args = argv
        self.pipes = pipes
        self.pid = NO_PID
        self.returncode: int | None = None
        self.ended = threading.Event()
        config, _, end = ssh_options(argv[1:])
        self.path = config.get("ControlPath", "none")
        rest = argv[1 + end + 1 :]
        host = sim.hosts.get(rest[0]) if rest else None
        # What it runs on the host says a word once the session is up (`echo WORD; ...`).
        said = _ECHO.search(rest[1]) if len(rest) > 1 else None
        self.word = (said[1] if said else "") + "\n"
        readable, self.writable = os.pipe()
        self.stdout = os.fdopen(readable, "rb", buffering=0)
        self.stdin = io.BytesIO()  # the remote `cat` reads it; nothing is ever written
        sim._count("ssh master")
        with sim.lock:
            sim.counts.handshakes += 1
        sim._connections(1)
        now = time.monotonic()
        cpu = sim._core("cpu_handshake", sim._core("cpu_ssh", now))
        ready = cpu + sim.costs["handshake"] / sim.speed
        if host is None:
            if stderr is not None:  # a file: its descriptor is the child's from now on
                os.write(stderr.fileno(), b"ssh: Could not resolve hostname\n")
            sim.clock.at(ready, lambda: self.end(255))
        else:
            sim.clock.at(ready, self._ready)

    def _ready(self) -> None:
        with self.sim.lock:
            if self.returncode is not None:  # stopped during its handshake
                return
            Path(self.path).touch()  # the socket, once the connection is up
            self.sim.masters[self.path] = self
            os.write(self.writable, self.word.encode())

    def end(self, code: int) -> None:
        """It exits: its socket is removed, its end of the pipe closed."""
        sim = self.sim
        with sim.lock:
            if self.returncode is not None:
                return
            self.returncode = code
            if sim.masters.get(self.path) is self:
                del sim.masters[self.path]
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self.writable)
        sim._connections(-1)
        sim._process(-1, self.pipes)
        self.ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.end(255)  # ssh's exit code on SIGTERM

    def kill(self) -> None:
        self.end(-9)

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode


# -- measuring --------------------------------------------------------------------------


class Sampler:
    """Resident memory every ``interval`` seconds; threads both sampled and counted exactly
    (every thread started meanwhile counts from its run's start to its end); its own CPU."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.base_threads = threading.active_count()
        self.peak_threads = self.base_threads
        self.started = self.running = self.peak_running = 0
        self.base_rss = self.peak_rss = rss()
        self.cpu = 0.0
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.real_run = threading.Thread.run

    def _run(self) -> None:
        while not self.halt.wait(self.interval):
            self.peak_threads = max(self.peak_threads, threading.active_count())
            self.peak_rss = max(self.peak_rss, rss())
        self.cpu = time.thread_time()

    def _running(self, delta: int) -> None:
        with self.lock:
            self.running += delta
            self.started += max(0, delta)
            self.peak_running = max(self.peak_running, self.running)

    def __enter__(self) -> Sampler:
        self.thread.start()
        real_run, sampler = self.real_run, self

        def run(self: threading.Thread) -> None:
            sampler._running(1)
            try:
                real_run(self)
            finally:
                sampler._running(-1)

        threading.Thread.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        threading.Thread.run = self.real_run  # type: ignore[method-assign]
        self.halt.set()
        self.thread.join()
        # The sampler's own thread is in the base count plus one.
        self.peak_threads = max(self.peak_threads - 1, self.base_threads + self.peak_running)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def cpu_now() -> tuple[float, float]:
    """This process's CPU so far: user, system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class ThreadProfiles:
    """cProfile in every thread started meanwhile (and this one), by CPU time, merged."""

    def __init__(self) -> None:
        self.stats: pstats.Stats | None = None
        self.lock = threading.Lock()
        self.main = cProfile.Profile(time.thread_time)
        self.real_run = threading.Thread.run  # as it is when entered

    def add(self, profile: cProfile.Profile) -> None:
        with self.lock:
            if self.stats is None:
                self.stats = pstats.Stats(profile)
            else:
                self.stats.add(profile)

    def __enter__(self) -> ThreadProfiles:
        self.real_run = threading.Thread.run
        real_run, profiles = self.real_run, self

        def run(self: threading.Thread) -> None:
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            try:
                real_run(self)
            finally:
                profile.disable()
                profiles.add(profile)

        threading.Thread.run = run  # type: ignore[method-assign]
        self.main.enable()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.main.disable()
        threading.Thread.run = self.real_run  # type: ignore[method-assign]
        self.add(self.main)


def where(filename: str) -> str:
    """A profile's file, short: the project's own by path, the rest by module."""
    for marker in ("/fleet/", "/bench/"):
        if marker in filename:
            return marker[1:] + filename.rsplit(marker, 1)[1]
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[1]
    return os.path.basename(filename) if filename.startswith("/") else filename


def top_costs(stats: pstats.Stats, count: int = 25) -> dict[str, Any]:
    """The functions with the most CPU of their own, and the CPU per file."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)
    files: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _nc, own, _cum, _callers) in table.items():
        files[where(filename)] = files.get(where(filename), 0.0) + own
    return {
        "total": round(sum(files.values()), 3),
        "functions": [
            {"function": f"{where(f)}:{line}({name})", "calls": nc, "own": round(own, 3),
             "cumulative": round(cum, 3)}
            for (f, line, name), (_cc, nc, own, cum, _callers) in rows[:count]
        ],
        "files": [{"file": k, "own": round(v, 3)}
                  for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:count]],
    }  # fmt: skip


@dataclass
class Figures:
    """One command at one size."""

    command: str
    hosts: int
    exit_code: int
    crash: str | None  # the exception that ended the command, when one did
    wall: float  # seconds, real
    # In the lab's time: wall x speed, an upper bound (the tool's own CPU is not
    # compressed, nor is the machine's other load); and a floor: the CPU the tool's ssh
    # and Nix processes need, over the operator's cores, which no run can beat.
    scaled_wall: float
    floor: float
    cpu: float  # the tool's own, the simulator's bookkeeping taken out
    process_system: float  # the kernel's part of the whole process's CPU (thread starts...)
    sim_cpu: float
    cpu_per_host_ms: float
    children_cpu_per_host_ms: float  # modelled: the ssh and Nix processes it starts
    peak_threads: int
    threads_started: int
    peak_rss_mib: float
    rss_growth_mib: float
    heap_peak_mib: float | None
    handshakes_per_host: float
    processes_per_host: float
    peak_connections: int
    peak_processes: int
    peak_fds: int
    emfile: int  # processes not started for want of a file descriptor
    calls: dict[str, int]
    unknown: dict[str, int]
    profile: dict[str, Any] | None = None


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 to a file: the progress lines the tool prints for every host
    (its reporter holds the stderr of import time, so only the descriptor can move)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_fleet(argv: list[str], log: Path) -> tuple[int, str, str | None]:
    """`fleet ARGV` in this process: its exit code, stdout, and the error it crashed on
    (exit code 1, as Python's, when nothing caught it)."""
    out = io.StringIO()
    code, crash = 0, None
    with stderr_to(log), contextlib.redirect_stdout(out):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            code, crash = 1, f"{type(exc).__name__}: {exc}"
    return code, out.getvalue(), crash


def measure(
    sim: Simulator,
    command: str,
    argv: list[str],
    log: Path,
    heap: bool,
    profile: bool,
) -> tuple[Figures, str]:
    n = len(sim.hosts)
    sim.reset()
    gc.collect()
    if heap:
        tracemalloc.start()
    profiles = ThreadProfiles() if profile else None
    with Sampler() as sampler:
        (user, system), start = cpu_now(), time.monotonic()
        with profiles if profiles is not None else contextlib.nullcontext():
            code, out, crash = run_fleet(argv, log)
        wall = time.monotonic() - start
        end_user, end_system = cpu_now()
        user, system = end_user - user, end_system - system
        cpu = user + system
    heap_peak = tracemalloc.get_traced_memory()[1] / 2**20 if heap else None
    if heap:
        tracemalloc.stop()
    counts = sim.reset()
    own = cpu - counts.sim_cpu - sampler.cpu
    mib = 2**20
    figures = Figures(
        command=command,
        hosts=n,
        exit_code=code,
        crash=crash,
        wall=round(wall, 2),
        scaled_wall=round(wall * sim.speed, 1),
        floor=round(counts.children_cpu / sim.operator_cores, 1),
        cpu=round(own, 2),
        process_system=round(system, 2),
        sim_cpu=round(counts.sim_cpu, 2),
        cpu_per_host_ms=round(own / n * 1000, 2),
        children_cpu_per_host_ms=round(counts.children_cpu / n * 1000, 1),
        peak_threads=sampler.peak_threads,
        threads_started=sampler.started,
        peak_rss_mib=round(sampler.peak_rss / mib, 1),
        rss_growth_mib=round((sampler.peak_rss - sampler.base_rss) / mib, 1),
        heap_peak_mib=round(heap_peak, 1) if heap_peak is not None else None,
        handshakes_per_host=round(counts.handshakes / n, 2),
        processes_per_host=round(counts.processes / n, 2),
        peak_connections=counts.peak_connections,
        peak_processes=counts.peak_running,
        peak_fds=counts.peak_fds,
        emfile=counts.emfile,
        calls=dict(counts.calls.most_common()),
        unknown=dict(counts.unknown),
        profile=top_costs(profiles.stats) if profiles and profiles.stats else None,
    )
    return figures, out


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A scratch directory for the flake, the operator's (empty) config, the tool's
    control sockets and the progress log; the environment of a plain run."""
    saved_env = dict(os.environ)
    saved_tempdir = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as scratch:
        root = Path(scratch)
        for sub in ("flake", "config", "tmp"):
            (root / sub).mkdir()
        (root / "flake/flake.nix").write_text("{ outputs = { self }: { }; }\n")  # Nix simulated
        os.environ["XDG_CONFIG_HOME"] = str(root / "config")
        for name in ("FLEET_TEST_PAUSE", "FLEET_TEST_RAISE"):
            os.environ.pop(name, None)
        tempfile.tempdir = str(root / "tmp")  # the run's control sockets, no one else's
        try:
            yield root
        finally:
            tempfile.tempdir = saved_tempdir
            os.environ.clear()
            os.environ.update(saved_env)


def scenario(count: int, args: argparse.Namespace, costs: Mapping[str, float],
             say: Callable[[str], None]) -> list[Figures]:  # fmt: skip
    """deploy (v0 -> v1), status, rollback --release of that deploy, on ``count`` hosts."""
    document = inventory_document(count, args.services, args.per_host, args.checks)
    sim = Simulator(document, costs, args.speed, args.operator_cores, args.spawn, args.nofile)
    wave = ["--parallel", str(args.parallel), "--canary", str(args.canary),
            "--batch-size", args.batch_size]  # fmt: skip
    found: list[Figures] = []
    release: str | None = None
    with workspace() as root, sim.installed():
        base = ["--flake", str(root / "flake"), "--json"]
        log = root / "progress.log"
        for command in args.commands:
            if command == "deploy":
                sim.version = f"v{len(found) + 1}"
                argv = [*base, "deploy", *wave]
            elif command == "status":
                argv = [*base, "status"]
            elif command == "rollback":
                if release is None:
                    raise SystemExit("rollback --release needs a deploy before it")
                argv = [*base, "rollback", "--release", release, "--yes", *wave]
            else:
                raise SystemExit(f"{command}: not a command of the model")
            say(f"{count} hosts: fleet {' '.join(argv[3:])}")
            figures, out = measure(sim, command, argv, log, args.tracemalloc, args.profile)
            found.append(figures)
            say(f"  exit {figures.exit_code}, {figures.wall:.1f} s, CPU {figures.cpu:.1f} s")
            if figures.exit_code != 0:
                tail = log.read_text(errors="replace").splitlines()[-3:]
                say("  " + "\n  ".join([figures.crash or out[-300:], *tail]))
            if command == "deploy" and out:
                with contextlib.suppress(ValueError):
                    release = json.loads(out).get("release")
    return found


# -- the report -------------------------------------------------------------------------

COLUMNS = (
    ("hosts", "hosts"), ("command", "command"), ("exit", "exit_code"),
    ("wall s", "wall"), ("x speed s", "scaled_wall"), ("floor s", "floor"), ("CPU s", "cpu"),
    ("CPU ms/host", "cpu_per_host_ms"), ("children ms/host", "children_cpu_per_host_ms"),
    ("threads", "peak_threads"), ("RSS MiB", "peak_rss_mib"), ("+RSS", "rss_growth_mib"),
    ("handshakes/host", "handshakes_per_host"), ("procs/host", "processes_per_host"),
    ("conns", "peak_connections"), ("procs", "peak_processes"), ("fds", "peak_fds"),
)  # fmt: skip


def table(rows: Sequence[Figures]) -> str:
    cells = [[h for h, _ in COLUMNS]]
    cells += [[str(getattr(r, key)) for _, key in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)  # fmt: skip


def profile_text(rows: Sequence[Figures]) -> str:
    lines: list[str] = []
    for r in rows:
        if r.profile is None:
            continue
        lines.append(f"\n{r.command} at {r.hosts} hosts: {r.profile['total']} s of CPU profiled")
        lines.append("  own s  cumul s     calls  function")
        for f in r.profile["functions"]:
            lines.append(f"{f['own']:7.2f} {f['cumulative']:8.2f} {f['calls']:9d}  {f['function']}")
        lines.append("  by file: " + ", ".join(f"{f['file']} {f['own']}" for f in
                                               r.profile["files"][:12]))  # fmt: skip
    return "\n".join(lines)


def parse_costs(given: Sequence[str]) -> dict[str, float]:
    costs = {name: seconds for name, (seconds, _) in COSTS.items()}
    for item in given:
        name, _, value = item.partition("=")
        if name not in costs:
            raise SystemExit(f"--cost {item}: known costs are {', '.join(costs)}")
        costs[name] = float(value)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--hosts", default="64,200,1000,10000", help="sizes, comma-separated")
    parser.add_argument(
        "--speed", type=float, default=10.0, help="divide every cost by this (time compression)"
    )
    parser.add_argument("--parallel", type=int, default=100)
    parser.add_argument("--canary", type=int, default=1)
    parser.add_argument("--batch-size", default="20%")
    parser.add_argument("--commands", default="deploy,status,rollback")
    parser.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="override one of COSTS (see --list-costs)",
    )
    parser.add_argument("--list-costs", action="store_true")
    parser.add_argument(
        "--operator-cores",
        type=int,
        default=2,
        help="cores serving the tool's ssh and Nix processes",
    )
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--per-host", type=int, default=3)
    parser.add_argument("--checks", type=int, default=1, help="HTTP checks per host")
    parser.add_argument(
        "--nofile", type=int, help="the open-file limit the tool runs under (default: this one's)"
    )
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="also start /bin/true for each command, as the tool would ssh",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="the Python heap's peak too (slows the tool down)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile every thread by CPU time; print the top costs",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()  # fmt: skip
    if args.list_costs:
        for name, (seconds, why) in COSTS.items():
            print(f"{name:14} {seconds:6.3f} s  {why}")
        return
    args.commands = args.commands.split(",")
    costs = parse_costs(args.cost)
    progress = os.fdopen(os.dup(2), "w", buffering=1)

    def say(message: str) -> None:
        progress.write(message + "\n")

    started = time.monotonic()
    rows: list[Figures] = []
    for count in (int(n) for n in args.hosts.split(",")):
        rows += scenario(count, args, costs, say)
    total = time.monotonic() - started
    if args.json:
        print(json.dumps({"speed": args.speed, "parallel": args.parallel,
                          "batchSize": args.batch_size, "canary": args.canary,
                          "operatorCores": args.operator_cores, "costs": costs,
                          "seconds": round(total, 1), "runs": [asdict(r) for r in rows]},
                         indent=2))  # fmt: skip
        return
    print(f"speed {args.speed:g}, --parallel {args.parallel}, --canary {args.canary}, "
          f"--batch-size {args.batch_size}, {args.operator_cores} operator cores; "
          f"the whole model: {total:.0f} s")  # fmt: skip
    print(table(rows))
    unknown = Counter[str]()
    for r in rows:
        unknown.update(r.unknown)
    if unknown:
        print(f"commands the simulator does not know: {dict(unknown)}")
    print(profile_text(rows))


if __name__ == "__main__":
    main()
