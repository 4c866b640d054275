"""Run one sandboxed command under limits; shared by every runtime.

The server process starts ``_limiter.py`` (join the cgroup, set rlimits, new session, drop root),
which execs the runtime's argv. While it runs we stream stdout/stderr keeping at most
``max_output_bytes`` of each (the rest is read and dropped, never buffered), watch the wall clock
and the cgroup's CPU time, and at the end kill whatever is left: the process group, then every
process still in the cgroup (bwrap's PID namespace dies with its init as well). Blocking code,
run in worker threads by the server.
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

from .cgroups import Cgroup, CgroupRoot
from .runtimes import Launch, Runtime
from .spec import Limits

LAUNCHER = str(Path(__file__).with_name("_limiter.py"))
NOBODY = 65534
_CHUNK = 65536

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


class Handle:
    """A running sandbox, so that another thread (session close, shutdown) can kill it."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._cgroup: Cgroup | None = None

    def _attach(self, pid: int, cgroup: Cgroup | None) -> None:
        with self._lock:
            self._pid, self._cgroup = pid, cgroup
        if self.cancelled.is_set():
            self.kill()

    def _detach(self) -> None:
        with self._lock:
            self._pid = self._cgroup = None

    def kill(self) -> None:
        self.cancelled.set()
        with self._lock:
            pid, cg = self._pid, self._cgroup
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

    def __init__(self, *, use_cgroups: bool = True, drop_to: int | None = None) -> None:
        self.cgroups = CgroupRoot.detect() if use_cgroups else None
        # Root drops to an unprivileged uid before the runtime starts (bwrap then uses a user
        # namespace); other users stay who they are.
        if drop_to is None and os.geteuid() == 0:
            drop_to = NOBODY
        self.uid = drop_to
        self.gid = drop_to
        _raise_nofile()

    @property
    def isolation(self) -> str:
        return f"cgroup v{self.cgroups.version}" if self.cgroups else "rlimits"

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
        launch = runtime.command(argv, env=env or {}, limits=limits, host_workdir=host_workdir, files=files)
        try:
            return self._run(launch, limits, stdin, handle or Handle())
        finally:
            launch.close_fds()

    # -- the core -----------------------------------------------------------------------------

    def _run(self, launch: Launch, limits: Limits, stdin: bytes, handle: Handle) -> Outcome:
        cg: Cgroup | None = None
        if self.cgroups is not None:
            cg = self.cgroups.create(uuid.uuid4().hex[:12])
            cg.set_limits(memory_bytes=limits.memory_bytes, max_processes=limits.max_processes)
        cpu = max(1, math.ceil(limits.cpu_time_s))
        rl = {
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
            "RLIMIT_CORE": (0, 0),
        }
        if cg is None:  # no cgroup: per-process caps instead of per-tree ones
            rl["RLIMIT_AS"] = (limits.memory_bytes, limits.memory_bytes)
            rl["RLIMIT_NPROC"] = (limits.max_processes, limits.max_processes)
        cfg = {"cgroup_procs": cg.procs_files() if cg else [], "rlimits": rl}
        if self.uid is not None:
            cfg.update(uid=self.uid, gid=self.gid)
        out = Outcome()
        start = time.monotonic()
        try:
            argv = list(launch.argv)
            argv[0] = shutil.which(argv[0]) or argv[0]
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg), *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=launch.pass_fds, close_fds=True,
            )
        except OSError as e:
            if cg is not None:
                cg.destroy()
            out.error = f"could not start the sandbox: {e}"
            out.exit_code = 127
            return out
        launch.close_fds()
        handle._attach(proc.pid, cg)
        hit: set[str] = set()
        try:
            self._pump(proc, out, limits, stdin, start, cg, hit, handle)
        finally:
            # The launcher is not reaped yet (its pid cannot be reused): kill its group, detach the
            # handle, then reap it.
            _killpg(proc.pid)
            handle._detach()
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = 0  # reaped by us; keep Popen from waiting again
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f and f.close()
                except OSError:
                    pass
            out.wall_time_s = time.monotonic() - start
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
                out.cpu_time_s = rusage.ru_utime + rusage.ru_stime
                out.peak_memory_bytes = rusage.ru_maxrss * 1024
        if os.WIFSIGNALED(status):
            out.signal = os.WTERMSIG(status)
            out.exit_code = 128 + out.signal
        else:
            out.exit_code = os.WEXITSTATUS(status)
            if 128 < out.exit_code <= 128 + 64:  # the runtime's report of a command killed by a signal
                out.signal = out.exit_code - 128
        code = out.exit_code
        if code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and out.cpu_time_s >= limits.cpu_time_s * 0.95:
            hit.add("cpu_time")
        if code == 128 + signal.SIGXCPU:
            hit.add("cpu_time")
        if code == 128 + signal.SIGXFSZ or b"[Errno 27] File too large" in out.stderr:
            hit.add("file_size")
        if cg is None and (b"MemoryError" in out.stderr[-4096:] or b"Cannot allocate memory" in out.stderr):
            hit.add("memory")  # RLIMIT_AS refused an allocation (no cgroup to tell us)
        if b"No space left on device" in out.stderr:
            hit.add("disk")
        if out.stdout_truncated or out.stderr_truncated:
            hit.add("output")
        if handle.cancelled.is_set() and not hit:
            out.error = out.error or "cancelled"
        if code == 127 and out.stderr.startswith(b"matrix-hpc sandbox launcher:"):
            out.error = out.stderr.decode(errors="replace").strip()
        elif code != 0 and out.stderr.startswith(b"bwrap: ") and out.cpu_time_s < 1:
            out.error = "bwrap failed: " + out.stderr.decode(errors="replace").strip()
        out.limits_hit = [name for name in LIMIT_ORDER if name in hit]
        return out

    def _pump(self, proc, out: Outcome, limits: Limits, stdin: bytes, start: float,
              cg: Cgroup | None, hit: set[str], handle: Handle) -> None:
        """Stream the pipes until the process exits and its pipes close, or a limit fires."""
        sel = selectors.DefaultSelector()
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        trunc = {proc.stdout.fileno(): False, proc.stderr.fileno(): False}
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
        in_view = memoryview(stdin)
        stdin_fd = proc.stdin.fileno() if stdin else -1
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
        deadline = start + limits.wall_time_s
        status = None
        exited_at = None
        cap = limits.max_output_bytes
        try:
            while True:
                now = time.monotonic()
                if status is not None:
                    # Exited: the PID namespace is gone, pipes close at once; do not wait forever
                    # on a pipe some escaped process might hold.
                    if len(sel.get_map()) == 0 or now - exited_at > 1.0:
                        break
                if now >= deadline and status is None:
                    hit.add("wall_time")
                    break
                if handle.cancelled.is_set() and status is None:
                    break
                if cg is not None and status is None and cg.cpu_time_s() > limits.cpu_time_s:
                    hit.add("cpu_time")
                    break
                timeout = min(max(deadline - now, 0), 0.1 if cg is not None else 0.5)
                for key, _ in sel.select(timeout):
                    fd = key.fd
                    if fd == pidfd:
                        # Exited (zombie, not reaped: the caller reaps it after detaching).
                        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                        if exited is None:
                            continue
                        status = True
                        exited_at = time.monotonic()
                        sel.unregister(pidfd)
                    elif fd == stdin_fd:
                        try:
                            n = os.write(fd, in_view[:_CHUNK])
                            in_view = in_view[n:]
                        except BlockingIOError:
                            continue
                        except (BrokenPipeError, OSError):
                            in_view = in_view[:0]
                        if not in_view:
                            sel.unregister(fd)
                            proc.stdin.close()
                    else:
                        try:
                            data = os.read(fd, _CHUNK)
                        except BlockingIOError:
                            continue
                        if not data:
                            sel.unregister(fd)
                            continue
                        buf = bufs[fd]
                        room = cap - len(buf)
                        if room > 0:
                            buf += data[:room]
                        if len(data) > room:
                            trunc[fd] = True
        finally:
            sel.close()
            os.close(pidfd)
            out.stdout = bytes(bufs[proc.stdout.fileno()])
            out.stderr = bytes(bufs[proc.stderr.fileno()])
            out.stdout_truncated = trunc[proc.stdout.fileno()]
            out.stderr_truncated = trunc[proc.stderr.fileno()]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
