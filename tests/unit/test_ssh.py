"""The transport's own files on the operator's machine."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fleet.ssh import SshConfig, Transport


def test_a_killed_runs_control_directory_is_swept_by_the_next():
    stale = Path(tempfile.mkdtemp(prefix="fleet-ssh-999999999-"))
    with Transport(SshConfig()) as transport:
        assert not stale.exists()
        assert transport.dir.name.startswith(f"fleet-ssh-{os.getpid()}-")
    assert not transport.dir.exists()


def test_another_users_control_directory_is_left_alone():
    other = Path(tempfile.mkdtemp(prefix="fleet-ssh-999999998-"))
    if os.geteuid() == 0:
        os.chown(other, 12345, 12345)
    try:
        with Transport(SshConfig()):
            assert other.exists() == (os.geteuid() == 0)
    finally:
        if other.exists():
            other.rmdir()
