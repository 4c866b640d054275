"""fate.stop_users_of: the processes naming a folder die, the others live."""

from __future__ import annotations

import subprocess
import sys

from matrix_hpc import fate

SLEEPER = "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(600)"


def _sleeper(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *args], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # a process group of its own, as Ray's workers
    assert proc.stdout.readline() == "up\n"  # its command line is in place
    return proc


def test_the_processes_naming_a_folder_are_killed_and_no_other(tmp_path):
    folder = tmp_path / "ray-node"
    users = [_sleeper(f"--temp-dir={folder / 'r'}"), _sleeper(f"--object-store={folder}/r/s/plasma")]
    other = _sleeper(f"--temp-dir={tmp_path / 'ray-node-2'}")
    try:
        assert fate.stop_users_of(folder) == 2
        assert [p.wait(timeout=10) for p in users] == [-9, -9]
        assert other.poll() is None
    finally:
        for p in (*users, other):
            p.kill()
            p.wait()


def test_the_folder_itself_as_an_argument_counts(tmp_path):
    folder = tmp_path / "ray-node"
    user = _sleeper("--temp-dir", str(folder))
    try:
        assert fate.stop_users_of(folder) == 1
        assert user.wait(timeout=10) == -9
    finally:
        user.kill()
        user.wait()
