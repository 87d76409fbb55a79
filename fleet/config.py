"""Operator configuration: ``~/.config/fleet/config.yaml``, then ``fleet.yaml`` at the
flake root.

For each key the operator's own file wins. A checkout's ``fleet.yaml`` is not trusted with
what would run on the operator's machine: it may not set a jump host (OpenSSH runs one
through a shell) nor choose which flake is the fleet; every value is checked by type and
shape before use, and none is ever given to a shell (docs/security.md).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet import flakeref
from fleet.errors import UsageError


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    expected: str


KEYS: dict[str, Key] = {
    "flake": Key(str, "a flake reference"),
    "sshUser": Key(str, "a user name"),
    "identityFile": Key(str, "a path to an ssh private key"),
    "knownHostsFile": Key(str, "a path to a known_hosts file"),
    "signingKey": Key(str, "a path to a Nix secret signing key"),
    "secretsDir": Key(str, "a path to the folder of the services' secret files"),
    "jumpHost": Key(str, "an ssh destination such as user@bastion:22"),
    "jumpHostKeys": Key(dict, "a mapping of jump host to its pinned key, TYPE BASE64"),
    "sshOptions": Key(
        dict, "a mapping of KexAlgorithms, Ciphers, MACs, Compression or IPQoS to its value"
    ),
    "connectTimeout": Key((int, float), "a number of seconds"),
    "parallel": Key(int, "a whole number of hosts"),
    "healthTimeout": Key((int, float), "a number of seconds"),
    "confirmTimeout": Key((int, float), "a number of seconds"),
    "events": Key(dict, "a mapping of file (a path) and url (an http or https URL)"),
    "annotations": Key(
        dict, "a mapping of url (Grafana's /api/annotations, http or https) and tokenFile"
    ),
}
PATH_KEYS = ("identityFile", "knownHostsFile", "signingKey", "secretsDir")
# Keys that are mappings of their own (docs/events.md): each sub-key a path or a URL.
SECTIONS: dict[str, dict[str, str]] = {
    "events": {"file": "path", "url": "url"},
    "annotations": {"url": "url", "tokenFile": "path"},
}
# Keys only the operator's own file may set: what runs where (a jump host goes through a
# shell), which flake is the fleet, which key signs (else a checkout could have its own
# systems signed with any key the operator holds), where secrets are read (else it could
# have any file of the operator's sent to a host), and where the operator's deploys are
# reported (else it could have them, and a Grafana token, sent anywhere).
OPERATOR_ONLY = (
    "flake", "jumpHost", "jumpHostKeys", "signingKey", "secretsDir", "events", "annotations",
    "sshOptions",
)  # fmt: skip
# ssh options an operator may set for every connection (sshOptions): how the session is
# encrypted and carried, never how a host is found or verified (a checkout may set none).
SSH_OPTIONS = ("KexAlgorithms", "Ciphers", "MACs", "Compression", "IPQoS")
_SSH_OPTION_VALUE = re.compile(r"[A-Za-z0-9@.,+_-]{1,256}")

# user@host:port, several joined by commas; host a name, an IPv4 address or [IPv6].
_JUMP = re.compile(
    r"(?:[a-z_][a-z0-9_.-]{0,31}@)?(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?"
)
# A jump host's name or address (as in jumpHost, IPv6 with or without brackets), and the
# key pinned for it: the two words of a known_hosts line after the host, nothing else.
_JUMP_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:.]+|\[[0-9A-Fa-f:.]+\]")
_HOST_KEY = re.compile(
    r"(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]{16,}={0,2}"
)


def _jump_host_keys(value: dict[Any, Any]) -> bool:
    return bool(value) and all(
        isinstance(host, str)
        and isinstance(key, str)
        and _JUMP_HOST.fullmatch(host) is not None
        and _HOST_KEY.fullmatch(key) is not None
        for host, key in value.items()
    )


def web_url(value: Any) -> bool:
    """An http or https URL with a host, and no credentials (they belong in a file)."""
    if not isinstance(value, str) or not value.isprintable() or " " in value:
        return False
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname) and "@" not in url.netloc


def _section(path: Path, key: str, value: dict[Any, Any]) -> dict[str, str]:
    """One of SECTIONS: each sub-key checked, paths made absolute as PATH_KEYS are."""
    kinds = SECTIONS[key]
    found: dict[str, str] = {}
    for sub, item in value.items():
        name, kind = f"{key}.{sub}", kinds.get(str(sub))
        if kind is None:
            known = ", ".join(f"{key}.{k}" for k in kinds)
            raise UsageError(f"{path}: unknown key {name!r}; known keys: {known}")
        if kind == "url" and not web_url(item):
            raise UsageError(
                f"{path}: key {name!r}: expected an http or https URL without credentials, "
                f"got {item!r}"
            )
        if kind == "path" and not (isinstance(item, str) and item):
            raise UsageError(f"{path}: key {name!r}: expected a path, got {item!r}")
        found[str(sub)] = (
            item if kind == "url" else str((path.parent / Path(item).expanduser()).resolve())
        )
    if not found or (key == "annotations" and "url" not in found):
        raise UsageError(f"{path}: key {key!r}: expected {KEYS[key].expected}, got {value!r}")
    return found


SHAPES: dict[str, Callable[[Any], bool]] = {
    # As the inventory's sshUser: it replaces that one on every ssh command line, and a
    # checkout's fleet.yaml may set it.
    "sshUser": lambda v: re.fullmatch(r"[a-z_][a-z0-9_-]*", v) is not None,
    "jumpHost": lambda v: all(_JUMP.fullmatch(part) for part in v.split(",")),
    "jumpHostKeys": _jump_host_keys,
    "sshOptions": lambda v: all(
        name in SSH_OPTIONS and isinstance(value, str) and _SSH_OPTION_VALUE.fullmatch(value)
        for name, value in v.items()
    ),
}


@dataclass(frozen=True)
class Config:
    values: dict[str, Any]
    sources: tuple[Path, ...]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def user_config_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "fleet" / "config.yaml"


def _read(path: Path) -> dict[str, Any]:
    import yaml  # here: a command run without any config file never loads it

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UsageError(f"{path}:{line}: not valid YAML") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = KEYS.get(str(key))
        if spec is None:
            raise UsageError(f"{path}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
        if not isinstance(value, spec.type) or isinstance(value, bool):
            raise UsageError(f"{path}: key {key!r}: expected {spec.expected}, got {value!r}")
        # A number of seconds, whole or not: finite, positive and under a day.
        if isinstance(value, (int, float)) and spec.type == (int, float) and not 0 < value < 86400:
            raise UsageError(f"{path}: key {key!r}: expected {spec.expected}, got {value!r}")
        shape = SHAPES.get(str(key))
        if shape is not None and not shape(value):
            raise UsageError(f"{path}: key {key!r}: expected {spec.expected}, got {value!r}")
        if key in SECTIONS and isinstance(value, dict):
            value = _section(path, str(key), value)
        if key in PATH_KEYS:
            value = str((path.parent / Path(str(value)).expanduser()).resolve())
            if any(c.isspace() for c in value):
                # Nix splits NIX_SSHOPTS on spaces: every copy would fail.
                raise UsageError(f"{path}: key {key!r}: a path without spaces, got {value!r}")
        values[key] = value
    return values


def _config_of(path: Path) -> Config:
    return Config(_read(path), (path,)) if path.is_file() else Config({}, ())


def load_user() -> Config:
    """The operator's own ~/.config/fleet/config.yaml."""
    return _config_of(user_config_path())


def load(flake: str, user: Config | None = None) -> Config:
    """The user's config over the flake's fleet.yaml (when the flake is local), which may
    not set what only the operator decides."""
    user = load_user() if user is None else user
    root = flakeref.root(flake)
    local = _config_of(root / "fleet.yaml") if root is not None else Config({}, ())
    for key in OPERATOR_ONLY:
        if key in local.values:
            raise UsageError(
                f"{local.sources[0]}: key {key!r} may only be set in the operator's own "
                f"{user_config_path()}: a checkout must not choose it"
            )
    return Config({**local.values, **user.values}, user.sources + local.sources)
