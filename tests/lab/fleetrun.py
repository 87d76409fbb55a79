"""Running `fleet` against the test lab as an operator would, and the safety check."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from fleet import health, nix, traffic
from fleet.hostops import HostOps
from fleet.inventory import Inventory, parse
from fleet.lab import flake, ops
from fleet.lab.layout import Lab

MENDS = {
    ops.Fault.PARTITION: ops.Fault.HEAL,
    ops.Fault.STOP_SSH: ops.Fault.START_SSH,
    ops.Fault.FILL_DISK: ops.Fault.FREE_DISK,
}


@contextlib.contextmanager
def faulted(lab: Lab, host: str, fault: ops.Fault) -> Iterator[None]:
    """A lab fault for the duration of a block, mended afterwards whatever happened."""
    ops.fault(lab, host, fault)
    try:
        yield
    finally:
        ops.fault(lab, host, MENDS[fault])


@contextlib.contextmanager
def own_lab(offset: int, count: int, **layout: Any) -> Iterator[Lab]:
    """A lab of its own beside the session's (instance + offset), for one module's tests:
    `count` hosts laid out as `ops.up` is told, release "0" deployed on every host; down
    at the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEET_LAB_INSTANCE", str((Lab.from_env().instance + offset) % 255))
        instance = Lab.from_env()
        ops.down(instance)
        ops.up(instance, count, lambda _m: None, **layout)
        set_release(instance, "0")
        code, _, err = run_fleet(instance, "deploy", *RESET)
        assert code == 0, err
        try:
            yield instance
        finally:
            ops.down(instance)


# A deploy that only brings hosts back to a known release for the next test: one wave, no
# drain, no analysis (what a test proves is never this deploy).
RESET = ("--canary", "0", "--batch-size", "100%", "--no-drain", "--skip-analysis")


def fleet_argv(lab: Lab, *args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", "--flake", str(lab.flake), "--json", *args]


def run_fleet(
    lab: Lab, *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """Exit code, the JSON report (or None) and stderr of one `fleet` run (stdin closed).

    A run past ``timeout`` fails the test with all it printed and, from Python's fault
    handler (SIGABRT), where each of its threads waited."""
    argv = fleet_argv(lab, *args)
    argv.insert(1, "-Xfaulthandler")
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"fleet {' '.join(args)}: no end within {timeout:g} s:\n{stderr}")
    report = json.loads(stdout) if stdout.strip() else None
    # Shown by pytest when the test fails: each host's whole message, not the progress line.
    print(f"fleet {' '.join(args)}: exit {proc.returncode}\n{stdout}")
    return proc.returncode, report, stderr


def results(report: dict[str, Any]) -> dict[str, str]:
    return {name: host["result"] for name, host in report["hosts"].items()}


def set_release(lab: Lab, version: str, **kwargs: Any) -> None:
    flake.set_release(lab, flake.LabRelease(version, **kwargs))


@cache
def inventory(lab: Lab) -> Inventory:
    return parse(nix.eval_json(str(lab.flake), "fleet"), "lab")


def host_states(lab: Lab) -> dict[str, Any]:
    with ops.transport(lab) as transport:
        return {e.name: HostOps(transport.remote(e)).state() for e in ops.endpoints(lab)}


def traffic_view(lab: Lab) -> tuple[list[traffic.Server], dict[str, str]]:
    """Every balancer's view of every instance, as `fleet traffic` reads it."""
    balanced = inventory(lab).traffic
    if balanced is None:
        return [], {}
    endpoints = {e.name: e for e in ops.endpoints(lab)}
    with ops.transport(lab) as transport:
        return traffic.view(balanced, lambda n: transport.remote(endpoints[n]))


def running_paths(lab: Lab) -> dict[str, str | None]:
    return {name: state.running for name, state in host_states(lab).items()}


def assert_safe(lab: Lab, hosts: list[str] | None = None) -> None:
    """The product's invariant: every host runs its profile's current generation, which its
    boot entry names too and which is healthy; no transaction (lock), no dead-man switch,
    nothing abandoned."""
    with ops.transport(lab) as transport:
        for endpoint in ops.endpoints(lab):
            name = endpoint.name
            if hosts is not None and name not in hosts:
                continue
            hostops = HostOps(transport.remote(endpoint))
            state = hostops.state()
            assert state.running is not None, f"{name}: runs no system"
            # A --boot deploy's documented state: the new generation waits for the next boot.
            assert state.running == state.current_path or state.pending_reboot, (
                f"{name}: runs {state.running}, profile's current is {state.current_path}"
            )
            assert state.boot_entry == state.current_path, (
                f"{name}: boot entry {state.boot_entry}, profile's current {state.current_path}"
            )
            assert state.txn is None, f"{name}: transaction left behind: {state.txn}"
            assert state.watchers == (), f"{name}: dead-man switch left behind: {state.watchers}"
            assert state.breaches(name) == [], f"{name}: {state.breaches(name)}"
            verdict = health.check_host(hostops, state.declared, 20)
            assert verdict.ok, f"{name}: unhealthy: {verdict.message}"
            assert state.traffic == {}, f"{name}: drain or weight left behind: {state.traffic}"
            assert state.maintenance is None, f"{name}: in maintenance: {state.maintenance}"
    # Every healthy instance in rotation on every balancer that serves it (the hosts are
    # all healthy by now); the agent's word reaches a balancer within its interval.
    if inventory(lab).traffic is not None:
        deadline = time.monotonic() + 10
        while True:
            servers, errors = traffic_view(lab)
            out = [s for s in servers if not s.serving]
            if (not out and not errors) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert errors == {}, f"balancers not readable: {errors}"
        assert out == [], f"healthy instances out of rotation: {out}"


def wait_until_safe(lab: Lab, timeout: float = 60, hosts: list[str] | None = None) -> None:
    """The invariant, once the host-side recovery the design promises has had its time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_safe(lab, hosts)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
