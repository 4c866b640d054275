"""Per-sandbox cgroups (v1 hierarchies or a delegated v2 subtree), when the server may create them.

A sandbox's cgroup caps the memory and the number of processes of its whole process tree, counts
its CPU time and peak memory, and lets the server find and kill every process it left. Without
writable cgroups the executor holds the same limits with the process-tree ``watchdog``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

_PREFIX = "matrix-hpc-sandbox"


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's path in that hierarchy."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    except OSError:
        pass
    return out


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[2], parts[1], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def slurm_job_cgroup() -> str | None:
    """This process's Slurm job cgroup (memory or v2 hierarchy), when it runs inside one."""
    own = _own_cgroups()
    for path in (own.get("memory"), own.get("")):
        if path and "/job_" in path:
            return path
    return None


@dataclass
class CgroupRoot:
    """Where this server makes its sandboxes' cgroups: v1 {controller: dir} or one v2 dir."""

    version: int
    dirs: dict[str, Path] = field(default_factory=dict)  # v1: memory, pids, cpuacct; v2: "" -> dir

    @classmethod
    def detect(cls) -> CgroupRoot | None:
        own = _own_cgroups()
        tag = f"{_PREFIX}-{os.getpid()}"
        v1: dict[str, Path] = {}
        v2: Path | None = None
        for kind, mnt, opts in _mounts():
            if kind == "cgroup":
                for c in ("memory", "pids", "cpuacct"):
                    if c in opts and c in own:
                        v1[c] = Path(mnt) / own[c].lstrip("/") / tag
            elif kind == "cgroup2" and "" in own:
                v2 = Path(mnt) / own[""].lstrip("/")
        for d in list(v1.values()) + ([v2 / tag] if v2 else []):
            _sweep_stale(d.parent)
        if set(v1) == {"memory", "pids", "cpuacct"}:
            try:
                for d in v1.values():
                    d.mkdir(exist_ok=True)
                return cls(1, v1)
            except OSError:
                for d in v1.values():
                    _rmdir(d)
        if v2 is not None:
            d = _delegated_v2(v2, tag)
            if d is not None:
                return cls(2, {"": d})
        return None

    def create(self, name: str) -> Cgroup:
        dirs = {c: d / name for c, d in self.dirs.items()}
        for d in dirs.values():
            d.mkdir()
        return Cgroup(self.version, dirs)

    def remove(self) -> None:
        for d in self.dirs.values():
            for child in d.iterdir() if d.is_dir() else []:
                if child.is_dir():
                    Cgroup(self.version, {"": child}).destroy()
            _rmdir(d)


@dataclass
class Cgroup:
    version: int
    dirs: dict[str, Path]

    def _d(self, controller: str) -> Path:
        return self.dirs["" if self.version == 2 else controller]

    def procs_files(self) -> list[str]:
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def set_limits(self, *, memory_bytes: int, max_processes: int) -> None:
        if self.version == 1:
            mem = self._d("memory")
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            try:  # no swap beyond the cap, where the kernel accounts swap
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            except OSError:
                pass
            (self._d("pids") / "pids.max").write_text(str(max_processes))
        else:
            d = self._d("")
            (d / "memory.max").write_text(str(memory_bytes))
            try:
                (d / "memory.swap.max").write_text("0")
            except OSError:
                pass
            (d / "pids.max").write_text(str(max_processes))

    def cpu_time_s(self) -> float:
        try:
            if self.version == 1:
                return int((self._d("cpuacct") / "cpuacct.usage").read_text()) / 1e9
            for line in (self._d("") / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            pass
        return 0.0

    def peak_memory(self) -> int:
        try:
            if self.version == 1:
                return int((self._d("memory") / "memory.max_usage_in_bytes").read_text())
            return int((self._d("") / "memory.peak").read_text())
        except (OSError, ValueError):
            return 0

    def _kv(self, path: Path) -> dict[str, int]:
        out = {}
        try:
            for line in path.read_text().splitlines():
                k, _, v = line.partition(" ")
                if v.strip().lstrip("-").isdigit():
                    out[k] = int(v)
        except OSError:
            pass
        return out

    def oom_killed(self) -> bool:
        if self.version == 1:
            kv = self._kv(self._d("memory") / "memory.oom_control")
            if "oom_kill" in kv:
                return kv["oom_kill"] > 0
            try:
                return int((self._d("memory") / "memory.failcnt").read_text()) > 0
            except (OSError, ValueError):
                return False
        kv = self._kv(self._d("") / "memory.events")
        return kv.get("oom_kill", 0) > 0 or kv.get("oom", 0) > 0

    def pids_limit_hit(self) -> bool:
        d = self._d("pids")
        return self._kv(d / "pids.events").get("max", 0) > 0

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files():
            try:
                out |= {int(x) for x in Path(f).read_text().split()}
            except (OSError, ValueError):
                pass
        return out

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty; True when it emptied."""
        if self.version == 2:
            try:
                (self._d("") / "cgroup.kill").write_text("1")
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            pids = self.pids()
            if not pids:
                return True
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)  # let the kernel finish the exits we asked for
            delay = min(delay * 2, 0.05)

    def destroy(self) -> bool:
        emptied = self.kill_all()
        for d in self.dirs.values():
            _rmdir(d)
        return emptied


def _delegated_v2(own: Path, tag: str) -> Path | None:
    """A parent for sandbox cgroups under this process's v2 cgroup, where memory and pids are ours.

    That is the case at the root, in a systemd unit or scope with ``Delegate=yes`` (e.g. the server
    started by ``systemd-run --user --scope -p Delegate=yes``) and in a Slurm job cgroup the site
    delegates. v2 allows no process in a cgroup whose children use controllers, so when enabling
    them fails this process first moves into a leaf of its own.
    """
    try:
        if not {"memory", "pids"} <= set((own / "cgroup.controllers").read_text().split()):
            return None
        sub = own / "cgroup.subtree_control"
        if not {"memory", "pids"} <= set(sub.read_text().split()):
            try:
                sub.write_text("+memory +pids")
            except OSError:
                leaf = own / f"{_PREFIX}-server-{os.getpid()}"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                sub.write_text("+memory +pids")
        d = own / tag
        d.mkdir(exist_ok=True)
        (d / "cgroup.subtree_control").write_text("+memory +pids")
        return d
    except OSError:
        return None


def _rmdir(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _sweep_stale(parent: Path) -> None:
    """Remove the cgroups of our sandbox servers that died without cleaning up (their pid is gone)."""
    try:
        entries = list(parent.glob(f"{_PREFIX}-*"))
    except OSError:
        return
    for d in entries:
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        try:  # only ours: another user's (a server of root's, in a hierarchy we share) is not our business
            if d.lstat().st_uid != os.geteuid():
                continue
            version = 2 if (d / "cgroup.controllers").exists() else 1
            children = [child for child in d.iterdir() if child.is_dir()]
        except OSError:
            continue
        for child in children:
            Cgroup(version, {"": child}).destroy()
        _rmdir(d)
