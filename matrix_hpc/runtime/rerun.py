"""Sub-command ``rerun``: run a run's failed tasks again, from their dataset rows, in a new run
directory (``job/selection.py``). The failed payloads are not reused: each task starts fresh from
its row as the dataset has it now (a fixed line included), with no attempt or step carried over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matrix_hpc.runtime.summary import Exit


def register(sub: argparse._SubParsersAction) -> None:
    from matrix_hpc.runtime.cli import EXIT_CODES, add_run_options

    p = sub.add_parser(
        "rerun",
        help="run the failed tasks of a run again, from their dataset rows, into a new run directory",
        description="Run every failed task of RUN_DIR again in NEW_RUN_DIR, each built fresh from its dataset "
        "row (found by its row index; a line fixed since is read as it is now), with the job file of RUN_DIR "
        "(or --job, e.g. with fixed agents). RUN_DIR is left as it is. NEW_RUN_DIR is an ordinary run directory "
        "of those tasks only: `status`, `export` and `resume` work on it. Refused if the dataset changed since "
        "RUN_DIR ran (rows might have moved), unless --force. " + EXIT_CODES,
    )
    p.add_argument("run_dir", type=Path, help="the run directory whose failed tasks to run again")
    p.add_argument("-o", "--run-dir", dest="new_run_dir", type=Path, required=True,
                   help="the new run directory for them")
    p.add_argument("--job", type=Path, help="job file to use (default: the one RUN_DIR was run with)")
    add_run_options(p)
    p.set_defaults(func=_rerun)


def failed_rows(run_dir: Path) -> frozenset[tuple[int, int]]:
    """(row index, trial) of every failed task of ``run_dir``."""
    from matrix_hpc._gen.v1 import task_pb2
    from matrix_hpc.store import FAILED, RunStore

    store = RunStore.open(run_dir)
    return frozenset((t.row_index, t.trial) for t in map(task_pb2.Task.FromString, store.iter_results(status=FAILED)))


def _rerun(args: argparse.Namespace) -> int:
    from matrix_hpc.job.load import load_job
    from matrix_hpc.job.selection import rerun_origin, write_selection
    from matrix_hpc.job.yamlpos import JobFileError
    from matrix_hpc.runtime.cli import execute, recorded_job
    from matrix_hpc.runtime.security import CredentialError, RunDirRefused, prepare_run_dir
    from matrix_hpc.store import RunStore, StoreError

    origin, new = args.run_dir.resolve(), args.new_run_dir.resolve()
    try:
        rows = failed_rows(args.run_dir)
        job_path = args.job or recorded_job(args.run_dir)
        if not rows:
            print(f"{origin}: no failed tasks; nothing to rerun")
            return Exit.OK
        if new == origin:
            raise RunDirRefused("rerun into a new run directory: -o must differ from RUN_DIR")
        previous = rerun_origin(new) if new.is_dir() else None
        if new.is_dir() and any(new.iterdir()) and previous != str(origin):
            raise RunDirRefused(f"{new} is not empty and not a rerun of {origin}; choose a new run directory")
        job = load_job(job_path, run_dir=new)
        changed = RunStore.open(origin).fingerprint_changes(job.fingerprint)
        if "dataset" in changed and not args.force:
            raise RunDirRefused(f"the dataset changed since {origin} ran; its failed tasks are found by row index, "
                                "so rows that moved would be wrong: --force if the rows kept their places "
                                "(a line fixed in place)")
        prepare_run_dir(new)
        if previous is None:
            write_selection(new, origin, rows)
    except (StoreError, JobFileError, RunDirRefused, CredentialError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return Exit.USAGE
    print(f"rerunning {len(rows)} failed task(s) of {origin} in {new}", file=sys.stderr)
    return execute(job_path, new, args)
