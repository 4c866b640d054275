"""Run store benchmark: commit throughput, snapshot time/size, open + committed() on a big store.

    .venv/bin/python benchmarks/bench_store.py [--rows-1k 100000] [--rows-100k 5000] [--json]

Envelopes are real serialized ``Task`` messages whose payload is text-like (words drawn at
random), so compression behaves as it would on generated dialogues. Every flush is durable
(fsync) as in production. Runs in a temporary directory (or --dir) and removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.store import DONE, RunStore

WORDS = ("the a model answer question step teacher student because therefore compute value result "
         "check proof function return list error test patch file line token sample reason").split()


def _corpus(rng: random.Random, nbytes: int) -> bytes:
    return " ".join(rng.choices(WORDS, k=nbytes // 5)).encode()


def _payloads(seed: int, n: int, size: int) -> list[bytes]:
    """n distinct text payloads of ``size`` bytes: slices of a random-word corpus at random offsets."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 16 << 20)
    starts = [rng.randrange(len(corpus) - size) for _ in range(n)]
    return [corpus[s:s + size] for s in starts]


def _envelope(i: int, payload: bytes) -> bytes:
    t = task_pb2.Task(task_id=f"row-{i:08d}#0", row_index=i, row_id=f"row-{i:08d}", step=4,
                      next_role="done", status=DONE, trace=["teacher", "student", "teacher", "judge"])
    t.payload.type_url = "type.googleapis.com/bench.v1.Dialogue"
    t.payload.value = payload
    return t.SerializeToString()


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _new_store(base: Path, name: str, total: int) -> RunStore:
    return RunStore.create(base / name, job_yaml="bench: 1\n", descriptor_set=b"",
                           payload_type="bench.v1.Dialogue", fingerprint={"bench": "1"}, total_tasks=total)


def bench_commit(base: Path, name: str, rows: int, size: int, flush_every: int) -> dict:
    envs = [_envelope(i, p) for i, p in enumerate(_payloads(size, rows, size))]  # built before timing
    store = _new_store(base, name, rows)
    w = store.writer("sink-0")
    t0 = time.perf_counter()
    for i, env in enumerate(envs):
        w.append(f"row-{i:08d}#0", i, DONE, env)
        if w.pending >= flush_every:
            w.flush()
    w.flush()
    dt = time.perf_counter() - t0
    disk = _du(store.store_path)
    return {"rows": rows, "envelope_bytes": len(envs[0]), "flush_every": flush_every, "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt), "mb_per_s": round(sum(map(len, envs)) / dt / 1e6, 1),
            "disk_mb": round(disk / 1e6, 1)}


def bench_snapshot(base: Path, n: int, size: int) -> dict:
    tasks = [_envelope(i, p) for i, p in enumerate(_payloads(n, n, size))]
    store = _new_store(base, f"snap-{n}", n)
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        store.write_snapshot(tasks, meta={"reason": "bench", "k": k})
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    got, meta = store.latest_snapshot()
    read = time.perf_counter() - t0
    assert len(got) == n
    folder = store.store_path / "snapshots" / f"{meta['seq']:010d}"
    return {"tasks": n, "envelope_bytes": len(tasks[0]), "write_s": round(min(times), 3),
            "write_s_max": round(max(times), 3), "read_s": round(read, 3),
            "raw_mb": round(sum(map(len, tasks)) / 1e6, 2), "disk_mb": round(_du(folder) / 1e6, 2)}


def bench_open(run_dir: Path) -> dict:
    t0 = time.perf_counter()
    store = RunStore.open(run_dir)
    t1 = time.perf_counter()
    c = store.committed()
    t2 = time.perf_counter()
    st = store.status()
    t3 = time.perf_counter()
    return {"rows": len(c), "segments": st["segments"], "open_s": round(t1 - t0, 3),
            "committed_s": round(t2 - t1, 3), "status_again_s": round(t3 - t2, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-1k", type=int, default=100_000, help="rows of ~1 KB to commit")
    ap.add_argument("--rows-100k", type=int, default=5_000, help="rows of ~100 KB to commit")
    ap.add_argument("--flush-every", type=int, default=2000, help="rows per flush (1 KB case)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        res = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}"}
        res["commit_1k"] = bench_commit(base, "c1k", args.rows_1k, 1000, args.flush_every)
        res["commit_1k_small_flushes"] = bench_commit(base, "c1k-small", args.rows_1k, 1000, 100)
        res["commit_100k"] = bench_commit(base, "c100k", args.rows_100k, 100_000, 100)
        res["snapshot_1000"] = bench_snapshot(base, 1000, 2000)
        res["snapshot_10000"] = bench_snapshot(base, 10_000, 2000)
        res["open_committed"] = bench_open(base / "c1k")
        res["open_committed_small_flushes"] = bench_open(base / "c1k-small")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"machine: {res['machine']}")
    for name, c in (("1 KB", res["commit_1k"]), ("1 KB", res["commit_1k_small_flushes"]),
                    ("100 KB", res["commit_100k"])):
        print(f"commit {name:>6}: {c['rows_per_s']:>8,} rows/s  {c['mb_per_s']:>6} MB/s  "
              f"({c['rows']:,} rows, {c['envelope_bytes']} B envelopes, flush every {c['flush_every']}, "
              f"{c['disk_mb']} MB on disk)")
    for k in ("snapshot_1000", "snapshot_10000"):
        s = res[k]
        print(f"snapshot {s['tasks']:>6,} tasks: write {s['write_s']} s (max {s['write_s_max']}), "
              f"read {s['read_s']} s, {s['raw_mb']} MB raw, {s['disk_mb']} MB on disk")
    for o in (res["open_committed"], res["open_committed_small_flushes"]):
        print(f"open + committed() on {o['rows']:,} rows: open {o['open_s']} s, "
              f"committed() {o['committed_s']} s, status() again {o['status_again_s']} s "
              f"({o['segments']} segments)")


if __name__ == "__main__":
    main()
