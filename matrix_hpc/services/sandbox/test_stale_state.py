"""The session folders a killed sandbox server left are removed by the next server of the same user,
and only those: a live server's, and another user's, stay."""

from __future__ import annotations

import os
import subprocess

from matrix_hpc.services.sandbox.server import _sweep_stale_state


def test_only_this_users_dead_servers_state_is_swept(tmp_path, unprivileged_user):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"matrix-hpc-sandbox-{gone.pid}-abc"
    live = tmp_path / f"matrix-hpc-sandbox-{os.getppid()}-def"
    others = tmp_path / f"matrix-hpc-sandbox-{gone.pid}-ghi"
    for d in (dead, live, others):
        (d / "session").mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(others, unprivileged_user.uid, unprivileged_user.gid)
    _sweep_stale_state(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([live.name] + ([others.name] if os.geteuid() == 0 else []))
