"""Run one sandboxed command under limits; shared by every runtime.

The server process starts ``_limiter.py`` (join the cgroup, set rlimits, new session, drop root),
which execs the runtime's argv (or, for bwrap, stays as its parent: see ``runtimes.Control``). bwrap
reports the sandbox's first process, which waits to be let go: no report, or no report that the
command was executed, means the sandbox could not run (an error of the call, never a result);
without a cgroup that process gets ``RLIMIT_NPROC`` first (inside its own user namespace it counts
this sandbox only). While it runs we stream
stdout/stderr keeping at most ``max_output_bytes`` of each (the rest is read and dropped, never
buffered), watch the wall clock and the tree's CPU time and memory (its cgroup, or the
``watchdog``), and at the end kill whatever is left: the process group, the sandbox's init (its PID
namespace dies with it), then every process still in the cgroup. Blocking code, run in worker
threads by the server.
"""

from __future__ import annotations

import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import seccomp
from .cgroups import Cgroup, CgroupRoot, slurm_job_cgroup
from .files import QuotaWatch
from .runtimes import Control, Launch, Runtime
from .spec import Limits
from .streams import CHUNK, pump
from .watchdog import TreeWatch

LAUNCHER = str(Path(__file__).with_name("_limiter.py"))
LAUNCHER_MARK = b"matrix-hpc sandbox launcher:"
NOBODY = 65534
_POLL_S = {"cgroup": 0.1, "watchdog": 0.05}

# Order in which limits are reported (most telling first).
LIMIT_ORDER = ("memory", "processes", "cpu_time", "wall_time", "file_size", "disk", "output")


@dataclass
class Outcome:
    exit_code: int = 0
    signal: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0
    peak_memory_bytes: int = 0
    limits_hit: list[str] = field(default_factory=list)
    error: str = ""
    failed_to_start: str = ""  # the sandbox never ran: an error of the call, not a result


class Handle:
    """A running sandbox, so that another thread (session close, shutdown) can kill it."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._cgroup: Cgroup | None = None
        self._init_pidfd: int | None = None

    def _attach(self, pid: int, cgroup: Cgroup | None) -> None:
        with self._lock:
            self._pid, self._cgroup = pid, cgroup
        if self.cancelled.is_set():
            self.kill()

    def _attach_init(self, pidfd: int) -> None:
        with self._lock:
            self._init_pidfd = pidfd
        if self.cancelled.is_set():
            self.kill()

    def _detach(self) -> None:
        with self._lock:
            self._pid = self._cgroup = self._init_pidfd = None

    def kill(self) -> None:
        self.cancelled.set()
        with self._lock:
            pid, cg, init = self._pid, self._cgroup, self._init_pidfd
        if init is not None:  # the sandbox's PID namespace dies with its init
            try:
                signal.pidfd_send_signal(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pid is not None:
            _killpg(pid)
        if cg is not None:
            for p in cg.pids():
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _killpg(pid: int) -> None:
    for f in (os.killpg, os.kill):
        try:
            f(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Executor:
    """Runs launches with limits. One per server; thread-safe."""

    def __init__(self, *, use_cgroups: bool = True, drop_to: int | None = None, use_seccomp: bool = True) -> None:
        self.cgroups = CgroupRoot.detect() if use_cgroups else None
        self.use_seccomp = use_seccomp
        if use_seccomp:
            seccomp.filter_program()  # fail at start (SeccompUnavailable), not on the first call
        # Root drops to an unprivileged uid before the runtime starts (bwrap then uses a user
        # namespace); other users stay who they are.
        if drop_to is None and os.geteuid() == 0:
            drop_to = NOBODY
        self.uid = drop_to
        self.gid = drop_to
        _raise_nofile()

    @property
    def mechanism(self) -> str:
        """What holds the per-sandbox limits: ``cgroup`` or ``watchdog``."""
        return "cgroup" if self.cgroups else "watchdog"

    @property
    def isolation(self) -> str:
        """Said at start (log, Stats): which mechanism holds the limits, and the seccomp filter."""
        if self.cgroups:
            what = f"cgroup v{self.cgroups.version}"
        else:
            what = "process-tree watchdog + per-sandbox RLIMIT_NPROC (no writable cgroup)"
        slurm = slurm_job_cgroup()
        if slurm:
            what += f", inside Slurm job cgroup {slurm}"
        return what + (", seccomp" if self.use_seccomp else ", no seccomp")

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.remove()

    def chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def run(
        self,
        runtime: Runtime,
        argv: list[str],
        *,
        limits: Limits,
        env: dict[str, str] | None = None,
        stdin: bytes = b"",
        files: list[tuple[PurePosixPath, bytes, int]] = (),
        host_workdir: Path | None = None,
        handle: Handle | None = None,
    ) -> Outcome:
        control = Control.open(self.use_seccomp) if runtime.reports_child else None
        try:
            launch = runtime.command(argv, env=env or {}, limits=limits, host_workdir=host_workdir,
                                     files=files, control=control)
        except BaseException:
            if control is not None:
                control.close()
            raise
        try:
            quota = QuotaWatch(host_workdir, limits.work_dir_bytes) if host_workdir else None
            return self._run(launch, limits, stdin, handle or Handle(), quota)
        finally:
            launch.close_fds()
            if control is not None:
                control.close()

    # -- the core -----------------------------------------------------------------------------

    def _run(self, launch: Launch, limits: Limits, stdin: bytes, handle: Handle,
             quota: QuotaWatch | None) -> Outcome:
        cg: Cgroup | None = None
        if self.cgroups is not None:
            cg = self.cgroups.create(uuid.uuid4().hex[:12])
            cg.set_limits(memory_bytes=limits.memory_bytes, max_processes=limits.max_processes)
        out = Outcome()
        start = time.monotonic()
        try:
            proc = self._launch(launch, limits, cg)
        except OSError as e:
            if cg is not None:
                cg.destroy()
            out.failed_to_start = f"could not start the sandbox: {e}"
            return out
        handle._attach(proc.pid, cg)
        hit: set[str] = set()
        # Without bwrap's report (Apptainer) the watchdog watches the runtime's whole tree.
        watch = TreeWatch(launch.tmpfs, None if launch.control else proc.pid)
        init_pidfd = None
        exited = False
        try:
            if launch.control is not None:
                init_pidfd = self._release(launch.control, limits, handle, watch, start)
                if init_pidfd is None and not handle.cancelled.is_set():
                    out.failed_to_start = "the sandbox could not be created"
            if launch.control is None or init_pidfd is not None:
                ended = pump(proc, out, stdin=stdin, deadline=start + limits.wall_time_s,
                             max_output_bytes=limits.max_output_bytes, every=_POLL_S[self.mechanism],
                             cancelled=handle.cancelled,
                             over_limits=lambda: self._over_limits(cg, watch, limits, hit, quota))
                exited = ended == "exited"
                if ended == "wall_time":
                    hit.add("wall_time")
        finally:
            # The launcher is not reaped yet (its pid cannot be reused): kill its group and the
            # sandbox's init, detach the handle, then reap it.
            _kill_init(init_pidfd)
            _killpg(proc.pid)
            handle._detach()
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = 0  # reaped by us; keep Popen from waiting again
            if out.failed_to_start:
                out.stderr = _drain(proc.stderr)
            elif exited and launch.control is not None and not launch.control.command_ran() \
                    and not (cg is not None and cg.oom_killed()):  # the OOM killer may pick the launcher
                out.failed_to_start = "bwrap could not set up the sandbox or execute the command"
            _close_pipes(proc)
            out.wall_time_s = time.monotonic() - start
            if init_pidfd is not None:
                if not _wait_pidfd(init_pidfd, 5.0):
                    out.error = "some sandbox processes could not be killed"
                os.close(init_pidfd)
            self._account(out, cg, watch, rusage, limits, hit)
        return self._result(out, status, limits, hit, handle)

    def _launch(self, launch: Launch, limits: Limits, cg: Cgroup | None) -> subprocess.Popen:
        cfg = {"cgroup_procs": cg.procs_files() if cg else [], "rlimits": _rlimits(limits, cg is None)}
        if launch.control is not None:
            cfg.update(launch.control.launcher_config(), nproc=None if cg else limits.max_processes)
        if self.uid is not None:
            cfg.update(uid=self.uid, gid=self.gid)
        argv = list(launch.argv)
        argv[0] = shutil.which(argv[0]) or argv[0]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg), *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=launch.pass_fds + (launch.control.child_fds() if launch.control else []),
            close_fds=True,
        )
        launch.close_fds()
        if launch.control is not None:
            launch.control.close_child_ends()
        return proc

    def _account(self, out: Outcome, cg: Cgroup | None, watch: TreeWatch, rusage, limits: Limits,
                 hit: set[str]) -> None:
        """CPU, peak memory and the limits the counters saw; the cgroup is removed."""
        if cg is not None:
            out.cpu_time_s = cg.cpu_time_s()
            out.peak_memory_bytes = cg.peak_memory()
            if cg.oom_killed():
                hit.add("memory")
            if cg.pids_limit_hit():
                hit.add("processes")
            if not cg.destroy():
                out.error = "some sandbox processes could not be killed"
        else:
            out.cpu_time_s = rusage.ru_utime + rusage.ru_stime  # the launcher's reaped tree
            out.peak_memory_bytes = watch.peak_memory_bytes  # (ru_maxrss includes the server's fork)
            if watch.peak_tasks >= limits.max_processes:
                hit.add("processes")

    def _release(self, control: Control, limits: Limits, handle: Handle, watch: TreeWatch,
                 start: float) -> int | None:
        """Wait for the launcher's report of the sandbox's first process (capped), let it run; its pidfd."""
        pid = control.child_pid(deadline=start + limits.wall_time_s)
        if pid is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)  # it waits on the block pipe: still alive, pid not reused
        except OSError:
            return None
        handle._attach_init(pidfd)
        watch.init = pid
        control.release()
        return pidfd

    def _result(self, out: Outcome, status: int, limits: Limits, hit: set[str], handle: Handle) -> Outcome:
        """Exit code, signal and limits hit from the wait status and the counters (never from output)."""
        if os.WIFSIGNALED(status):
            out.signal = os.WTERMSIG(status)
            out.exit_code = 128 + out.signal
        else:
            out.exit_code = os.WEXITSTATUS(status)
            if 128 < out.exit_code <= 128 + 64:  # the runtime's report of a command killed by a signal
                out.signal = out.exit_code - 128
        if out.failed_to_start:
            detail = out.stderr.decode(errors="replace").strip()
            out.failed_to_start += f": {detail}" if detail else f" (exit status {out.exit_code})"
            return out
        code = out.exit_code
        if code == 128 + signal.SIGKILL and out.cpu_time_s >= limits.cpu_time_s * 0.95:
            hit.add("cpu_time")
        if code == 128 + signal.SIGXCPU:
            hit.add("cpu_time")
        if code == 128 + signal.SIGXFSZ:
            hit.add("file_size")
        if out.stdout_truncated or out.stderr_truncated:
            hit.add("output")
        if handle.cancelled.is_set() and not hit:
            out.error = out.error or "cancelled"
        if code == 127 and out.stderr.startswith(LAUNCHER_MARK):
            out.failed_to_start = out.stderr.decode(errors="replace").strip()
        out.limits_hit = [name for name in LIMIT_ORDER if name in hit]
        return out

    def _over_limits(self, cg: Cgroup | None, watch: TreeWatch, limits: Limits, hit: set[str],
                     quota: QuotaWatch | None) -> bool:
        """One poll of the tree's counters and of a host work folder's size; True when it must be killed."""
        if quota is not None and quota.over():
            hit.add("disk")
            return True
        if cg is not None:
            if watch.tmpfs_full():
                hit.add("disk")
            if cg.cpu_time_s() > limits.cpu_time_s:
                hit.add("cpu_time")
                return True
            return False
        u = watch.measure()
        if u.full_tmpfs:
            hit.add("disk")
        if u.tasks >= limits.max_processes:
            hit.add("processes")
        if u.tasks > limits.max_processes:  # no kernel cap on this tree (Apptainer): kill it
            return True
        if u.memory_bytes > limits.memory_bytes:
            hit.add("memory")
            return True
        if u.cpu_time_s > limits.cpu_time_s:
            hit.add("cpu_time")
            return True
        return False


def _rlimits(limits: Limits, no_cgroup: bool) -> dict[str, tuple[int, int]]:
    cpu = max(1, math.ceil(limits.cpu_time_s))
    rl = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_CORE": (0, 0),
    }
    if no_cgroup:
        # A backstop only: no single process may map so much that it outruns the watchdog by far.
        # The cap itself is the watchdog's, on the whole tree. (No RLIMIT_NPROC here: for the
        # launcher it would count every thread of the user, Ray and vLLM included.)
        backstop = max(4 * limits.memory_bytes, limits.memory_bytes + (2 << 30))
        rl["RLIMIT_AS"] = (backstop, backstop)
    return rl


def _kill_init(pidfd: int | None) -> None:
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_pidfd(pidfd: int, timeout_s: float) -> bool:
    """True once the process behind ``pidfd`` has exited (readable pidfd)."""
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        return bool(sel.select(timeout_s))


def _close_pipes(proc: subprocess.Popen) -> None:
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f and f.close()
        except OSError:
            pass


def _drain(pipe) -> bytes:
    """What a dead process left in a pipe (bounded)."""
    try:
        os.set_blocking(pipe.fileno(), False)
        return os.read(pipe.fileno(), CHUNK)
    except (OSError, ValueError):
        return b""


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
