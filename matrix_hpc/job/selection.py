"""A run directory that reruns some rows of another run (``matrix-hpc rerun``).

``RUN_DIR/rerun.json`` names the run the rows come from and the (row index, trial) of each task
to run again. The loader reads it, so a rerun directory resumes like any other: its tasks are
those rows only, built fresh from the dataset (not from the failed payloads).
"""

from __future__ import annotations

import json
from pathlib import Path

RERUN_FILE = "rerun.json"

Selection = frozenset[tuple[int, int]]  # (row index, trial)


def read_selection(run_dir: Path) -> Selection | None:
    """The rows a rerun directory runs, or None for an ordinary run (every row)."""
    path = run_dir / RERUN_FILE
    if not path.is_file():
        return None
    return frozenset((int(i), int(t)) for i, t in json.loads(path.read_text())["rows"])


def rerun_origin(run_dir: Path) -> str | None:
    path = run_dir / RERUN_FILE
    return json.loads(path.read_text())["of"] if path.is_file() else None


def write_selection(run_dir: Path, origin: Path, rows: Selection) -> None:
    tmp = run_dir / f".{RERUN_FILE}.tmp"
    tmp.write_text(json.dumps({"of": str(origin), "rows": sorted(rows)}) + "\n")
    tmp.replace(run_dir / RERUN_FILE)
