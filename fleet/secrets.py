"""Service secrets: read from the operator's secrets folder, delivered by the host's begin.

The declaration names files only (``file``); the folder they are read from is the
operator's own setting (``secretsDir``), so a checkout cannot have any other file of the
operator's machine sent anywhere. Every file is read before any host is touched: a missing
one is an error naming it, with nothing half done.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from fleet.errors import UsageError
from fleet.inventory import Host

MAX_BYTES = 1 << 20  # as fleet-host accepts


def payloads(hosts: Sequence[Host], folder: str | None) -> dict[str, list[dict[str, str]]]:
    """Per host, what its begin delivers: service, credential name, base64 content."""
    wanted = [h for h in hosts if h.secrets]
    if not wanted:
        return {}
    if not folder:
        first = wanted[0].secrets[0]
        raise UsageError(
            f"host {wanted[0].name}: service {first.service} declares secret {first.name!r}, "
            "but the operator's config sets no secretsDir to read it from"
        )
    cache: dict[str, str] = {}
    found: dict[str, list[dict[str, str]]] = {}
    for host in wanted:
        for secret in host.secrets:
            if secret.file not in cache:
                cache[secret.file] = _read(Path(folder) / secret.file, host.name, secret.service)
            found.setdefault(host.name, []).append(
                {"service": secret.service, "name": secret.name, "data": cache[secret.file]}
            )
    return found


def _read(path: Path, host: str, service: str) -> str:
    where = f"host {host}: service {service}: secret file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"{where} is larger than 1 MiB")
    return base64.b64encode(data).decode()
