"""Per-sandbox accounting where no cgroup can be created: a process-tree watchdog.

An ordinary user on a shared node usually has no writable cgroup. The sandbox's processes are still
easy to find: they all descend from the launcher (bwrap's PID namespace keeps orphans inside it,
reparented to its init), and the kernel's ``/proc`` counters say what they use. Each poll walks the
tree (``/proc/PID/task/TID/children``) and sums:

- memory: the proportional anonymous memory of every process (``Pss_Anon`` of ``smaps_rollup``;
  shared pages count once), the shared memory objects its processes map or hold open outside its
  folders (``MAP_SHARED|MAP_ANONYMOUS`` and ``/dev/zero`` mappings, memfds, SysV segments: each
  object once, at its full mapped or file size, the largest seen while it lives, since pages
  dropped from the page tables with ``MADV_DONTNEED`` stay allocated and uncounted in ``Rss``),
  plus what the sandbox's in-memory folders hold (``statvfs`` of its tmpfs mounts, seen through
  ``/proc/PID/root``; unlinked files still open or mapped included);
- processes: every task (thread) in the sandbox's PID namespace;
- CPU: user + system time of the live tasks and of the children they have reaped.

Past the memory or CPU cap the caller kills the tree; the process cap itself is enforced by the
kernel (``RLIMIT_NPROC`` set on the sandbox's first process once it is inside its own user
namespace, where it counts that sandbox only), and a poll that finds the tree at that cap reports
``processes``. A tmpfs found full reports ``disk``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

_CLOCK = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """``root`` and every live descendant (threads' children included), parents first."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return out


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses


def _pss_anon(pid: int) -> int:
    """Proportional anonymous memory (``Anonymous``, not shared out, on kernels before 5.10)."""
    fallback = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
            if line.startswith("Anonymous:"):
                fallback = int(line.split()[1]) * 1024
    return fallback


# How the kernel names shared memory that lives outside every folder (maps, fd links).
_SHMEM_NAMES = ("/dev/zero", "/memfd:", "/SYSV", "[anon_shmem")
ShmemKey = tuple[int, int, int]  # (device major, minor, inode)


def _shared_objects(pid: int, objects: dict[ShmemKey, int]) -> None:
    """Add the shared memory objects ``pid`` maps or holds open to ``objects`` (key -> bytes, the
    largest extent seen: a mapping at offset O of length L means the object holds O + L bytes)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(_SHMEM_NAMES):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                key = (major, minor, int(parts[4]))
                objects[key] = max(objects.get(key, 0), int(parts[2], 16) + hi - lo)
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if not os.readlink(f"{fds}/{fd}").startswith("/memfd:"):
                continue
            st = os.stat(f"{fds}/{fd}")
        except OSError:
            continue  # closed meanwhile
        key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        objects[key] = max(objects.get(key, 0), st.st_size, st.st_blocks * 512)


@dataclass
class Usage:
    memory_bytes: int = 0
    shared_bytes: int = 0
    tmpfs_bytes: int = 0
    tasks: int = 0
    cpu_time_s: float = 0.0
    full_tmpfs: list[str] = field(default_factory=list)


@dataclass
class TreeWatch:
    """Accounting of one sandbox: its first process (``init``, inside all its namespaces) and
    everything under it; nothing until the launcher has reported ``init``."""

    tmpfs: list[str]  # in-sandbox paths of its tmpfs mounts (/tmp, /dev/shm, /work)
    init: int | None = None
    peak_memory_bytes: int = 0
    peak_tasks: int = 0
    # Shared memory objects alive at the last poll, at the largest size seen: one cut down between
    # two polls (a partial munmap) keeps its size as long as some part of it is still held.
    shared: dict[ShmemKey, int] = field(default_factory=dict)

    def measure(self) -> Usage:
        u = Usage()
        inside = tree(self.init) if self.init is not None else []
        objects: dict[ShmemKey, int] = {}
        for pid in inside:
            try:
                fields = _stat_fields(pid)
                u.tasks += int(fields[17])  # num_threads
                u.cpu_time_s += sum(int(x) for x in fields[11:15]) / _CLOCK  # utime stime cutime cstime
                u.memory_bytes += _pss_anon(pid)
                _shared_objects(pid, objects)
            except (OSError, ValueError, IndexError):
                pass  # exited between the walk and the read
        self.shared = {k: max(v, self.shared.get(k, 0)) for k, v in objects.items()}
        u.shared_bytes = sum(self.shared.values())
        self._add_tmpfs(inside[1:], u)
        u.memory_bytes += u.shared_bytes + u.tmpfs_bytes
        self.peak_memory_bytes = max(self.peak_memory_bytes, u.memory_bytes)
        self.peak_tasks = max(self.peak_tasks, u.tasks)
        return u

    def tmpfs_full(self) -> bool:
        """Whether one of the sandbox's in-memory folders is full (its cgroup counts the memory)."""
        u = Usage()
        if self.init is not None:
            self._add_tmpfs(tree(self.init)[1:], u)
        return bool(u.full_tmpfs)

    def _add_tmpfs(self, inside: list[int], u: Usage) -> None:
        # ``inside``: the init's descendants, forked once the sandbox's root was set up (the init
        # may still be setting it up). Try the next one if one just exited.
        for pid in inside:
            try:
                stats = [(p, os.statvfs(f"/proc/{pid}/root{p}")) for p in self.tmpfs]
            except OSError:
                continue
            for path, st in stats:
                u.tmpfs_bytes += (st.f_blocks - st.f_bfree) * st.f_frsize
                if st.f_blocks and st.f_bavail == 0:
                    u.full_tmpfs.append(path)
            return
