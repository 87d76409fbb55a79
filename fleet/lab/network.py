"""The lab's network: one bridge with the operator's address, one namespace and veth per host."""

from __future__ import annotations

import json
from collections.abc import Sequence

from fleet import process
from fleet.lab.layout import Lab, LabHost


def _ip(*args: str, check: bool = True) -> process.Result:
    return process.run(["ip", *args], check=check, what="ip " + " ".join(args))


def _batch(commands: Sequence[str], netns: str | None = None) -> None:
    """Several ip commands in one process: each host's setup is one fork, not six."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    process.run(argv, input="\n".join(commands) + "\n", what=f"ip -batch ({netns or 'host'})")


def links(prefix: str) -> list[str]:
    out = _ip("-j", "link", "show").stdout
    return [link["ifname"] for link in json.loads(out or "[]") if link["ifname"].startswith(prefix)]


def namespaces(prefix: str) -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def ensure_bridge(lab: Lab) -> None:
    if lab.bridge in links(lab.bridge):
        return
    _batch([
        f"link add {lab.bridge} type bridge",
        f"addr add {lab.gateway}/24 dev {lab.bridge}",
        f"link set {lab.bridge} up",
    ])  # fmt: skip


def ensure_host(lab: Lab, host: LabHost, existing_netns: Sequence[str]) -> None:
    """Namespace with eth0 at the host's address, its peer on the bridge."""
    if host.netns in existing_netns:
        return
    _ip("netns", "add", host.netns)
    _batch([
        f"link add {host.veth} type veth peer name eth0 netns {host.netns}",
        f"link set {host.veth} master {lab.bridge} up",
    ])  # fmt: skip
    _batch([
        f"addr add {host.address}/24 dev eth0",
        "link set eth0 up",
        "link set lo up",
        f"route add default via {lab.gateway}",
    ], netns=host.netns)  # fmt: skip


def set_link(host: LabHost, up: bool) -> None:
    """Partition (down) or heal (up) a host at the bridge; the host sees its carrier drop."""
    _ip("link", "set", host.veth, "up" if up else "down")


def link_is_up(host: LabHost) -> bool:
    out = _ip("-j", "link", "show", host.veth, check=False).stdout
    entries = json.loads(out or "[]")
    return bool(entries) and "UP" in entries[0].get("flags", [])


def remove_all(lab: Lab) -> None:
    """Every link and namespace of the instance, whether or not the lab's state knows of it."""
    for veth in links(lab.veth_prefix):
        _ip("link", "del", veth, check=False)
    for netns in namespaces(lab.netns_prefix):
        _ip("netns", "del", netns, check=False)
    if links(lab.bridge):
        _ip("link", "del", lab.bridge, check=False)
