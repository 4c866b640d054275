"""A local run's processes share its driver's fate: when the process that started the run's Ray
dies (kill -9, the OOM killer), every process of that Ray stops within seconds, commits nothing
more, and the run's temporary folder goes with them.

Ray itself kills its GCS and raylet when their parent dies (PR_SET_PDEATHSIG), but its workers
(the run's actors, in process groups of their own), their children (vLLM's engine cores) and
Ray's agents live on for seconds or for good. Here:

- ``mark()``: a name for one start of a local Ray (``pid-starttime-random``); ``LocalRay`` puts it in
  the environment (``MATRIX_HPC_RUN_OWNER``) before Ray starts, so every process of that Ray, at any
  depth, carries it from its start (``/proc/PID/environ``), whatever its process group or session.
- ``Watchdog``: a tiny process (this file, standard library only) in a session of its own, so that
  neither a kill of the driver's process group nor a closed terminal reaches it. It holds the read
  end of a pipe whose write end only the driver holds: end of file means the driver is gone, however
  it went. It then SIGKILLs every process of this user that carries the mark (until none is left),
  removes the POSIX shared memory they had mapped under /dev/shm, and the run's temporary folder.
- ``owner_gone()``: what a sink asks right before it commits: is the process that started this Ray
  still there? (A pidfd, so a reused pid is never mistaken for the driver.)
- ``sweep(mark)``: the same clean-up, called by the next start of a run when the last one was killed
  together with its watchdog (the names are recorded in the run directory: only our own).
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

OWNER_VAR = "MATRIX_HPC_RUN_OWNER"
SWEEP_DEADLINE_S = 8.0


def _start_ticks(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot): with the pid, a name no other process has."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_ticks(pid)}-{secrets.token_hex(4)}"


class _Owner:
    """The process named by a mark, watched through a pidfd (readable once it has exited), or through
    /proc where the kernel has no pidfd (before Linux 5.3)."""

    def __init__(self, owner_mark: str):
        pid_text, self.ticks, _ = owner_mark.split("-", 2)
        self.pid = int(pid_text)
        self.fd: int | None = None
        self.gone = False
        try:
            self.fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.gone = True
            return
        except OSError:  # no pidfd here
            pass
        self.gone = _start_ticks(self.pid) != self.ticks  # a reused pid is not our owner

    def has_exited(self) -> bool:
        if self.gone:
            return True
        if self.fd is not None:
            self.gone = bool(select.select([self.fd], [], [], 0)[0])
        else:
            self.gone = _start_ticks(self.pid) != self.ticks or not _is_running(self.pid)
        return self.gone

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def owner_has_exited(owner_mark: str) -> bool:
    """Has the process that made ``owner_mark`` exited? (False while it runs, a zombie counts as exited.)"""
    owner = _Owner(owner_mark)
    try:
        return owner.has_exited()
    finally:
        owner.close()


_owner: _Owner | None = None


def owner_gone() -> bool:
    """True once the process that started this local Ray has exited (never on a cluster's Ray, which
    Ray itself ties to its driver)."""
    global _owner
    value = os.environ.get(OWNER_VAR)
    if not value:
        return False
    if _owner is None:
        _owner = _Owner(value)
    return _owner.has_exited()


# -- finding and stopping the processes of one mark ---------------------------------------------------

def _pids_of(uid: int, proc_file: str, found: Callable[[bytes], bool]) -> list[int]:
    """This user's processes (not this one) whose ``/proc/PID/<proc_file>`` satisfies ``found(bytes)``."""
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/{proc_file}", "rb") as f:
                if found(f.read()):
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _marked(needle: bytes, uid: int) -> list[int]:
    return _pids_of(uid, "environ", lambda data: needle in data.split(b"\0"))


def _kill_until_none(find: Callable[[], list[int]], deadline_s: float, shm: set[str] | None = None) -> set[int]:
    """SIGKILL what ``find()`` returns until it returns nothing (a process may fork while we look);
    collect into ``shm`` the shared memory they had mapped. Returns the pids killed."""
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = [p for p in find() if _is_running(p)]
        if not pids:
            break
        for pid in pids:
            if shm is not None:
                shm |= _shared_memory_of(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.02)  # let the kernel finish the kills before looking again
    return killed


def stop_users_of(folder: str | Path, deadline_s: float = SWEEP_DEADLINE_S) -> int:
    """SIGKILL every process of this user whose command line names ``folder``, until none is left;
    returns how many. Ray's processes name their temporary folder, and a worker Ray was starting when
    its node stopped (in a process group of its own) would otherwise make the folder again once it
    has been removed."""
    path, uid = str(folder).encode(), os.geteuid()
    names = (path + b"/", path + b"\0")  # the folder or a path in it, not a sibling whose name starts alike
    found = lambda data: any(n in data for n in names)  # noqa: E731
    return len(_kill_until_none(lambda: _pids_of(uid, "cmdline", found), deadline_s))


def _shared_memory_of(pid: int) -> set[str]:
    """The /dev/shm files a process has mapped or open (vLLM's shared-memory queues, multiprocessing's
    semaphores). Found by inode: glibc maps a named semaphore under a temporary name it then renames."""
    inodes = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            inodes.update(int(line.split(None, 5)[4]) for line in f if "/dev/shm/" in line)
        for fd in os.scandir(f"/proc/{pid}/fd"):
            if os.readlink(fd.path).startswith("/dev/shm/"):
                inodes.add(os.stat(fd.path).st_ino)
    except (OSError, IndexError, ValueError):
        pass
    if not inodes:
        return set()
    try:
        with os.scandir("/dev/shm") as entries:
            return {e.path for e in entries if e.inode() in inodes}
    except OSError:
        return set()


def shared_memory_of_tree(pid: int) -> set[str]:
    """The /dev/shm files ``pid`` and its descendants have mapped or open."""
    names, todo, seen = set(), [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        names |= _shared_memory_of(p)
        try:
            for task in os.scandir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(task.path, "children").read_text().split()]
        except OSError:
            continue
    return names


def unlink_shared_memory(names: set[str]) -> None:
    """Remove those of ``names`` (files in /dev/shm) that are still there and belong to this user."""
    uid = os.geteuid()
    for name in names:
        _unlink_ours(Path(name), uid)


def sweep(owner_mark: str, temp_dir: str | Path | None = None, deadline_s: float = SWEEP_DEADLINE_S) -> int:
    """SIGKILL every process of this user that carries ``owner_mark``, until none is left (a process
    may fork while we look); then unlink the shared memory they held and remove ``temp_dir``.
    Returns how many processes were killed."""
    needle, uid = f"{OWNER_VAR}={owner_mark}".encode(), os.geteuid()
    shm: set[str] = set()
    killed = _kill_until_none(lambda: _marked(needle, uid), deadline_s, shm)
    unlink_shared_memory(shm)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return len(killed)


def _is_running(pid: int) -> bool:
    """A zombie has exited already: only its parent's wait is left."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _unlink_ours(path: Path, uid: int) -> None:
    try:
        if path.parent == Path("/dev/shm") and path.lstat().st_uid == uid:
            path.unlink()
    except OSError:
        pass


# -- the watchdog process -----------------------------------------------------------------------------

class Watchdog:
    """Started by the driver; ``close()`` on a clean stop (it then sweeps what is left, if anything)."""

    def __init__(self, owner_mark: str, temp_dir: Path):
        read_end, self._write_end = os.pipe()  # both close-on-exec: no other child holds the write end
        env = {k: v for k, v in os.environ.items() if k != OWNER_VAR}  # it must not sweep itself
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", __file__, owner_mark, str(temp_dir)], stdin=read_end,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            os.close(read_end)

    def close(self, timeout: float = SWEEP_DEADLINE_S + 2) -> None:
        if self._write_end is not None:
            os.close(self._write_end)
            self._write_end = None
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _watch(owner_mark: str, temp_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the driver is not for us
    while os.read(0, 4096):  # end of file: the driver closed the pipe, or died
        pass
    sweep(owner_mark, temp_dir)


if __name__ == "__main__":
    _watch(sys.argv[1], sys.argv[2])
