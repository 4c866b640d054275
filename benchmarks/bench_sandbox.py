"""Sandbox service benchmark: one-shot runs/s, cold start, session exec latency (real bwrap, gRPC).

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 40] [--no-ray] [--no-mechanisms] [--json]

Every request goes through the real path: gRPC on 127.0.0.1 -> server -> launcher (cgroup, rlimits,
drop root) -> bwrap over the debootstrapped `python` image -> `python3 -c 'print(1)'`.
- runs/s at client concurrency 1, 2 and 8 (the node admits up to 8 sandboxes at once here);
- cold start: a new server process-side object to its first answer, and (with Ray) deploy() of a
  replica actor plus its first answer, after ray.init();
- session exec latency: median and p90 of Exec on an open session, and open + close.
- mechanisms (executor only, no gRPC, same process): run latency with a cgroup, with the
  process-tree watchdog, and without the seccomp filter; the server CPU the watchdog spends per
  second of a running 8-process sandbox; how far a 4 x 400 MB tree gets past a 512 MiB cap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time

from matrix_hpc.services.sandbox.client import SandboxClient
from matrix_hpc.services.sandbox.image import build_image
from matrix_hpc.services.sandbox.server import SandboxServer
from matrix_hpc.services.sandbox.spec import SandboxSpec

CMD = ["python3", "-c", "print(1)"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def throughput(client: SandboxClient, concurrency: int, n: int) -> float:
    todo = iter(range(n))

    async def worker():
        for _ in todo:
            r = await client.run(CMD)
            assert r.ok and r.stdout == "1\n", r

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t)


async def in_process(args) -> dict:
    image = build_image("python", quiet=True)
    spec = SandboxSpec(image=str(image), max_concurrent=8)
    t0 = time.perf_counter()
    server = SandboxServer(spec)
    port = await server.start("127.0.0.1", 0)
    client = SandboxClient([f"127.0.0.1:{port}"], key="bench")
    first = await client.run(CMD)
    cold = time.perf_counter() - t0
    assert first.ok
    out: dict = {"isolation": server.executor.isolation, "server_cold_start_s": round(cold, 4)}
    for _ in range(3):  # warm up
        await client.run(CMD)
    single = []
    for _ in range(20):
        t = time.perf_counter()
        await client.run(CMD)
        single.append(time.perf_counter() - t)
    out["run_latency_median_s"] = round(statistics.median(single), 4)
    for c in (1, 2, 8):
        out[f"runs_per_s_c{c}"] = round(await throughput(client, c, args.runs * max(1, c // 2)), 1)
    execs, opens = [], []
    for _ in range(5):
        t = time.perf_counter()
        s = await client.open_session()
        await s.close()
        opens.append(time.perf_counter() - t)
    async with await client.open_session() as s:
        for _ in range(30):
            t = time.perf_counter()
            r = await s.exec(CMD)
            execs.append(time.perf_counter() - t)
            assert r.ok
    out["session_exec_median_s"] = round(statistics.median(execs), 4)
    out["session_exec_p90_s"] = round(pct(execs, 0.9), 4)
    out["session_open_close_median_s"] = round(statistics.median(opens), 4)
    await server.stop()
    return out


def with_ray() -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from matrix_hpc.runtime.security import LocalRay
    from matrix_hpc.services.sandbox import deploy

    with tempfile.TemporaryDirectory() as tmp, LocalRay(tmp, num_cpus=2, object_store_memory=256 * 1024**2,
                                                         log_to_driver=False):
        t = time.perf_counter()
        ep = deploy("bench", SandboxSpec(image="python"))
        t_deploy = time.perf_counter() - t
        r = asyncio.run(ep.client("bench").run(CMD))
        total = time.perf_counter() - t
        assert r.ok
        ep.shutdown()
        return {"ray_deploy_s": round(t_deploy, 3), "ray_deploy_to_first_result_s": round(total, 3)}


MULTI = "import os, time\nfor _ in range(7):\n    if os.fork() == 0:\n        break\ntime.sleep(2)\n"
HOG = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        b = bytearray(400 << 20)\n"
       "        time.sleep(30)\n        os._exit(0)\nfor _ in range(4):\n    os.wait()\n")


def mechanisms() -> dict:
    from matrix_hpc.services.sandbox.executor import Executor
    from matrix_hpc.services.sandbox.runtimes import BwrapRuntime
    from matrix_hpc.services.sandbox.spec import Limits

    rt = BwrapRuntime(image=build_image("python", quiet=True))
    lim = Limits(wall_time_s=20, memory_bytes=512 << 20)
    out: dict = {}
    kinds = {"watchdog": Executor(use_cgroups=False), "watchdog_no_seccomp": Executor(use_cgroups=False,
                                                                                         use_seccomp=False)}
    cg = Executor()
    if cg.cgroups is not None:
        kinds["cgroup"] = cg
    lat: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(20):  # interleaved, so that a load change on the machine hits every kind alike
        for name, ex in kinds.items():
            t = time.perf_counter()
            r = ex.run(rt, CMD, limits=lim)
            lat[name].append(time.perf_counter() - t)
            assert r.exit_code == 0 and r.stdout == b"1\n", r
    for name, ex in kinds.items():
        out[f"{name}_run_latency_median_s"] = round(statistics.median(lat[name][3:]), 4)
        if name == "watchdog_no_seccomp":
            continue
        cpu0, t0 = time.process_time(), time.perf_counter()
        r = ex.run(rt, ["python3", "-c", MULTI], limits=lim)
        out[f"{name}_server_cpu_per_sandbox_s"] = round((time.process_time() - cpu0) / (time.perf_counter() - t0), 4)
        r = ex.run(rt, ["python3", "-c", HOG], limits=lim)
        assert r.limits_hit[:1] == ["memory"], r
        out[f"{name}_4x400MB_peak_over_512MiB_cap"] = round(r.peak_memory_bytes / lim.memory_bytes, 2)
    cg.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40, help="one-shot runs per concurrency level (x c/2)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray deploy cold-start measurement")
    p.add_argument("--no-mechanisms", action="store_true", help="skip the cgroup / watchdog comparison")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = asyncio.run(in_process(args))
    if not args.no_mechanisms:
        res.update(mechanisms())
    if not args.no_ray:
        res.update(with_ray())
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
