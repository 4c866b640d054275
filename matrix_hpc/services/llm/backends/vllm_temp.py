"""A private temporary folder for each vLLM engine, and the removal of what a killed engine left."""

from __future__ import annotations

import os
import shutil
import tempfile
from multiprocessing import resource_tracker

from matrix_hpc import fate


class PrivateTemp:
    """vLLM leaves its IPC sockets (about 7 per engine start) in the temporary folder, and a 160 MiB
    shared-memory queue in /dev/shm when its engine is stopped: each engine gets a private temporary
    folder (TMPDIR, VLLM_RPC_BASE_PATH), inside the local run's own (MATRIX_HPC_RUN_TMP) if there is
    one, removed with the shared memory the engine's processes had mapped when it stops.

    The folder's name holds its maker (``mhpc-vllm-PID-START-``) and the file ``shared-memory`` in it
    the /dev/shm names (those the engine's processes map, and the named semaphores and shared memory
    this process registers with multiprocessing's resource tracker, which a SIGKILL leaves behind):
    a later start removes what a killed replica of this user left."""

    VARS = ("TMPDIR", "VLLM_RPC_BASE_PATH")
    PREFIX = "mhpc-vllm-"
    SHM_LIST = "shared-memory"

    def __init__(self) -> None:
        base = os.environ.get("MATRIX_HPC_RUN_TMP") or tempfile.gettempdir()
        remove_leftovers(base)
        maker = "-".join(fate.mark().split("-")[:2])
        self.path = tempfile.mkdtemp(prefix=f"{self.PREFIX}{maker}-", dir=base)
        self.saved = {k: os.environ.get(k) for k in self.VARS}
        self.saved_tempdir = tempfile.tempdir
        os.environ.update(dict.fromkeys(self.VARS, self.path))
        tempfile.tempdir = self.path
        self.shared_memory: set[str] = set()
        self._register = resource_tracker.register
        resource_tracker.register = self._registered

    def _registered(self, name: str, rtype: str) -> None:
        self._register(name, rtype)
        if rtype in ("semaphore", "shared_memory"):  # /mp-x is /dev/shm/sem.mp-x; /psm_x is /dev/shm/psm_x
            self.shared_memory.add("/dev/shm/" + ("sem." if rtype == "semaphore" else "") + name.lstrip("/"))
            self._write_list()

    def note_shared_memory(self) -> None:
        self.shared_memory |= fate.shared_memory_of_tree(os.getpid())
        self._write_list()

    def _write_list(self) -> None:
        with open(os.path.join(self.path, self.SHM_LIST), "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(self.shared_memory)))

    def remove(self) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = self.saved_tempdir
        if resource_tracker.register == self._registered:
            resource_tracker.register = self._register
        fate.unlink_shared_memory(self.shared_memory)
        shutil.rmtree(self.path, ignore_errors=True)


def remove_leftovers(base: str) -> None:
    """Private folders in ``base`` of this user's engines whose process has exited (killed), and the
    shared memory they recorded."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        parts = entry.name.removeprefix(PrivateTemp.PREFIX).split("-")
        if not entry.name.startswith(PrivateTemp.PREFIX) or len(parts) < 3 or not (parts[0] + parts[1]).isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid() or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        if not fate.owner_has_exited(f"{parts[0]}-{parts[1]}-x"):
            continue
        try:
            with open(os.path.join(entry.path, PrivateTemp.SHM_LIST)) as f:
                fate.unlink_shared_memory({line.strip() for line in f if line.strip()})
        except OSError:
            pass
        shutil.rmtree(entry.path, ignore_errors=True)
