"""Sub-command ``export`` of ``matrix-hpc``, and the lines ``status`` shows for a store (the ``status``
command itself is registered by ``slurm/cli.py``, which adds the Slurm job's state)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's results as JSONL or Parquet (works while the run goes on)",
        description="Write the committed results of a run as one JSON object per row (the payload's "
        "proto fields, plus task_id, row_id, row_index, trial, retries), ready for Hugging Face `datasets`. "
        "Rows still in flight are not included; run it again later for more.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory (holds store.zarr)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                   help="output format (default: jsonl)")
    p.add_argument("--failed", action="store_true",
                   help="export the failed rows instead (each with its error: role, message, traceback)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="output file (default: RUN_DIR/results.<format>, or RUN_DIR/failed.<format>)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from matrix_hpc.store.export import export
    from matrix_hpc.store.run_store import StoreError

    out = args.out or args.run_dir / f"{'failed' if args.failed else 'results'}.{args.format}"
    try:
        n = export(args.run_dir, out, format=args.format, failed=args.failed)
    except StoreError as e:
        print(f"matrix-hpc export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} {'failed ' if args.failed else ''}row(s) to {out}")
    return 0


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def status_lines(st: dict) -> list[str]:
    """``RunStore.status()`` as the lines of ``matrix-hpc status``."""
    total = st["total"] or 0
    pct = f" ({100 * st['committed'] / total:.1f}%)" if total else ""
    rows = [
        ("run", st["run_dir"]),
        ("payload", st["payload_type"]),
        ("total", _fmt(st["total"])),
        ("done", _fmt(st["done"])),
        ("failed", _fmt(st["failed"])),
        ("committed", f"{_fmt(st['committed'])}{pct}"),
        ("pending", f"{_fmt(st['pending'])}  (in flight at the last checkpoint: "
                    f"{_fmt(st['in_flight_at_last_checkpoint'])})"),
        ("checkpoint", f"last at {_fmt(st['last_checkpoint_time'])}"),
        ("commits", f"first {_fmt(st['first_commit_time'])}, last {_fmt(st['last_commit_time'])}, "
                    f"{st['writers']} writer(s)"),
        ("steps", ", ".join(f"{role} {n:,}" for role, n in st["steps_by_role"].items()) or "-"),
        ("retries", _fmt(st["retries"])),
        ("throughput", f"{_fmt(st['throughput_rows_per_s'], ' rows/s')} over {_fmt(st['processing_s'], 's')} of "
                       f"processing, {_fmt(st['recent_rows_per_s'], ' rows/s')} over the last minute of commits"),
    ]
    if st["duplicates"]:
        rows.append(("warning", f"{st['duplicates']} row(s) committed twice (the first is kept)"))
    if st["damaged"]:
        rows.append(("warning", f"steps and retries not counted: {st['damaged']}"))
    if st["unreadable_envelopes"]:
        rows.append(("warning", f"{st['unreadable_envelopes']} committed row(s) are not readable task messages"))
    if st["torn_segments"]:
        rows.append(("note", f"{st['torn_segments']} torn commit(s) ignored (their rows are redone on resume)"))
    return [f"{k:<11} {v}" for k, v in rows]
