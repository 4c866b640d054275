"""Memory and disk limits by every route, for a server run by an ordinary user with no writable cgroup
(issue 17): shared anonymous mappings, memfds, SysV segments, files in /dev/shm, and a session's
/work on the host disk filled during a single exec. Each against a 512 MiB memory cap and a 256 MiB
work folder (the server's defaults)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from .client import SandboxClient
from .test_unprivileged import busy_user, uclient, user_server  # noqa: F401 - module fixtures
from .wire import ServiceError

MiB = 1 << 20
CAP = 512 * MiB

SHARED_MAPPING = """
import mmap, time
m = mmap.mmap(-1, 1536 << 20)  # MAP_SHARED | MAP_ANONYMOUS
for i in range(0, len(m), 4096):
    m[i] = 1
    if i % (256 << 20) == 0:
        print('touched', i >> 20, 'MiB', flush=True)
print('survived', flush=True)
time.sleep(6)
"""

MEMFDS = """
import os, time
fds = []
try:
    for n in range(24):
        fd = os.memfd_create(f'm{n}')
        for _ in range(63):
            os.write(fd, b'x' * (1 << 20))
        fds.append(fd)
        print('memfd', n, flush=True)
except OSError as e:
    print('memfd_create:', e.strerror, flush=True)
else:
    print('survived', flush=True)
    time.sleep(6)
"""

SYSV = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
r = libc.shmget(0, ctypes.c_size_t(1536 << 20), 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
print('shmget:', 'ok' if r >= 0 else os.strerror(ctypes.get_errno()))
"""

DEV_SHM = """
import os, time
written = 0
for d in ('/dev/shm', '/tmp', '/work'):
    for n in range(24):
        try:
            with open(f'{d}/f{n}', 'wb') as f:
                for _ in range(63):
                    f.write(b'x' * (1 << 20))
                    f.flush()
        except OSError as e:
            print(d, 'full:', e.strerror, flush=True)
            break
        written += 63
        print('wrote', written, 'MiB', flush=True)
print('survived', flush=True)
time.sleep(6)
"""


def test_a_1536_mib_shared_anonymous_mapping_is_stopped_at_the_cap(aloop, uclient):  # noqa: F811
    r = aloop.run(uclient.run(["python3", "-c", SHARED_MAPPING], limits={"memory_bytes": CAP}))
    assert r.limits_hit == ["memory"] and r.signal == 9, r
    assert "survived" not in r.stdout, r.stdout
    # Counted at its mapped size, whatever is touched: pages dropped from the page tables
    # (MADV_DONTNEED) stay allocated.
    assert r.peak_memory_bytes >= 1536 * MiB, r
    assert r.wall_time_s < 5, r


def test_memfd_create_and_sysv_segments_are_refused(aloop, uclient):  # noqa: F811
    memfds = aloop.run(uclient.run(["python3", "-c", MEMFDS], limits={"memory_bytes": CAP}))
    sysv = aloop.run(uclient.run(["python3", "-c", SYSV], limits={"memory_bytes": CAP}))
    assert (memfds.exit_code, memfds.stdout, memfds.limits_hit) == \
        (0, "memfd_create: Operation not permitted\n", []), memfds
    assert (sysv.exit_code, sysv.stdout) == (0, "shmget: Operation not permitted\n"), sysv


def test_without_the_filter_memfds_are_counted_and_stopped(busy_user, python_image):  # noqa: F811
    """Apptainer gets no seccomp filter: there the watchdog counts the memfds the tree holds. The
    executor runs as the ordinary user (no cgroup), as the server would, with the filter off."""
    code = f"""
import json
from pathlib import Path
from matrix_hpc.services.sandbox.executor import Executor
from matrix_hpc.services.sandbox.runtimes import BwrapRuntime
from matrix_hpc.services.sandbox.spec import Limits
ex = Executor(use_cgroups=False, use_seccomp=False)
r = ex.run(BwrapRuntime(image=Path({str(python_image)!r})), ['python3', '-c', {MEMFDS!r}],
           limits=Limits(wall_time_s=10, memory_bytes={CAP}))
print(json.dumps(dict(mechanism=ex.mechanism, limits_hit=r.limits_hit, peak=r.peak_memory_bytes,
                      stdout=r.stdout.decode(), wall=r.wall_time_s, signal=r.signal)))
"""
    done = busy_user.run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["mechanism"] == "watchdog" and r["limits_hit"] == ["memory"] and r["signal"] == 9, r
    made = [int(n) for n in re.findall(r"memfd (\d+)", r["stdout"])]
    assert "survived" not in r["stdout"] and len(made) < 24, r
    # Stopped past 512 MiB (8 x 63 MiB + one more), within what a loaded machine writes in a poll.
    assert CAP < r["peak"] < CAP + 10 * 63 * MiB and r["wall"] < 8, r


def test_files_in_dev_shm_tmp_and_work_are_stopped_at_the_cap(aloop, uclient):  # noqa: F811
    r = aloop.run(uclient.run(["python3", "-c", DEV_SHM], limits={"memory_bytes": CAP}))
    assert r.limits_hit[0] == "memory" and r.signal == 9, r
    # /dev/shm holds 256 MiB (each in-memory folder has the work folder's size), then /tmp, /work.
    assert "/dev/shm full: No space left on device" in r.stdout and "survived" not in r.stdout, r.stdout
    written = max(int(n) for n in re.findall(r"wrote (\d+) MiB", r.stdout))
    assert written < 12 * 63 and CAP < r.peak_memory_bytes < CAP + 4 * 63 * MiB, r


SESSION_FILLER = """
for n in range(20):
    with open(f'/work/f{n}', 'wb') as f:
        for _ in range(60):
            f.write(b'x' * (1 << 20))
    print('wrote', n + 1, flush=True)
print('survived', flush=True)
"""


def test_the_session_quota_holds_during_an_exec(aloop, uclient):  # noqa: F811
    """20 x 60 MiB into the session's /work (a host folder) against its 256 MiB quota: stopped during
    the exec, not afterwards, and the session is closed."""
    async def go():
        s = await uclient.open_session(limits={"wall_time_s": 10})
        r = await s.exec(["python3", "-c", SESSION_FILLER])
        with pytest.raises(ServiceError) as after:
            await s.exec(["true"])
        return r, after.value

    r, after = aloop.run(go())
    assert r.limits_hit == ["disk"] and r.signal == 9, r
    assert "survived" not in r.stdout and int(r.stdout.split()[-1]) < 20, r.stdout
    used = int(re.search(r"the session's files take (\d+) bytes", r.error).group(1))
    # Past 256 MiB by what the writer wrote between two size checks, far from the 1,200 MiB it meant to.
    assert 256 * MiB < used < 256 * MiB + 5 * 60 * MiB, r
    assert after.code == "NOT_FOUND", after


def test_a_folder_closed_to_its_owner_still_counts(aloop, uclient):  # noqa: F811
    """200 MiB hidden in a folder the sandbox made unreadable (chmod 000), then up to 100 MiB more,
    5 MiB every 0.1 s (so the exec lasts 2 s, many polls): the session goes over its 256 MiB quota,
    and that is seen during the exec."""
    hide = "mkdir d && for n in 1 2 3 4; do head -c 52428800 /dev/zero > d/$n; done && chmod 000 d && echo hidden"
    more = "for n in $(seq 20); do head -c 5242880 /dev/zero > g$n; sleep 0.1; done && echo more"

    async def go():
        s = await uclient.open_session(limits={"wall_time_s": 10})
        hidden = await s.exec(hide)
        over = await s.exec(more)
        return hidden, over

    hidden, over = aloop.run(go())
    assert (hidden.exit_code, hidden.stdout, hidden.limits_hit) == (0, "hidden\n", []), hidden
    # Only with the hidden 200 MiB counted is the session over quota (the g files alone are 100 MiB).
    assert over.limits_hit == ["disk"] and "more" not in over.stdout, over
    used = int(re.search(r"the session's files take (\d+) bytes", over.error).group(1))
    assert used > 256 * MiB, over


def test_with_the_suites_own_server_too(aloop, make_server):
    """The same routes through the server the suite runs as itself: as root on our VMs that is the
    cgroup (v1) path, where the kernel's OOM killer stops the tree and may pick the launcher; it is
    reported as ``memory``, not as a sandbox that could not start."""
    from .spec import Limits

    server, address = make_server(limits=Limits(wall_time_s=10, cpu_time_s=10, memory_bytes=CAP))
    client = SandboxClient([address], key="task-root", default_wall_s=10)

    async def go():
        return [await client.run(["python3", "-c", code]) for code in (SHARED_MAPPING, DEV_SHM)]

    for r in aloop.run(go()):
        assert r.limits_hit[0] == "memory" and r.signal == 9 and "survived" not in r.stdout, (server.executor.isolation, r)
