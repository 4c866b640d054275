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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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


@dataclass
class Launch:
    """What a runtime produced: the argv, and file descriptors the child must inherit."""

    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)

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

    image: Path
    network: bool = False
    binary: str = ""
    name: str = "base"
    # Host directories only (no tmpfs work dir filled from fds).
    needs_host_workdir: bool = False

    def command(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        limits: Limits,
        host_workdir: Path | None = None,
        files: list[tuple[PurePosixPath, bytes, int]] = (),
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

    def command(self, argv, *, env, limits, host_workdir=None, files=()) -> Launch:
        if not argv:
            raise SandboxArgumentError("empty command")
        a = [self.binary, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
             "--gid", str(SANDBOX_UID)]
        if self.network:
            a.append("--share-net")
        a += ["--die-with-parent", "--new-session", "--hostname", "sandbox",
              "--ro-bind", str(self.image), "/",
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
        a += ["--chdir", WORK, "--clearenv"]
        for k, v in self.environment(env).items():
            a += ["--setenv", k, v]
        a += ["--", *argv]
        return Launch(a, fds)


@dataclass
class ApptainerRuntime(Runtime):
    """``apptainer exec`` on a .sif or a sandbox directory, contained, clean, no home, no network."""

    binary: str = "apptainer"
    name: str = "apptainer"
    needs_host_workdir: bool = True

    def command(self, argv, *, env, limits, host_workdir=None, files=()) -> Launch:
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


def make_runtime(kind: str, image: Path, *, network: bool, binary: str | None = None) -> Runtime:
    if kind == "bwrap":
        return BwrapRuntime(image=image, network=network, binary=binary or "bwrap")
    if kind == "apptainer":
        return ApptainerRuntime(image=image, network=network, binary=binary or "apptainer")
    raise ValueError(f"unknown sandbox runtime {kind!r} (bwrap, apptainer)")
