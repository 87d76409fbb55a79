"""Closure differences by package name and version, as builtins.parseDrvName splits them."""

from __future__ import annotations

import pytest

from fleet.closure import diff, parse_name


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nix/store/abc-openssl-3.0.2", ("openssl", "3.0.2")),
        ("/nix/store/abc-python3.11-click-8.1.7", ("python3.11-click", "8.1.7")),
        (
            "/nix/store/abc-nixos-system-web1-25.11.20260101.abcdef",
            ("nixos-system-web1", "25.11.20260101.abcdef"),
        ),
        ("/nix/store/abc-etc", ("etc", "")),
        ("/nix/store/abc-lab-system-lab3-df1", ("lab-system-lab3-df1", "")),
    ],
)
def test_parse_name(path, expected):
    assert parse_name(path) == expected


def test_diff_kinds():
    old = [
        "/nix/store/a-openssl-3.0.1",
        "/nix/store/b-gone-1.0",
        "/nix/store/c-unit",
        "/nix/store/d-same-2",
    ]
    new = [
        "/nix/store/e-openssl-3.0.2",
        "/nix/store/f-new-0.1",
        "/nix/store/g-unit",
        "/nix/store/d-same-2",
    ]
    changes = {c.package: (c.kind, str(c)) for c in diff(old, new)}
    assert changes == {
        "gone": ("removed", "gone: 1.0 → ∅"),
        "new": ("added", "new: ∅ → 0.1"),
        "openssl": ("changed", "openssl: 3.0.1 → 3.0.2"),
        "unit": ("rebuilt", "unit: (no version) rebuilt (same version, other inputs)"),
    }
