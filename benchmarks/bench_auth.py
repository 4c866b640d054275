"""What the run credentials cost: LLM calls/s over gRPC (scripted backend, zero latency) with and
without the secret, in the same process, rounds alternated so that machine load hits both alike.

The server with the secret checks it in an interceptor (constant-time compare); the client adds it
through channel interceptors. This is the worst case: with a real model a call takes 10-1000 ms.

    .venv/bin/python benchmarks/bench_auth.py [--calls 3000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matrix_hpc.services.auth import new_secret  # noqa: E402
from matrix_hpc.services.llm import LLMSpec  # noqa: E402
from matrix_hpc.services.llm.background import BackgroundServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


async def calls_per_s(endpoint, calls: int, concurrency: int) -> tuple[float, float]:
    """(calls/s with ``concurrency`` in flight, mean seconds of a sequential call)."""
    client = endpoint.client()
    for _ in range(100):  # warm up the channel
        await client.chat(MESSAGES)
    t0 = time.perf_counter()
    for _ in range(calls // 10):
        await client.chat(MESSAGES)
    latency = (time.perf_counter() - t0) / (calls // 10)

    async def worker():
        for _ in range(calls // concurrency):
            await client.chat(MESSAGES)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (calls // concurrency) * concurrency / (time.perf_counter() - t0), latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    secret = new_secret()
    spec = LLMSpec(backend="scripted")
    results: dict[str, list[tuple[float, float]]] = {"open": [], "secret": []}
    with BackgroundServer(spec, "open") as open_srv, BackgroundServer(spec, "guarded", secret=secret) as guarded:
        for _ in range(args.rounds):
            for name, srv in (("open", open_srv), ("secret", guarded)):
                results[name].append(asyncio.run(calls_per_s(srv.endpoint(), args.calls, args.concurrency)))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    for name, (rate, latency) in med.items():
        print(f"{name:>7}: {rate:8.0f} calls/s at concurrency {args.concurrency}; "
              f"sequential {latency * 1e6:6.0f} us/call (median of {args.rounds} rounds)")
    print(f"with the secret / without: throughput {med['secret'][0] / med['open'][0]:.2f}x, "
          f"sequential latency {med['secret'][1] / med['open'][1]:.2f}x")


if __name__ == "__main__":
    main()
