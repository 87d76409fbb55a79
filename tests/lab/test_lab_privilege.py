"""A deploy user other than root: it deploys and rolls back through the one program sudo
allows it, copies only closures signed by a key the hosts trust, and is refused the rest."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fleet.hostops import RUNNING_HELPER, HelperError, HostOps, new_token
from fleet.lab import ops
from fleet.lab.rootfs import DEPLOY_USER
from fleet.ssh import Endpoint
from tests.lab.fleetrun import assert_safe, host_states, results, run_fleet, set_release

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("safety_check")]


def operator_env(lab, tmp_path: Path, **settings: str) -> dict[str, str]:
    """The operator's own config: the deploy user and the lab's signing key, unless the
    test sets others."""
    folder = tmp_path / "xdg" / "fleet"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {"sshUser": DEPLOY_USER, "signingKey": str(lab.signing_key), **settings}
    text = "".join(f"{key}: {value}\n" for key, value in wanted.items())
    (folder / "config.yaml").write_text(text)
    return dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))


def as_deploy_user(endpoint: Endpoint) -> Endpoint:
    return Endpoint(endpoint.name, endpoint.address, endpoint.port, DEPLOY_USER, endpoint.host_key)


def test_a_deploy_user_deploys_and_rolls_back(lab, tmp_path):
    env = operator_env(lab, tmp_path)
    before = {name: state.running for name, state in host_states(lab).items()}
    set_release(lab, "p1")
    code, report, err = run_fleet(lab, "deploy", "--canary", "0", env=env)
    assert code == 0, err
    assert set(results(report).values()) == {"deployed"}
    after = host_states(lab)
    for name, state in after.items():
        assert state.running == report["hosts"][name]["new"]["path"] != before[name]
    assert_safe(lab)
    code, report, err = run_fleet(lab, "rollback", "--release", report["release"], "--yes", env=env)
    assert code == 0, err
    assert {name: state.running for name, state in host_states(lab).items()} == before


def test_an_unsigned_closure_is_refused_and_nothing_changes(lab, tmp_path):
    """Signed with a key the hosts do not trust: the copy fails, the hosts are untouched."""
    key = tmp_path / "other.sec"
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "other-1", str(key), str(tmp_path / "o.pub")],
        check=True,
    )
    env = operator_env(lab, tmp_path, signingKey=str(key))
    before = {name: state.running for name, state in host_states(lab).items()}
    set_release(lab, "p-unsigned")
    code, report, err = run_fleet(lab, "deploy", "--canary", "0", env=env)
    assert code != 0, err
    for host in report["hosts"].values():
        assert host["result"] == "failed" and host["phase"] == "copy", host
        assert "signingKey" in host["message"], host
    assert {name: state.running for name, state in host_states(lab).items()} == before


def test_sudo_allows_the_running_helper_and_nothing_else(lab):
    with ops.transport(lab) as transport:
        endpoint = as_deploy_user(ops.endpoints(lab)[0])
        remote = transport.remote(endpoint)
        assert remote.run(["id", "-un"]).stdout.strip() == DEPLOY_USER
        for argv in (
            ["sudo", "-n", "id"],
            ["sudo", "-n", "/bin/sh", "-c", "id"],
            ["sudo", "-n", "/usr/bin/nix-env", "--version"],
            ["sudo", "-n", "-E", RUNNING_HELPER, "version"],  # no environment of its own
            ["sudo", "-n", "FLEET_HOST_ROOT=/tmp", RUNNING_HELPER, "version"],
        ):
            assert not remote.run(argv, check=False).ok, argv
        assert remote.run(["sudo", "-n", RUNNING_HELPER, "version"]).ok
        # What only the host runs is refused even through the allowed program.
        result = remote.run(
            ["sudo", "-n", RUNNING_HELPER, "watch", "--token", "0" * 32], check=False
        )
        assert result.returncode == 2 and "run by the host only" in result.stdout
        # `fleet exec` runs as the ssh user: through sudo, `run` would be a root shell.
        result = remote.run(["sudo", "-n", RUNNING_HELPER, "run", "--", "id", "-u"], check=False)
        assert result.returncode == 2 and result.stdout == "", result
        assert (
            remote.run([RUNNING_HELPER, "run", "--", "id", "-un"], hold_stdin=True).stdout.strip()
            == DEPLOY_USER
        )


def test_a_system_the_deploy_user_made_itself_is_refused(lab):
    """Any user can put a store path with a switch-to-configuration of their own into the
    store; the helper switches only to signed systems and to generations."""
    script = (
        "set -e; d=$(mktemp -d); mkdir -p $d/evil/bin; "
        "printf '#!/bin/sh\\ntouch /root/pwned\\n' > $d/evil/bin/switch-to-configuration; "
        "chmod +x $d/evil/bin/switch-to-configuration; nix-store --add $d/evil"
    )
    with ops.transport(lab) as transport:
        endpoint = ops.endpoints(lab)[0]
        remote = transport.remote(as_deploy_user(endpoint))
        evil = remote.run(["sh", "-c", script]).stdout.strip()
        assert evil.startswith("/nix/store/") and evil.endswith("-evil")
        holder = json.dumps({"operator": "mallory", "release": "x"})
        with pytest.raises(HelperError, match="signed by no key this host trusts"):
            HostOps(remote).call(
                "begin", "--token", new_token(), "--holder", holder, "--mode", "switch",
                "--target", evil, "--deadline", "30", "--confirm", "10",
            )  # fmt: skip
        root = transport.remote(endpoint)
        assert not root.run(["test", "-e", "/root/pwned"], check=False).ok
        assert HostOps(root).state().txn is None
