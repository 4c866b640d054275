"""Run store: commits, torn writes, concurrent writers, snapshots, status. Real files, real processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from matrix_hpc.store import DONE, FAILED, RunStore, StoreError, chunks, layout

CTX = mp.get_context("spawn")  # zarr runs an event-loop thread: never fork a process that used it


def _env(wid: str, i: int) -> bytes:
    """A deterministic envelope of varying size (1 .. ~3 KB)."""
    return (f"{wid}:{i}:".encode() * (1 + (i * 37) % 97))[: 1 + (i * 131) % 3000] + f"|{i}".encode()


def _status_of(i: int) -> int:
    return FAILED if i % 5 == 0 else DONE


def _make(run_dir: Path, total: int = 1000, **kw) -> RunStore:
    args = dict(job_yaml="name: t\n", descriptor_set=b"\x01desc", payload_type="t.v1.P",
                fingerprint={"job": "a", "code": "b"}, total_tasks=total)
    args.update(kw)
    return RunStore.create(run_dir, **args)


def _append(w, wid: str, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        w.append(f"{wid}-{i}#0", i, _status_of(i), _env(wid, i))


def _expected(wid: str, lo: int, hi: int) -> dict[str, int]:
    return {f"{wid}-{i}#0": _status_of(i) for i in range(lo, hi)}


# ---- children (module level: spawned processes import this module) -----------------------------
def _child_write(run_dir, wid, n, per_flush, barrier):
    w = RunStore.open(run_dir).writer(wid)
    barrier.wait()
    for lo in range(0, n, per_flush):
        _append(w, wid, lo, min(lo + per_flush, n))
        w.flush()


def _child_block_mid_flush(run_dir, conn, good_flushes):
    w = RunStore.open(run_dir).writer("k")
    for f in range(good_flushes):
        _append(w, "k", f * 300, (f + 1) * 300)
        w.flush()
    _append(w, "k", good_flushes * 300, (good_flushes + 1) * 300)

    def hook():
        conn.send("chunks written, no commit record yet")
        conn.recv()  # blocks until the parent kills us

    w._before_commit = hook
    w.flush()


def _child_flush_forever(run_dir, conn):
    w = RunStore.open(run_dir).writer("r")
    f = 0
    while True:
        _append(w, "r", f * 200, (f + 1) * 200)
        w.flush()
        f += 1
        conn.send(f)


def _child_snapshot_killed(run_dir, conn):
    store = RunStore.open(run_dir)
    store.write_snapshot([b"a1", b"a2"], meta={"name": "A"})

    def hook():
        conn.send("arrays written, not marked complete")
        conn.recv()

    store.snapshots.before_commit = hook
    store.write_snapshot([b"b1", b"b2", b"b3"], meta={"name": "B"})


def _child_handshake_writer(run_dir, conn, flushes):
    w = RunStore.open(run_dir).writer("s")

    def hook():
        conn.send("mid-flush")
        conn.recv()  # parent reads status while our chunks are on disk without records

    w._before_commit = hook
    for f in range(flushes):
        _append(w, "s", f * 500, (f + 1) * 500)
        w.flush()
        conn.send(("flushed", (f + 1) * 500))
    w._before_commit = None
    for f in range(flushes, flushes + 20):  # then free-running while the parent polls
        _append(w, "s", f * 500, (f + 1) * 500)
        w.flush()
    conn.send("done")


def _spawn(target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _kill(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


# ---- tests ---------------------------------------------------------------------------------------
def test_create_open_round_trip(tmp_path):
    run = tmp_path / "run"
    store = _make(run, total=2000)
    for name in ("job.yaml", "payload.desc", "fingerprint.json", "logs", "store.zarr/zarr.json"):
        assert (run / name).exists(), name
    assert (run / "job.yaml").read_text() == "name: t\n"
    w = store.writer("w0")
    _append(w, "w0", 0, 1500)
    assert w.pending == 1500
    assert store.committed() == {}  # buffered only
    w.flush()
    assert w.pending == 0

    again = RunStore.open(run)
    assert (again.payload_type, again.total_tasks, again.descriptor_set) == ("t.v1.P", 2000, b"\x01desc")
    assert again.fingerprint == {"job": "a", "code": "b"}
    assert again.committed() == _expected("w0", 0, 1500)
    assert sorted(again.iter_results()) == sorted(_env("w0", i) for i in range(1500))
    assert sorted(again.iter_results(status=FAILED)) == sorted(_env("w0", i) for i in range(0, 1500, 5))

    # reopening the writer continues after its chunks; nothing is overwritten
    w2 = again.writer("w0")
    _append(w2, "w0", 1500, 1800)
    w2.flush()
    assert store.committed() == _expected("w0", 0, 1800)  # the first handle sees new commits too
    st = store.status()
    assert (st["done"], st["failed"], st["pending"], st["duplicates"]) == (1440, 360, 200, 0)

    with pytest.raises(StoreError, match="already holds a run store"):
        _make(run)
    with pytest.raises(StoreError, match="not a matrix-hpc run directory"):
        RunStore.open(tmp_path)
    with pytest.raises(StoreError, match="no such run directory"):
        RunStore.open(tmp_path / "nope")
    with pytest.raises(StoreError, match="status must be"):
        w2.append("x#0", 0, 1, b"")
    with pytest.raises(StoreError, match="writer id"):
        store.writer("../evil")


def test_duplicates_keep_first_and_are_counted(tmp_path):
    store = _make(tmp_path / "run")
    a, b = store.writer("a"), store.writer("b")
    a.append("t#0", 0, DONE, b"first")
    a.flush()
    b.append("t#0", 0, FAILED, b"second")
    b.flush()
    assert store.committed() == {"t#0": DONE}
    assert list(store.iter_results()) == [b"first"]
    assert store.status()["duplicates"] == 1


def test_fingerprint_changes(tmp_path):
    store = _make(tmp_path / "run", fingerprint={"job": "1", "code": "2", "proto": "3"})
    assert store.fingerprint_changes({"job": "1", "code": "2", "proto": "3"}) == []
    assert store.fingerprint_changes({"job": "9", "code": "2", "dataset": "4"}) == ["dataset", "job", "proto"]
    assert json.loads((tmp_path / "run" / "fingerprint.json").read_text())["proto"] == "3"


def test_two_writer_processes_commit_at_once(tmp_path):
    run = tmp_path / "run"
    _make(run, total=12000)
    barrier = CTX.Barrier(2)
    procs = [_spawn(_child_write, run, wid, 6000, 250, barrier) for wid in ("n1", "n2")]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = RunStore.open(run)
    assert store.committed() == {**_expected("n1", 0, 6000), **_expected("n2", 0, 6000)}
    assert len(list(store.iter_results())) == 12000
    st = store.status()
    assert (st["committed"], st["pending"], st["writers"], st["torn_segments"]) == (12000, 0, 2, 0)


def test_sigkill_mid_flush_keeps_complete_commits(tmp_path):
    run = tmp_path / "run"
    _make(run)
    parent, child = CTX.Pipe()
    p = _spawn(_child_block_mid_flush, run, child, 2)
    assert parent.recv() == "chunks written, no commit record yet"
    _kill(p)
    store = RunStore.open(run)
    assert store.committed() == _expected("k", 0, 600)  # the torn third flush is ignored
    folder = run / "store.zarr" / "writers" / "k"
    assert (folder / "index" / "c.2.0").exists() and not (folder / "commits" / "c.2.0").exists()
    # the writer comes back after its last chunk; its rows of the torn flush are simply redone
    w = store.writer("k")
    assert w._next_seq == 3
    _append(w, "k", 600, 900)
    w.flush()
    assert store.committed() == _expected("k", 0, 900)
    assert sorted(store.iter_results()) == sorted(_env("k", i) for i in range(900))


def test_sigkill_at_an_arbitrary_moment(tmp_path):
    run = tmp_path / "run"
    _make(run)
    parent, child = CTX.Pipe()
    p = _spawn(_child_flush_forever, run, child)
    reported = 0
    while reported < 5:
        reported = parent.recv()
    _kill(p)  # lands wherever the child is: inside a flush, or between two
    store = RunStore.open(run)
    got = store.committed()
    flushes = len(got) // 200
    assert len(got) % 200 == 0 and flushes >= reported
    assert got == _expected("r", 0, flushes * 200)
    assert sorted(store.iter_results()) == sorted(_env("r", i) for i in range(flushes * 200))


def test_torn_chunks_and_records_are_ignored(tmp_path):
    run = tmp_path / "run"
    store = _make(run)
    w = store.writer("t")
    for f in range(5):  # five flushes of 100 rows: segments 0..4
        _append(w, "t", f * 100, (f + 1) * 100)
        w.flush()
    folder = run / "store.zarr" / "writers" / "t"
    heap_chunk = folder / "heap" / "c.1"  # segment 1 starts heap chunk 1 (each segment < 1 MiB)
    with open(heap_chunk, "r+b") as f:
        f.truncate(os.path.getsize(heap_chunk) // 2)
    (folder / "commits" / "c.2.0").unlink()  # a dropped commit record
    with open(folder / "index" / "c.3.0", "r+b") as f:  # a flipped byte: crc32c catches it
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    rec = folder / "commits" / "c.4.0"
    with open(rec, "r+b") as f:  # a torn commit record
        f.truncate(5)
    fresh = RunStore.open(run)
    assert fresh.committed() == _expected("t", 0, 100)
    assert sorted(fresh.iter_results()) == sorted(_env("t", i) for i in range(100))
    assert fresh.status()["torn_segments"] == 3  # the dropped record leaves nothing to count
    # a writer reopened over this mess appends after everything on disk
    w = fresh.writer("t")
    assert w._next_seq == 5 and w._heap_pos == 5 * layout.HEAP_CHUNK
    _append(w, "t", 100, 500)
    w.flush()
    assert fresh.committed() == _expected("t", 0, 500)


def test_snapshot_round_trip_and_retention(tmp_path):
    store = _make(tmp_path / "run")
    assert store.latest_snapshot() is None
    tasks = [os.urandom(i % 50) for i in range(1000)]
    store.write_snapshot(tasks, meta={"reason": "periodic", "step": 1})
    got, meta = store.latest_snapshot()
    assert got == tasks
    assert meta["reason"] == "periodic" and meta["n_tasks"] == 1000 and meta["time"].endswith("Z")
    store.write_snapshot([], meta={"reason": "empty"})
    assert store.latest_snapshot()[0] == []
    for i in range(4):
        store.write_snapshot([b"x" * i], meta={"i": i})
    snaps = sorted(p.name for p in (tmp_path / "run" / "store.zarr" / "snapshots").iterdir() if p.is_dir())
    assert len(snaps) == layout.SNAPSHOTS_KEPT
    assert store.latest_snapshot()[1]["i"] == 3
    # a torn chunk in the newest snapshot: the one before it is the latest
    newest = tmp_path / "run" / "store.zarr" / "snapshots" / snaps[-1] / "heap" / "c.0"
    newest.write_bytes(newest.read_bytes()[:3])
    assert store.latest_snapshot()[1]["i"] == 2


def test_snapshot_killed_mid_write_leaves_previous(tmp_path):
    run = tmp_path / "run"
    _make(run)
    parent, child = CTX.Pipe()
    p = _spawn(_child_snapshot_killed, run, child)
    assert parent.recv() == "arrays written, not marked complete"
    _kill(p)
    store = RunStore.open(run)
    tasks, meta = store.latest_snapshot()
    assert (tasks, meta["name"]) == ([b"a1", b"a2"], "A")
    assert store.status()["in_flight_at_last_checkpoint"] == 2
    store.write_snapshot([b"c"], meta={"name": "C"})
    assert store.latest_snapshot()[1]["name"] == "C"
    dirs = sorted(p.name for p in (run / "store.zarr" / "snapshots").iterdir() if p.is_dir())
    assert dirs == ["0000000001", "0000000003"]  # the incomplete one is gone


def test_status_while_a_writer_is_writing(tmp_path):
    run = tmp_path / "run"
    store = _make(run, total=30000)
    parent, child = CTX.Pipe()
    p = _spawn(_child_handshake_writer, run, child, 4)
    committed = 0
    for _ in range(4):
        assert parent.recv() == "mid-flush"
        st = store.status()  # chunks of this flush are on disk, its records are not
        assert st["committed"] == committed and st["torn_segments"] == 0
        parent.send("go on")
        msg, committed = parent.recv()
        assert store.status()["committed"] == committed
    last = committed
    while not parent.poll():  # free-running: every status is consistent and monotonic
        st = store.status()
        assert st["committed"] >= last and st["committed"] % 500 == 0
        last = st["committed"]
    assert parent.recv() == "done"
    p.join(30)
    st = store.status()
    assert (st["done"], st["failed"], st["pending"]) == (9600, 2400, 18000)
    assert st["throughput_rows_per_s"] > 0


def test_log_event(tmp_path):
    store = _make(tmp_path / "run")
    store.log_event("started", slurm_job="123")
    store.log_event("resumed", snapshot=4)
    ev = store.events()
    assert [e["kind"] for e in ev] == ["started", "resumed"] and ev[0]["slurm_job"] == "123"
    assert ev[1]["pid"] == os.getpid() and "time" in ev[1]


def test_record_must_match_its_rows(tmp_path):
    """A record whose rows checksum disagrees (e.g. two processes misusing one writer id) is ignored."""
    import zarr

    run = tmp_path / "run"
    store = _make(run)
    w = store.writer("c")
    for f in range(2):
        _append(w, "c", f * 10, (f + 1) * 10)
        w.flush()
    commits = zarr.open_array(run / "store.zarr" / "writers" / "c" / "commits", mode="r+")
    rec = commits[1]
    rec[layout.R_ROWS_CRC] ^= 1
    commits[1] = rec
    assert RunStore.open(run).committed() == _expected("c", 0, 10)


def test_direct_chunk_decoding_matches_zarr(tmp_path):
    store = _make(tmp_path / "run")
    w = store.writer("z")
    for f in range(3):
        _append(w, "z", f * 50, (f + 1) * 50)
        w.flush()
    v = store._segments.view("z")
    for name in ("commits", "index", "ids"):
        arr = getattr(v, name)
        assert chunks.fast_readable(arr)
        fast = chunks.read_chunks(arr, [0, 1, 2], v.folder / name)
        slow = chunks.read_chunks(arr, [0, 1, 2])  # through zarr
        for s in range(3):
            assert (fast[s] == slow[s]).all()
    (v.folder / "index" / "c.1.0").write_bytes(b"torn")
    assert chunks.read_chunks(v.index, [0, 1, 2], v.folder / "index")[1] is None
    assert chunks.read_chunks(v.index, [0, 1, 2])[1] is None
    assert chunks.read_chunks(v.index, [0, 1, 2])[2] is not None


def test_set_total_tasks_and_flush_from_an_event_loop(tmp_path):
    import asyncio

    store = _make(tmp_path / "run", total=10)
    store.set_total_tasks(25)
    assert RunStore.open(tmp_path / "run").total_tasks == 25

    async def sink():  # a Ray async actor calls flush from inside its own event loop
        w = store.writer("async")
        _append(w, "async", 0, 5)
        w.flush()
        _append(w, "async", 5, 10)
        await asyncio.to_thread(w.flush)

    asyncio.run(sink())
    assert store.committed() == _expected("async", 0, 10)
    assert store.status()["pending"] == 15


def test_heap_damaged_in_place_fails_export_clearly(tmp_path):
    store = _make(tmp_path / "run")
    w = store.writer("h")
    _append(w, "h", 0, 20)
    w.flush()
    chunk = tmp_path / "run" / "store.zarr" / "writers" / "h" / "heap" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the crc32c codec can tell
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged.*remove .*c.0.0"):
        list(RunStore.open(tmp_path / "run").iter_results())
    st = RunStore.open(tmp_path / "run").status()  # the totals still show, and say what is damaged
    assert st["committed"] == 20 and st["steps_by_role"] == {} and "remove" in st["damaged"]
