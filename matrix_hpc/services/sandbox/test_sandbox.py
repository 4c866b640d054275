"""The sandbox service for real: bubblewrap, the debootstrapped image, gRPC on 127.0.0.1.

Hostile inputs must each end with a clear result, the host unharmed and no process left behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import grpc
import pytest

from matrix_hpc._gen.sandbox.v1 import sandbox_pb2 as pb
from matrix_hpc._gen.sandbox.v1 import sandbox_pb2_grpc as pb_grpc

from .client import SandboxClient
from .wire import ServiceError

SOLUTION = """
import sys
a, b = map(int, sys.stdin.read().split())
print(a + b)
"""


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(max_concurrent=2, session_ttl_s=60)


@pytest.fixture
def client(server):
    return SandboxClient([server[1]], key="task-1", default_wall_s=10)


def host_procs_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def no_leftovers(server) -> None:
    """Every sandbox cgroup of the server is gone (so are its processes)."""
    root = server.executor.cgroups
    if root is not None:
        for d in root.dirs.values():
            assert [c for c in d.iterdir() if c.is_dir()] == [], f"cgroups left in {d}"


# -- the ordinary path -------------------------------------------------------------------------


def test_python_code_with_test_cases(aloop, client, server):
    async def go():
        results = []
        for a, b in [(1, 2), (10, -3), (123456789, 1)]:
            r = await client.run(["python3", "solution.py"], files={"solution.py": SOLUTION}, stdin=f"{a} {b}\n")
            results.append((r, a + b))
        return results

    for r, want in aloop.run(go()):
        assert r.ok, r
        assert r.stdout.strip() == str(want)
        assert r.wall_time_s > 0 and r.peak_memory_bytes > 0
    no_leftovers(server[0])


def test_failing_code_reports_exit_code_and_stderr(aloop, client):
    r = aloop.run(client.run(["python3", "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]))
    assert r.exit_code == 3 and "boom" in r.stderr and not r.limits_hit and not r.ok


def test_string_command_and_env(aloop, client):
    r = aloop.run(client.run("echo $GREETING from $(pwd) as $(id -u)", env={"GREETING": "hi"}))
    assert r.ok and r.stdout.strip() == "hi from /work as 1000"


def test_session_keeps_files_across_execs(aloop, client, server):
    async def go():
        async with await client.open_session(files={"data/n.txt": "1"}, env={"STEP": "x"}) as s:
            for _ in range(3):
                r = await s.exec("python3 -c \"p='data/n.txt'; n=int(open(p).read()); open(p,'w').write(str(n*2))\"")
                assert r.ok, r
            await s.put({"extra.py": "print('extra', __import__('os').environ['STEP'])"})
            r = await s.exec(["python3", "extra.py"])
            got = await s.get(["data/n.txt", "missing.txt"])
            return r, got

    r, got = aloop.run(go())
    assert r.stdout.strip() == "extra x"
    assert got == {"data/n.txt": b"8"}
    assert server[0].sessions == {}
    no_leftovers(server[0])


# -- hostile inputs ----------------------------------------------------------------------------


def test_fork_bomb_is_contained(aloop, client, server):
    before = len([p for p in os.listdir("/proc") if p.isdigit()])
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = aloop.run(client.run(["python3", "-c", bomb], limits={"cpu_time_s": 3, "wall_time_s": 8}))
    assert "processes" in r.limits_hit, r
    assert set(r.limits_hit) & {"cpu_time", "wall_time"}
    assert r.wall_time_s < 9
    no_leftovers(server[0])
    after = len([p for p in os.listdir("/proc") if p.isdigit()])
    assert after < before + 20  # nothing of the bomb is left on the host


def test_memory_hog_is_killed(aloop, client, server):
    r = aloop.run(client.run(["python3", "-c", "x = bytearray(2 << 30); print('survived')"],
                             limits={"memory_bytes": 128 << 20}))
    assert r.limit_hit == "memory", r
    assert "survived" not in r.stdout and r.exit_code != 0
    assert r.peak_memory_bytes <= 130 << 20
    no_leftovers(server[0])


def test_infinite_loop_hits_cpu_limit(aloop, client):
    r = aloop.run(client.run(["python3", "-c", "while True: pass"], limits={"cpu_time_s": 1}))
    assert r.limit_hit == "cpu_time", r
    assert r.wall_time_s < 9  # before the 10 s wall clock, even on a loaded machine


def test_sleeper_hits_wall_clock_and_whole_tree_dies(aloop, client, server):
    marker = "31411"
    r = aloop.run(client.run(f"sleep {marker} & sleep {marker}1 & sleep 1000", limits={"wall_time_s": 1}))
    assert r.limit_hit == "wall_time" and 1 <= r.wall_time_s < 4, r
    assert host_procs_with(f"sleep {marker}") == []
    no_leftovers(server[0])


def test_one_gigabyte_of_stdout_is_truncated_while_streaming(aloop, client):
    t = time.monotonic()
    r = aloop.run(client.run(["python3", "-c",
                              "import sys\nb = b'y' * (1 << 20)\nfor _ in range(1024): sys.stdout.buffer.write(b)"],
                             limits={"wall_time_s": 30}))
    assert r.stdout_truncated and len(r.stdout_bytes) == 64 << 10 and r.stdout_bytes == b"y" * (64 << 10)
    assert r.exit_code == 0 and r.limit_hit == "output"
    assert time.monotonic() - t < 20


def test_no_network(aloop, client):
    # A listener on the host's loopback: the sandbox has its own network namespace and cannot reach it.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    code = (f"import socket\ns = socket.socket()\ns.settimeout(3)\n"
            f"try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
            f"except OSError as e:\n    print('refused', e)\n"
            f"print(open('/proc/net/dev').read())")
    try:
        r = aloop.run(client.run(["python3", "-c", code]))
        assert r.exit_code == 0, r
        assert "CONNECTED" not in r.stdout and "refused" in r.stdout
        ifaces = [ln.split(":")[0].strip() for ln in r.stdout.splitlines() if ":" in ln and "|" not in ln]
        assert ifaces == ["lo"], r.stdout
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


def test_writes_outside_work_fail_and_do_not_reach_the_host(aloop, client, python_image):
    script = ("for p in /etc/pwned /usr/pwned /pwned /root/pwned /proc/sys/kernel/hostname; do "
              "echo x > $p 2>/dev/null && echo WROTE $p; done; echo ok > /tmp/t && echo tmp-ok")
    r = aloop.run(client.run(script))
    assert "WROTE" not in r.stdout and "tmp-ok" in r.stdout, r
    for p in ("etc/pwned", "usr/pwned", "pwned"):
        assert not (python_image / p).exists()
    assert not Path("/etc/pwned").exists()
    # /tmp was private to that run.
    assert aloop.run(client.run("cat /tmp/t")).exit_code != 0


def test_host_files_are_invisible(aloop, client):
    host_shadow = Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else ""
    r = aloop.run(client.run(
        "cat /etc/shadow; ls -A /root; ls /work/main /home; cat /work/main/pyproject.toml; "
        f"ls {Path.home()}; echo done"))
    assert "done" in r.stdout
    assert "matrix-hpc" not in r.stdout and "[project]" not in r.stdout
    for line in host_shadow.splitlines():
        if ":" in line and line.split(":")[1] not in ("*", "!", "!*", ""):
            assert line.split(":")[1] not in r.stdout  # no host password hash leaks
    assert "Permission denied" in r.stderr or "No such file" in r.stderr


def test_processes_left_running_after_exit_are_killed(aloop, client, server):
    marker = "27182"

    async def go():
        r1 = await client.run(f"(sleep {marker} &) ; setsid sleep {marker}1 & nohup sleep {marker}2 >/dev/null & echo started")
        async with await client.open_session() as s:
            r2 = await s.exec(f"sleep {marker}3 & echo started")
            leftover = host_procs_with(f"sleep {marker}")
        return r1, r2, leftover

    r1, r2, leftover = aloop.run(go())
    assert r1.ok and r2.ok and "started" in r1.stdout and "started" in r2.stdout
    assert leftover == []
    assert host_procs_with(f"sleep {marker}") == []
    no_leftovers(server[0])


def test_session_files_cannot_lead_the_host_outside(aloop, client):
    async def go():
        async with await client.open_session() as s:
            r = await s.exec("ln -s /etc/shadow leak && ln -s /etc etcdir && mkfifo fifo && echo ok")
            got = await s.get(["leak", "fifo", "etcdir/hostname"])
            with pytest.raises(ServiceError) as e:
                await s.put({"etcdir/matrix-pwned": "x"})
            return r, got, e.value

    r, got, err = aloop.run(go())
    assert r.ok, r
    assert got == {}
    assert err.code == "INVALID_ARGUMENT"
    assert not Path("/etc/matrix-pwned").exists()


def test_bad_requests_are_refused(aloop, client):
    with pytest.raises(ServiceError) as e:
        aloop.run(client.run(["true"], files={"../escape": "x"}))
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ServiceError) as e:
        aloop.run(client.run([]))
    assert e.value.code == "INVALID_ARGUMENT"


def test_cancelled_request_kills_its_sandbox(aloop, client, server):
    with pytest.raises(ServiceError) as e:
        aloop.run(client.run("sleep 16180", timeout=0.5))
    assert e.value.code == "DEADLINE_EXCEEDED"

    async def settle():  # the server notices the cancellation on its own loop, then kills
        for _ in range(100):
            if not host_procs_with("sleep 16180") and server[0].running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert aloop.run(settle())
    no_leftovers(server[0])


# -- sessions of dead tasks, release, backpressure ------------------------------------------------


def test_sessions_of_a_dead_task_are_reaped_and_released(aloop, make_server):
    srv, addr = make_server(session_ttl_s=30)
    dead = SandboxClient([addr], key="task-dead")
    alive = SandboxClient([addr], key="task-alive")

    async def go():
        s_dead = await dead.open_session(ttl_s=0.3)
        s_alive = await alive.open_session()  # the server's TTL (30 s)
        # Nobody touches s_dead again (its task died): the reaper closes it within its TTL.
        for _ in range(500):
            if s_dead.id not in srv.sessions:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(ServiceError) as e:
            await s_dead.exec("true")
        a = await s_alive.exec("touch keep")
        await s_alive.close()
        return a, e.value

    a, err = aloop.run(go())
    assert a.ok and err.code == "NOT_FOUND"
    assert srv.reaped_total >= 1


def test_release_closes_every_session_of_the_owners(aloop, server):
    srv, addr = server
    a = SandboxClient([addr], key="task-a")
    b = SandboxClient([addr], key="task-b")

    async def go():
        sa = [await a.open_session(files={"f": "a"}) for _ in range(2)]
        sb = await b.open_session(files={"f": "b"})
        dirs = [srv.sessions[s.id].dir for s in sa]
        from .client import release

        n = await release([addr], ["task-a", "task-unknown"])
        with pytest.raises(ServiceError):
            await sa[0].exec("true")
        rb = await sb.exec("cat f")
        await sb.close()
        return n, dirs, rb

    n, dirs, rb = aloop.run(go())
    assert n == 2 and rb.stdout == "b"
    assert not any(d.exists() for d in dirs)


def test_full_node_answers_resource_exhausted_and_client_moves_on(aloop, make_server):
    _, full_addr = make_server(max_concurrent=1, max_queue=0)
    _, other_addr = make_server(max_concurrent=1, max_queue=0)

    async def go():
        async with grpc.aio.insecure_channel(full_addr) as ch:
            stub = pb_grpc.SandboxStub(ch)
            busy = asyncio.ensure_future(stub.Run(pb.RunRequest(command=["sleep", "2"]), timeout=20))
            for _ in range(200):  # until the node reports the sandbox running
                if (await stub.Stats(pb.StatsRequest())).running == 1:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Run(pb.RunRequest(command=["true"]), timeout=20)
            code = e.value.code()
            # A balanced client skips the full node and lands on the other one.
            c = SandboxClient([full_addr, other_addr], key="t")
            rs = [await c.run(["true"]) for _ in range(3)]
            await busy
            return code, rs

    code, rs = aloop.run(go())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(r.ok for r in rs)


def test_health_service(aloop, server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def go():
        async with grpc.aio.insecure_channel(server[1]) as ch:
            return await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="matrix_hpc.sandbox.v1.Sandbox"), timeout=5)

    assert aloop.run(go()).status == 1  # SERVING


def test_session_over_its_disk_quota_is_closed(aloop, client, server):
    async def go():
        s = await client.open_session(limits={"work_dir_bytes": 1 << 20})
        r = await s.exec("head -c 3000000 /dev/zero > big; echo wrote")
        with pytest.raises(ServiceError) as e:
            await s.exec("true")
        return r, e.value

    r, err = aloop.run(go())
    assert "disk" in r.limits_hit and "closed" in r.error
    assert err.code == "NOT_FOUND"
    assert not any(s for s in server[0].sessions.values())


def test_a_full_work_folder_is_reported_as_disk(aloop, client):
    from .test_unprivileged import DISK_FILLER

    r = aloop.run(client.run(["python3", "-c", DISK_FILLER], limits={"work_dir_bytes": 8 << 20}))
    assert r.exit_code == 0 and r.limits_hit == ["disk"], r
