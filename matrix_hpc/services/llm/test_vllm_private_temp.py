"""vLLM's temporary files (IPC sockets, shared-memory queues) stay in a private folder per engine,
removed when the engine stops; what a killed engine left is removed by the next start of this user.
(The engine's own start and stop are tested with a real engine in test_llm_vllm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from matrix_hpc import fate
from matrix_hpc.services.llm.backends.vllm_temp import PrivateTemp


def _dead_maker() -> str:
    gone = subprocess.Popen(["true"])
    maker = "-".join(fate.mark(gone.pid).split("-")[:2])
    gone.wait()
    return maker


def test_the_private_folder_takes_vllms_temporary_files_and_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIX_HPC_RUN_TMP", str(tmp_path))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    before = os.environ.get("TMPDIR"), tempfile.gettempdir()
    private = PrivateTemp()
    assert Path(private.path).parent == tmp_path
    assert os.environ["TMPDIR"] == os.environ["VLLM_RPC_BASE_PATH"] == tempfile.gettempdir() == private.path
    shm = Path(f"/dev/shm/mhpc-test-{os.getpid()}")
    shm.write_bytes(b"x")
    private.shared_memory = {str(shm)}
    private.remove()
    assert not Path(private.path).exists() and not shm.exists()
    assert (os.environ.get("TMPDIR"), tempfile.gettempdir()) == before
    assert "VLLM_RPC_BASE_PATH" not in os.environ


def test_a_killed_engines_leftovers_go_at_the_next_start_and_no_others(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIX_HPC_RUN_TMP", str(tmp_path))
    shm = Path(f"/dev/shm/mhpc-test-left-{os.getpid()}")
    shm.write_bytes(b"x")
    killed = tmp_path / f"mhpc-vllm-{_dead_maker()}-abc123"
    killed.mkdir()
    (killed / "socket-like").touch()
    (killed / "shared-memory").write_text(f"{shm}\n")
    live = tmp_path / f"mhpc-vllm-{'-'.join(fate.mark().split('-')[:2])}-def456"  # this process: running
    live.mkdir()
    other = tmp_path / "mhpc-vllm-not-ours"
    other.mkdir()
    try:
        PrivateTemp().remove()
        assert not killed.exists() and not shm.exists()
        assert live.exists() and other.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    finally:
        shm.unlink(missing_ok=True)


KILLED_ENGINE = """
import multiprocessing, os, sys
from matrix_hpc.services.llm.backends.vllm_temp import PrivateTemp
private = PrivateTemp()
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, as vLLM's start makes
print(private.path, "/dev/shm/sem." + lock._semlock.name.lstrip("/"), flush=True)
sys.stdin.read()
"""


def test_a_semaphore_an_engine_registered_goes_at_the_next_start_after_a_kill_of_its_process_group(
        tmp_path, monkeypatch):
    """SIGKILL to the group takes multiprocessing's resource tracker too, which would have removed it."""
    monkeypatch.setenv("MATRIX_HPC_RUN_TMP", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ENGINE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        folder, semaphore = proc.stdout.readline().split()
        assert Path(folder).parent == tmp_path and Path(semaphore).exists()
        assert semaphore in (Path(folder) / "shared-memory").read_text().split()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert Path(semaphore).exists()  # nobody removed it
    PrivateTemp().remove()
    assert not Path(semaphore).exists() and not Path(folder).exists()
