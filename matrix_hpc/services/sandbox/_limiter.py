"""Tiny launcher run between the server and the runtime (bwrap / apptainer).

``python -I -S _limiter.py CONFIG_JSON ARGV...``: join the sandbox's cgroups, set resource
limits, start a new session (so the whole group can be killed), drop root to an unprivileged
uid, then exec ARGV. Kept free of imports from matrix_hpc so it starts in a few milliseconds.

With ``bwrap_status_fd`` (bwrap's side channels, see ``runtimes.Control``) it stays as bwrap's
parent instead: it reads bwrap's report of the sandbox's first process, gives that process
``RLIMIT_NPROC`` (``nproc``; we are the same user, which the kernel requires), passes its pid to the
server on ``report_fd`` (nothing: the sandbox was not created), then ``ran`` if bwrap reported the
command's exit (it does only for a command it executed), and ends as bwrap ends (same exit code or
signal).
"""

import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401 - os.exec* imports it lazily; after setuid it may be unreadable


def main() -> None:
    cfg = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    # Python ignores these at start-up and an exec keeps ignored signals ignored: the sandbox must
    # get the defaults (a write past RLIMIT_FSIZE then kills with SIGXFSZ, a status we can read).
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    pid = str(os.getpid())
    for procs in cfg.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write(pid)
    for name, value in cfg.get("rlimits", {}).items():
        soft, hard = value
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.setsid()
    uid = cfg.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(uid)
    if cfg.get("bwrap_status_fd") is None:
        os.execv(argv[0], argv)
    supervise(argv, cfg["bwrap_status_fd"], cfg["report_fd"], cfg["bwrap_fds"], cfg.get("nproc"))


def supervise(argv: list[str], status_fd: int, report_fd: int, bwrap_fds: list[int], nproc: int | None) -> None:
    child = os.fork()
    if child == 0:
        try:
            os.close(status_fd)
            os.close(report_fd)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    for fd in bwrap_fds:  # bwrap's ends: its status pipe must reach EOF when bwrap ends
        os.close(fd)
    data = b""
    while b"\n" not in data and (chunk := os.read(status_fd, 4096)):
        data += chunk
    first, _, data = data.partition(b"\n")
    if first:
        pid = int(json.loads(first)["child-pid"])
        if nproc is not None:
            resource.prlimit(pid, resource.RLIMIT_NPROC, (nproc, nproc))
        os.write(report_fd, b"%d\n" % pid)
    _, status = os.waitpid(child, 0)
    os.set_blocking(status_fd, False)
    try:
        while chunk := os.read(status_fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    if b'"exit-code"' in data:  # bwrap writes it only when the command was executed
        os.write(report_fd, b"ran\n")
    os.close(report_fd)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and fail; the server maps 127 to an error
        sys.stderr.write(f"matrix-hpc sandbox launcher: {type(e).__name__}: {e}\n")
        os._exit(127)
