"""Feed a sandbox its stdin and read its stdout/stderr until it exits, a limit fires or it is cancelled.

Each stream keeps its first ``max_output_bytes``; the rest is read and dropped (never buffered), so
a command that prints gigabytes costs no memory. Blocking code, run in the server's worker threads.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

CHUNK = 65536
Ended = Literal["exited", "wall_time", "cancelled", "limit"]


class Captured(Protocol):
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool


def pump(proc: subprocess.Popen, out: Captured, *, stdin: bytes, deadline: float, max_output_bytes: int,
         every: float, cancelled: threading.Event, over_limits: Callable[[], bool]) -> Ended:
    """Stream ``proc``'s pipes into ``out``; ``over_limits`` is polled every ``every`` seconds while
    it runs. Returns why it stopped: it exited (and its pipes closed), or the caller must kill it."""
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
    exited_at = None
    next_poll = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if exited_at is not None:
                # Exited: the PID namespace is gone, pipes close at once; do not wait forever on a
                # pipe some escaped process might hold.
                if len(sel.get_map()) == 0 or now - exited_at > 1.0:
                    return "exited"
            else:
                if now >= deadline:
                    return "wall_time"
                if cancelled.is_set():
                    return "cancelled"
                if now >= next_poll:
                    if over_limits():
                        return "limit"
                    next_poll = now + every
            for key, _ in sel.select(min(max(deadline - now, 0), every)):
                fd = key.fd
                if fd == pidfd:
                    # Exited (zombie, not reaped: the caller reaps it after detaching).
                    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                        continue
                    exited_at = time.monotonic()
                    sel.unregister(pidfd)
                elif fd == stdin_fd:
                    try:
                        n = os.write(fd, in_view[:CHUNK])
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
                        data = os.read(fd, CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(fd)
                        continue
                    buf = bufs[fd]
                    room = max_output_bytes - len(buf)
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
