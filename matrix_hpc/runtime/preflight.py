"""Checks on the run directory that need no Ray, made before Ray starts.

A resume of a changed job is refused, and a run that is already complete says so, in a
second instead of after Ray and the services have started.
"""

from __future__ import annotations

from matrix_hpc.job.dataset_checks import save_digest
from matrix_hpc.job.load import Job
from matrix_hpc.runtime.security import prepare_run_dir
from matrix_hpc.store import RunStore, StoreError


class ResumeRefused(Exception):
    """The run directory belongs to a different job (its fingerprint changed)."""


def refuse_if_changed(store: RunStore, job: Job, *, force: bool) -> None:
    changed = store.fingerprint_changes(job.fingerprint)
    if changed and not force:
        raise ResumeRefused(
            f"{job.run_dir} was made by a different job: changed since: {', '.join(changed)}. "
            "Use another output directory, or --force to resume anyway."
        )


def preflight(job: Job, *, force: bool) -> str | None:
    """Check ``job.run_dir`` before a run; return why there is nothing to run, or None to go on.

    Raises ResumeRefused if the run directory holds a run of a different job, RunDirRefused if other
    users could write to it (see ``runtime.security``).
    """
    prepare_run_dir(job.run_dir)  # owner-only; refused if others can write to it
    save_digest(job.run_dir)  # the dataset digest, so that a resume re-reads nothing
    try:
        store = RunStore.open(job.run_dir)
    except StoreError:
        return None  # a fresh run
    refuse_if_changed(store, job, force=force)
    status = store.status()
    if status["pending"] > 0:
        return None
    return (f"{job.run_dir}: this run is already complete: {status['done']} done, {status['failed']} failed "
            f"of {status['total']} tasks; nothing to run.\n"
            f"export: matrix-hpc export {job.run_dir} --format jsonl")
