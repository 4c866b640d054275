"""Per-user paths in a shared folder (issue 17): another user who makes a folder by the name we would
use first gets nothing: the Slurm bootstrap takes a fresh private folder (never a fixed name), and
the sandbox server sweeps only its own stale state."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

NODE_TEMP_DIRS = """
import json, os
from matrix_hpc.slurm.bootstrap import Node, node_temp_dir
node = Node(rank=0, num_nodes=1, job_id="77", restart=0, name="n0", ip="127.0.0.1", cpus=1, gpus=0)
out = []
for _ in range(2):
    p = node_temp_dir(node)
    st = os.lstat(p)
    out.append([str(p), st.st_uid, st.st_mode & 0o7777])
print(json.dumps(out))
"""

@pytest.fixture
def shared_tmp():
    """A folder every user can write to, sticky, like /tmp."""
    d = Path(tempfile.mkdtemp(prefix="mhpc-shared-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_other_user_mkdir(path: Path) -> None:
    path.mkdir(mode=0o777)
    path.chmod(0o777)


def test_the_slurm_nodes_ray_folder_is_fresh_and_private(unprivileged_user, shared_tmp):
    if os.geteuid() == unprivileged_user.uid:
        pytest.skip("needs a second user (run the suite as root)")
    # The names the bootstrap used before: another user makes them first, open to all.
    planted = shared_tmp / f"mhpc-{unprivileged_user.uid}"
    _as_other_user_mkdir(planted)
    _as_other_user_mkdir(planted / "77-0")
    done = unprivileged_user.run([sys.executable, "-c", NODE_TEMP_DIRS], env={"TMPDIR": str(shared_tmp)},
                                 timeout=60)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert len({path for path, _, _ in made}) == 2  # a new one each time, never a fixed name
    for path, uid, mode in made:
        assert Path(path).parent == shared_tmp and Path(path).name.startswith("mhpc-77.0-"), path
        assert (uid, mode) == (unprivileged_user.uid, 0o700), (path, uid, oct(mode))
    assert os.listdir(planted) == ["77-0"] and os.listdir(planted / "77-0") == []


def test_the_sandbox_server_sweeps_only_its_own_stale_state(unprivileged_user, shared_tmp):
    """Here the server is the suite's user (root, which could delete anything) and the ordinary user
    plants a folder named like a dead server's state: it stays."""
    from matrix_hpc.services.sandbox.server import _sweep_stale_state

    if os.geteuid() == unprivileged_user.uid:
        pytest.skip("needs a second user (run the suite as root)")
    dead_pid = 4_000_000  # above pid_max: no such process
    theirs = shared_tmp / f"matrix-hpc-sandbox-{dead_pid}-other"
    made = unprivileged_user.run(["sh", "-c", f"mkdir {theirs} && echo mine > {theirs}/keep"], timeout=30)
    assert made.returncode == 0, made.stderr
    ours = shared_tmp / f"matrix-hpc-sandbox-{dead_pid}-ours"
    ours.mkdir()
    _sweep_stale_state(shared_tmp)
    assert (theirs / "keep").read_text() == "mine\n"
    assert not ours.exists()


def test_the_sandbox_server_sweeps_only_its_own_stale_cgroups(unprivileged_user, shared_tmp):
    """The same for per-sandbox cgroups, in a hierarchy several users' servers share (cgroup v1 on
    our dev VMs): another user's stale folder is neither removed nor a reason to fail at start (it
    was, when it could not be read). Plain folders stand in for the cgroup hierarchy."""
    from matrix_hpc.services.sandbox.cgroups import _sweep_stale

    if os.geteuid() == unprivileged_user.uid:
        pytest.skip("needs a second user (run the suite as root)")
    dead_pid = 4_000_000
    theirs = shared_tmp / f"matrix-hpc-sandbox-{dead_pid + 1}"
    made = unprivileged_user.run(["mkdir", "-p", str(theirs / "abc")], timeout=30)
    assert made.returncode == 0, made.stderr
    ours = shared_tmp / f"matrix-hpc-sandbox-{dead_pid}"
    (ours / "def").mkdir(parents=True)
    _sweep_stale(shared_tmp)  # root's server
    assert (theirs / "abc").is_dir() and not ours.exists()
    root_only = shared_tmp / f"matrix-hpc-sandbox-{dead_pid + 2}"
    root_only.mkdir(mode=0o700)
    swept = unprivileged_user.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                   "from matrix_hpc.services.sandbox.cgroups import _sweep_stale; "
                                   "_sweep_stale(Path(sys.argv[1]))", str(shared_tmp)], timeout=60)
    assert swept.returncode == 0, swept.stderr  # the user's server
    assert root_only.is_dir() and not theirs.exists()
