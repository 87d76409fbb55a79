"""Service secrets on real hosts: delivered by the deploy from the operator's secrets folder,
readable by the service (a DynamicUser, through LoadCredential) and by no other user, never
in the Nix store; rotated by a deploy; missing ones shown by `fleet status`."""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.request
from pathlib import Path

import pytest

from fleet.lab import ops
from fleet.lab.layout import WEB_PORT
from fleet.lab.rootfs import DEPLOY_USER
from fleet.ssh import Endpoint
from tests.lab.fleetrun import assert_safe, results, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]

SECRET_PATH = "/var/lib/fleet/secrets/lab-web/token"


def operator_env(tmp_path: Path, value: str | None) -> dict[str, str]:
    """The operator's own config with a secrets folder holding `lab-token` (if a value)."""
    folder = tmp_path / "secrets"
    folder.mkdir(exist_ok=True)
    token = folder / "lab-token"
    if value is None:
        token.unlink(missing_ok=True)
    else:
        token.write_text(value)
    config = tmp_path / "xdg" / "fleet" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"secretsDir: {folder}\n")
    return dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))


def digests(lab) -> dict[str, str]:
    """What each host's service says its credential is."""
    found = {}
    for endpoint in ops.endpoints(lab):
        url = f"http://{endpoint.address}:{WEB_PORT}/secret"
        with urllib.request.urlopen(url, timeout=5) as response:
            found[endpoint.name] = response.read().decode().strip()
    return found


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def deploy(lab, env: dict[str, str]) -> tuple[int, dict, str]:
    return run_fleet(lab, "deploy", "--canary", "0", env=env)


def test_a_secret_is_delivered_rotated_and_reported_missing(lab, tmp_path):
    first = secrets.token_hex(16)
    env = operator_env(tmp_path, first)
    set_release(lab, "s1", secret=True)
    code, report, err = deploy(lab, env)
    assert code == 0, err
    assert set(results(report).values()) == {"deployed"}
    assert set(digests(lab).values()) == {sha(first)}

    with ops.transport(lab) as transport:
        endpoint = ops.endpoints(lab)[0]
        root = transport.remote(endpoint)
        mode = root.run(["stat", "-c", "%a %U %G", SECRET_PATH]).stdout.split()
        assert mode == ["600", "root", "root"]
        # Not in the store, in no file of it.
        found = root.run(["grep", "-rlF", first, "/nix/store"], check=False)
        assert found.returncode == 1 and not found.stdout, found.stdout
        # No other user reads it: neither where it is kept nor where the service sees it.
        other = transport.remote(
            Endpoint(endpoint.name, endpoint.address, endpoint.port, DEPLOY_USER,
                     endpoint.host_key)
        )  # fmt: skip
        for path in (SECRET_PATH, "/run/credentials/lab-web.service/token"):
            attempt = other.run(["cat", path], check=False)
            assert not attempt.ok and first not in attempt.stdout, path

    # Rotation is a deploy: the same release, a new value; the service restarts with it.
    second = secrets.token_hex(16)
    env = operator_env(tmp_path, second)
    code, report, err = deploy(lab, env)
    assert code == 0, err
    assert set(digests(lab).values()) == {sha(second)}

    # A secret gone from a host is a breach `fleet status` names; a deploy delivers it.
    with ops.transport(lab) as transport:
        transport.remote(ops.endpoints(lab)[0]).run(["rm", "-f", SECRET_PATH])
    code, status, err = run_fleet(lab, "status", env=env)
    assert code == 4, err
    name = ops.endpoints(lab)[0].name
    assert any(b["kind"] == "missing-secrets" for b in status[name]["breaches"]), status
    code, report, err = deploy(lab, env)
    assert code == 0, err
    code, status, err = run_fleet(lab, "status", env=env)
    assert code == 0, (err, status)
    assert_safe(lab)

    # Declared no more: removed from every host once the release without it is committed.
    set_release(lab, "s3")
    code, report, err = deploy(lab, env)
    assert code == 0, err
    with ops.transport(lab) as transport:
        for endpoint in ops.endpoints(lab):
            left = transport.remote(endpoint).run(["test", "-e", SECRET_PATH], check=False)
            assert not left.ok, endpoint.name


def test_a_missing_secret_file_stops_the_deploy_before_any_host(lab, tmp_path):
    env = operator_env(tmp_path, None)
    set_release(lab, "s2", secret=True)
    code, report, err = deploy(lab, env)
    assert code == 2, err
    assert "lab-token" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1, err
    assert report["exitCode"] == 2 and "lab-token" in report["error"]


def test_a_checkout_may_not_choose_the_secrets_folder(lab):
    (lab.flake / "fleet.yaml").write_text(
        (lab.flake / "fleet.yaml").read_text() + "secretsDir: /root/.ssh\n"
    )
    try:
        code, _report, err = run_fleet(lab, "status")
        assert code == 2 and "secretsDir" in err, err
    finally:
        lines = (lab.flake / "fleet.yaml").read_text().splitlines()
        (lab.flake / "fleet.yaml").write_text(
            "".join(f"{line}\n" for line in lines if not line.startswith("secretsDir"))
        )
