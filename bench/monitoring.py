"""What monitoring costs and how fast it tells: a crash to the alert at the webhook, an
analysis step's time in a deploy, the host metrics' cost per step, the scrape at scale.

Usage (as root): python bench/monitoring.py [--hosts 64] [--scrape-only]
1. A lab of four hosts (lab1, lab2 run lab-web, lab3 HAProxy, lab4 the monitoring host):
   - lab2 crashed: seconds until Alertmanager posts FleetHostDown firing to the webhook,
     and from `lab up` bringing it back until the resolved notice;
   - a deploy of lab1 and lab2 under client load with the lab's canary analysis (5
     measurements 2 s apart) and the same with --skip-analysis: the time the step adds;
   - `fleet-host metrics` on lab1, with 1,000 release records: milliseconds per run.
2. A lab of --hosts hosts (the last the monitoring host; `lab up` raises the kernel limits
   it needs): Prometheus' scrape of every node exporter (seconds per scrape, samples per
   scrape), its CPU share and memory, and the series in its head.
Each on its own lab instance, torn down at the end.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("FLEET_LAB_INSTANCE", "8")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet.lab import flake, ops
from fleet.lab.layout import Lab
from fleet.lab.load import Clients

FLEET_HOST = "/run/current-system/sw/bin/fleet-host"


def fleet(lab: Lab, *args: str) -> tuple[int, Any]:
    argv = [sys.executable, "-m", "fleet", "--flake", str(lab.flake), "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def on(lab: Lab, host: str, *argv: str) -> str:
    code, report = fleet(lab, "exec", host, "--", *argv)
    if code != 0:
        raise SystemExit(f"{host}: {' '.join(argv)}: {report}")
    return str(report["hosts"][host]["stdout"])


def query(lab: Lab, monitor: str, promql: str) -> list[dict[str, Any]]:
    answer = json.loads(on(lab, monitor, FLEET_HOST, "prom-query", "--port", "9090",
                           "--query", promql))  # fmt: skip
    return answer["data"]["result"]  # type: ignore[no-any-return]


def lab_of(count: int, instance: int, **layout: Any) -> Lab:
    os.environ["FLEET_LAB_INSTANCE"] = str(instance)
    lab = Lab.from_env()
    ops.down(lab)
    ops.up(lab, count, lambda _m: None, **layout)
    flake.set_release(lab, flake.LabRelease("0"))
    code, report = fleet(lab, "deploy")
    if code != 0:
        raise SystemExit(f"first deploy failed: {report}")
    return lab


class Webhook:
    """Alertmanager's notices, as they arrive: (seconds since start, alertname, status)."""

    def __init__(self, lab: Lab) -> None:
        self.start = time.monotonic()
        self.seen: list[tuple[float, str, str, str]] = []
        seen, start = self.seen, self.start

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                at = time.monotonic() - start
                for a in body["alerts"]:
                    seen.append((at, a["labels"]["alertname"], a["labels"].get("host", ""),
                                 a["status"]))  # fmt: skip
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((lab.gateway, flake.WEBHOOK_PORT), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, name: str, host: str, status: str, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, alert, where, state in self.seen:
                if (alert, where, state) == (name, host, status):
                    return at
            time.sleep(0.5)
        raise SystemExit(f"no {status} {name} for {host} within {timeout:g} s")


def crash_to_webhook(lab: Lab) -> str:
    hook = Webhook(lab)
    try:
        hook.start = time.monotonic()
        ops.fault(lab, "lab2", ops.Fault.CRASH)
        fired = hook.wait("FleetHostDown", "lab2", "firing")
        back = time.monotonic()
        ops.up(lab, None, lambda _m: None)
        resolved = hook.wait("FleetHostDown", "lab2", "resolved") - (back - hook.start)
    finally:
        hook.server.shutdown()
        hook.server.server_close()
    return (
        f"crash to FleetHostDown at the webhook {fired:.0f} s "
        f"(rule `for` 2m + Alertmanager group_wait 30 s + scrape/evaluation); "
        f"back up to resolved {resolved:.0f} s"
    )


def analysis_cost(lab: Lab) -> str:
    flake.set_analysis(lab, flake.LAB_ANALYSIS)
    walls: dict[str, list[float]] = {"analysis": [], "skip": []}
    try:
        for n in range(2):
            for kind, extra in (("analysis", ()), ("skip", ("--skip-analysis",))):
                flake.set_release(lab, flake.LabRelease(f"b{n}{kind[0]}"))
                with Clients(lab, lab.hosts(4)[2].address, flake.INGRESS_PORT, threads=2,
                             max_seconds=300):  # fmt: skip
                    start = time.monotonic()
                    code, report = fleet(lab, "deploy", "lab1", "lab2", *extra)
                    walls[kind].append(time.monotonic() - start)
                if code != 0:
                    raise SystemExit(f"deploy ({kind}) failed: {report}")
    finally:
        flake.set_analysis(lab, None)
    with_, without = statistics.median(walls["analysis"]), statistics.median(walls["skip"])
    return (
        f"deploy of 2 hosts (canary, then 1) with analysis {with_:.1f} s, --skip-analysis "
        f"{without:.1f} s: the step adds {with_ - without:.1f} s (5 measurements 2 s apart)"
    )


def metrics_cost(lab: Lab) -> str:
    record = json.dumps({"release": "20261125T000000Z-abcd", "action": "deploy",
                         "result": "deployed", "time": "2026-11-25T00:00:00+00:00",
                         "timings": {"connect": 0.1, "activate": 0.5}})  # fmt: skip
    script = (
        "import json,subprocess,time\n"
        "log='/var/lib/fleet/releases.jsonl'\n"
        f"open(log,'a').write(({record!r}+'\\n')*1000)\n"
        "def run():\n"
        f"    t=time.perf_counter(); subprocess.run(['{FLEET_HOST}','metrics'],"
        "capture_output=True,check=True); return time.perf_counter()-t\n"
        "first=run(); rest=sorted(run() for _ in range(10))\n"
        "print(json.dumps([first, rest[5]]))\n"
    )
    first, median = json.loads(on(lab, "lab1", "python3", "-c", script))
    return (
        f"fleet-host metrics with 1,000 more release records: first run {first * 1000:.0f} ms "
        f"(reads them all), then {median * 1000:.0f} ms a run (reads on from where it stopped; "
        "the Python start is most of it)"
    )


def scrape_cost(count: int) -> str:
    lab = lab_of(count, int(os.environ.get("FLEET_LAB_INSTANCE", "8")) + 1, monitoring=True)
    monitor = f"lab{count}"
    try:
        time.sleep(40)  # a few scrapes of every target, and a rate window
        up = query(lab, monitor, 'sum(up{job="node"})')
        duration = query(lab, monitor, 'avg(scrape_duration_seconds{job="node"})')
        slowest = query(lab, monitor, 'max(scrape_duration_seconds{job="node"})')
        samples = query(lab, monitor, 'avg(scrape_samples_scraped{job="node"})')
        cpu = query(lab, monitor,
                    'rate(process_cpu_seconds_total{job="prometheus"}[30s])')  # fmt: skip
        memory = query(lab, monitor, 'process_resident_memory_bytes{job="prometheus"}')
        series = query(lab, monitor, "prometheus_tsdb_head_series")

        def one(vector: list[dict[str, Any]]) -> float:
            return float(vector[0]["value"][1])

        return (
            f"{count} hosts, every 2 s: {one(up):.0f} node exporters up, "
            f"{one(duration) * 1000:.0f} ms a scrape (slowest {one(slowest) * 1000:.0f} ms), "
            f"{one(samples):.0f} samples a scrape; Prometheus {one(cpu) * 100:.0f} % of a core, "
            f"{one(memory) / 2**20:.0f} MiB, {one(series):.0f} series"
        )
    finally:
        ops.down(lab)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=64, help="the scrape's lab; 0: none")
    parser.add_argument("--scrape-only", action="store_true", help="the scrape's lab alone")
    args = parser.parse_args()
    if not args.scrape_only:
        lab = lab_of(4, int(os.environ["FLEET_LAB_INSTANCE"]), balancers=1, monitoring=True)
        try:
            print(metrics_cost(lab), flush=True)
            print(analysis_cost(lab), flush=True)
            print(crash_to_webhook(lab), flush=True)
        finally:
            ops.down(lab)
    if args.hosts:
        print(scrape_cost(args.hosts), flush=True)


if __name__ == "__main__":
    main()
