"""Command construction for the two runtimes: bubblewrap and Apptainer.

Both are thin: a runtime turns (command, environment, work directory, limits, network) into the
argv of one sandboxed process. Everything else (limits, cgroups, output capture, timeouts, killing
the process tree, files in and out) is shared and lives in ``executor``.

The work directory is mounted at ``/work`` and is either a fresh tmpfs of ``work_dir_bytes`` filled
from file descriptors (bwrap one-shot runs: nothing touches the host disk) or a host directory
(sessions, and every Apptainer run).
"""

from __future__ import annotations

import os
import selectors
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import seccomp
from .hostview import HOST, HostView
from .spec import Limits

WORK = "/work"
SANDBOX_UID = 1000  # the uid seen inside a bwrap sandbox
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": WORK,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}


class SandboxArgumentError(ValueError):
    """A request the sandbox refuses (bad path, empty command...): INVALID_ARGUMENT."""


def check_path(path: str) -> PurePosixPath:
    """A path relative to /work, without '..', absolute parts or NUL bytes."""
    if not path or "\0" in path:
        raise SandboxArgumentError(f"bad file path {path!r}")
    p = PurePosixPath(path)
    if p.is_absolute() and p.parts[:2] == ("/", "work"):
        p = PurePosixPath(*p.parts[2:]) if len(p.parts) > 2 else PurePosixPath(".")
    if p.is_absolute() or ".." in p.parts or str(p) in (".", ""):
        raise SandboxArgumentError(f"file path {path!r} must be relative to /work, without '..'")
    return p


def check_env(env: dict[str, str]) -> dict[str, str]:
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise SandboxArgumentError(f"bad environment variable {k!r}")
    return env


class Control:
    """bwrap's side channels for one sandbox, and the launcher's report.

    On the status pipe (``--json-status-fd``) bwrap tells the launcher (``_limiter.py``, its
    parent) the sandbox's first process once its namespaces exist, and at the end the command's
    exit code, only if it executed the command. That first process waits on the block pipe (after
    its set-up, before the seccomp filter and the command). The launcher caps it and reports on the
    report pipe its pid (nothing: the sandbox could not be created), then ``ran``; the server opens
    a pidfd on it and lets it go. The seccomp program goes in a memfd.
    """

    def __init__(self, with_seccomp: bool) -> None:
        self.status_r, self.status_w = os.pipe()
        self.block_r, self.block_w = os.pipe()
        self.report_r, self.report_w = os.pipe()
        self.seccomp_fd = seccomp.filter_fd() if with_seccomp else -1
        self._rest = b""

    @classmethod
    def open(cls, with_seccomp: bool) -> Control:
        return cls(with_seccomp)

    def child_fds(self) -> list[int]:
        """What the launcher inherits (it hands bwrap its part)."""
        return [fd for fd in (self.status_r, self.status_w, self.block_r, self.report_w, self.seccomp_fd) if fd >= 0]

    def launcher_config(self) -> dict:
        return {"bwrap_status_fd": self.status_r, "report_fd": self.report_w,
                "bwrap_fds": [fd for fd in (self.status_w, self.block_r, self.seccomp_fd) if fd >= 0]}

    def child_pid(self, deadline: float) -> int | None:
        """The host pid of the sandbox's first process, or None when none was reported."""
        data = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.report_r, selectors.EVENT_READ)
            while b"\n" not in data and time.monotonic() < deadline:
                if not sel.select(max(deadline - time.monotonic(), 0)):
                    continue
                chunk = os.read(self.report_r, 64)
                if not chunk:
                    break
                data += chunk
        line, _, self._rest = data.partition(b"\n")
        try:
            return int(line)
        except ValueError:
            return None

    def command_ran(self) -> bool:
        """After the launcher has exited: whether bwrap executed the command."""
        data = self._rest
        os.set_blocking(self.report_r, False)
        try:
            while chunk := os.read(self.report_r, 64):
                data += chunk
        except BlockingIOError:
            pass
        return b"ran" in data

    def release(self) -> None:
        try:
            os.write(self.block_w, b"1")
        except OSError:
            pass  # it died during its set-up; the exit status tells
        self._close("block_w")

    def close_child_ends(self) -> None:
        for name in ("status_r", "status_w", "block_r", "report_w", "seccomp_fd"):
            self._close(name)

    def close(self) -> None:
        for name in ("status_r", "status_w", "block_r", "block_w", "report_r", "report_w", "seccomp_fd"):
            self._close(name)

    def _close(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            setattr(self, name, -1)
            os.close(fd)


@dataclass
class Launch:
    """What a runtime produced: the argv, file descriptors the child must inherit (owned here),
    bwrap's side channels and the sandbox paths that are in-memory folders."""

    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    control: Control | None = None
    tmpfs: list[str] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pass_fds = []


@dataclass
class Runtime:
    """Shared by both runtimes: the image, the network switch and the binary to call."""

    image: Path | HostView
    network: bool = False
    binary: str = ""
    name: str = "base"
    # Host directories only (no tmpfs work dir filled from fds).
    needs_host_workdir: bool = False
    # Speaks the Control protocol (reports its first process, waits to be let go, takes seccomp).
    reports_child: bool = False

    def command(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        limits: Limits,
        host_workdir: Path | None = None,
        files: list[tuple[PurePosixPath, bytes, int]] = (),
        control: Control | None = None,
    ) -> Launch:
        raise NotImplementedError

    @staticmethod
    def environment(env: dict[str, str]) -> dict[str, str]:
        out = dict(DEFAULT_ENV)
        out.update(check_env(env))
        return out


@dataclass
class BwrapRuntime(Runtime):
    """bubblewrap over a root filesystem directory: every namespace unshared, read-only image."""

    binary: str = "bwrap"
    name: str = "bwrap"
    reports_child: bool = True

    def command(self, argv, *, env, limits, host_workdir=None, files=(), control=None) -> Launch:
        if not argv:
            raise SandboxArgumentError("empty command")
        a = [self.binary, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
             "--gid", str(SANDBOX_UID)]
        if control is not None:
            a += ["--json-status-fd", str(control.status_w), "--block-fd", str(control.block_r)]
            if control.seccomp_fd >= 0:
                a += ["--seccomp", str(control.seccomp_fd)]
        tmpfs = ["/tmp", "/dev/shm"] + ([WORK] if host_workdir is None else [])
        if self.network:
            a.append("--share-net")
        view = self.image if isinstance(self.image, HostView) else None
        root = view.bwrap_root() if view else ["--ro-bind", str(self.image), "/"]
        a += ["--die-with-parent", "--new-session", "--hostname", "sandbox", *root,
              "--proc", "/proc", "--dev", "/dev",
              "--size", str(limits.work_dir_bytes), "--tmpfs", "/tmp",
              "--size", str(limits.work_dir_bytes), "--tmpfs", "/dev/shm"]
        if self.network:
            for f in ("/etc/resolv.conf", "/etc/hosts"):
                if os.path.exists(f):
                    a += ["--ro-bind", f, f]
        fds: list[int] = []
        if host_workdir is not None:
            a += ["--bind", str(host_workdir), WORK]
        else:
            a += ["--size", str(limits.work_dir_bytes), "--tmpfs", WORK]
            made: set[PurePosixPath] = set()
            try:
                for rel, content, mode in files:
                    for parent in reversed(rel.parents[:-1] if len(rel.parts) > 1 else []):
                        if parent not in made:
                            made.add(parent)
                            a += ["--perms", "0755", "--dir", f"{WORK}/{parent}"]
                    fd = os.memfd_create("sandbox-file", 0)
                    fds.append(fd)
                    _write_all(fd, content)
                    os.lseek(fd, 0, os.SEEK_SET)
                    a += ["--perms", f"{(mode or 0o644) & 0o7777:04o}", "--file", str(fd), f"{WORK}/{rel}"]
            except BaseException:
                Launch([], fds).close_fds()
                raise
        if view:
            a += view.bwrap_seal()
        a += ["--chdir", WORK, "--clearenv"]
        for k, v in self.environment(env).items():
            a += ["--setenv", k, v]
        a += ["--", *argv]
        return Launch(a, fds, control, tmpfs)


@dataclass
class ApptainerRuntime(Runtime):
    """``apptainer exec`` on a .sif or a sandbox directory, contained, clean, no home, no network."""

    binary: str = "apptainer"
    name: str = "apptainer"
    needs_host_workdir: bool = True

    def command(self, argv, *, env, limits, host_workdir=None, files=(), control=None) -> Launch:
        if not argv:
            raise SandboxArgumentError("empty command")
        if host_workdir is None:
            raise ValueError("the apptainer runtime needs a host work directory")
        a = [self.binary, "--silent", "exec", "--containall", "--cleanenv", "--no-home",
             "--writable-tmpfs", "--no-privs"]
        if not self.network:
            a += ["--net", "--network", "none"]
        a += ["--bind", f"{host_workdir}:{WORK}", "--pwd", WORK]
        for k, v in self.environment(env).items():
            a += ["--env", f"{k}={v}"]
        a += [str(self.image), *argv]
        return Launch(a, [])

    def instance_start(self, instance: str, host_workdir: Path) -> list[str]:
        """``apptainer instance start`` with the same containment (long-lived tool environments)."""
        a = [self.binary, "--silent", "instance", "start", "--containall", "--cleanenv", "--no-home",
             "--writable-tmpfs", "--no-privs"]
        if not self.network:
            a += ["--net", "--network", "none"]
        return a + ["--bind", f"{host_workdir}:{WORK}", str(self.image), instance]

    def instance_stop(self, instance: str) -> list[str]:
        return [self.binary, "--silent", "instance", "stop", "--force", instance]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def make_runtime(kind: str, image: Path | HostView, *, network: bool, binary: str | None = None) -> Runtime:
    if kind == "bwrap":
        return BwrapRuntime(image=image, network=network, binary=binary or "bwrap")
    if kind == "apptainer":
        if isinstance(image, HostView):
            raise ValueError(f"the apptainer runtime needs a .sif or an image folder, not {HOST!r}")
        return ApptainerRuntime(image=image, network=network, binary=binary or "apptainer")
    raise ValueError(f"unknown sandbox runtime {kind!r} (bwrap, apptainer)")
