"""Reading the services' secrets on the operator's side: all or nothing, before any host."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from fleet import secrets
from fleet.errors import UsageError
from fleet.inventory import Host, Secret


def host(name: str, *files: str) -> Host:
    return Host(
        name=name, address="192.0.2.1", ssh_port=22, ssh_user="root", tags=(), system="x",
        host_key=None, services=("web",), checks=(),
        secrets=tuple(
            Secret("web", f"cred{i}", f, f"/var/lib/fleet/secrets/web/cred{i}")
            for i, f in enumerate(files)
        ),
    )  # fmt: skip


def test_each_host_gets_its_declared_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"\x00alpha")
    (tmp_path / "b").write_text("beta")
    found = secrets.payloads([host("h1", "a", "b"), host("h2", "b"), host("h3")], str(tmp_path))
    assert set(found) == {"h1", "h2"}
    assert found["h1"][0] == {
        "service": "web",
        "name": "cred0",
        "data": base64.b64encode(b"\x00alpha").decode(),
    }
    assert found["h2"] == [
        {"service": "web", "name": "cred0", "data": base64.b64encode(b"beta").decode()}
    ]


def test_no_secrets_needs_no_folder() -> None:
    assert secrets.payloads([host("h1")], None) == {}


def test_secrets_without_a_folder_are_an_error() -> None:
    with pytest.raises(UsageError, match="sets no secretsDir"):
        secrets.payloads([host("h1", "a")], None)


def test_a_missing_file_names_host_service_and_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"host h1: service web: secret file .*/a does not exist"):
        secrets.payloads([host("h1", "a")], str(tmp_path))


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * (secrets.MAX_BYTES + 1))
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        secrets.payloads([host("h1", "a")], str(tmp_path))
