"""Shared fixtures. Lab tests boot real containers; they need root and the lab's tools."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

# Lab tests run their own lab instances, never the operator's default one (instance 0),
# and never wait on binary caches the machine cannot reach.
os.environ.setdefault("FLEET_LAB_INSTANCE", "1")
os.environ.setdefault("NIX_CONFIG", "substituters =")


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root"
    for tool in ("systemd-nspawn", "debootstrap", "nix", "ssh"):
        if shutil.which(tool) is None:
            return f"lab tests need {tool}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = lab_unavailable()
    if reason is None:
        return
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def lab() -> Iterator[object]:
    """A three-host lab for the whole session, torn down at the end."""
    from fleet.lab import ops
    from fleet.lab.layout import Lab

    instance = Lab.from_env()
    ops.down(instance)
    ops.up(instance, 3, lambda _m: None)
    yield instance
    ops.down(instance)


@pytest.fixture(scope="session")
def lab_transport(lab: object) -> Iterator[object]:
    from fleet.lab import ops

    with ops.transport(lab) as transport:  # type: ignore[arg-type]
        yield transport


@pytest.fixture(scope="session")
def lab_remotes(lab: object, lab_transport: object) -> dict[str, object]:
    """One Remote per lab host, keyed by name, with pinned host keys."""
    from fleet.lab import ops

    return {e.name: lab_transport.remote(e) for e in ops.endpoints(lab)}  # type: ignore[attr-defined, arg-type]
