"""Checks made before Ray starts: each answers in a second instead of after Ray and the services
have started (an LLM engine takes a minute).

What the run needs and this user cannot reach (a model, an image, the cache, the run directory,
Slurm's commands) is one line per problem, each naming its fix (PreflightError; exit status 2). A
resume of a changed job is refused, and a run that is already complete says so. A run directory
whose earlier start failed before any task was committed or saved is started afresh.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc.job.dataset_checks import save_digest
from matrix_hpc.job.load import Job
from matrix_hpc.paths import describe_owner
from matrix_hpc.runtime.security import prepare_run_dir
from matrix_hpc.runtime.summary import Exit
from matrix_hpc.services import service_package, spec_class
from matrix_hpc.store import RunStore, StoreError
from matrix_hpc.store.layout import STORE_NAME

SLURM_COMMANDS = ("sbatch", "squeue", "scontrol", "sacct", "scancel")


class ResumeRefused(Exception):
    """The run directory belongs to a different job (its fingerprint changed)."""


class PreflightError(Exception):
    """What the run needs is missing or out of reach: one line per problem, each naming its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\nerror: ".join(problems))  # printed after "error: ", one problem a line


def refuse_if_changed(store: RunStore, job: Job, *, force: bool) -> None:
    changed = store.fingerprint_changes(job.fingerprint)
    if changed and not force:
        raise ResumeRefused(
            f"{job.run_dir} was made by a different job: changed since: {', '.join(changed)}. "
            "Use another output directory, or --force to resume anyway."
        )


@dataclass
class Complete:
    """Nothing to run: what to say, and the exit status the run directory's contents deserve."""

    message: str
    exit_status: int


def open_started(job: Job) -> RunStore | None:
    """The run directory's store, or None for a fresh run: where there is none, and where there is one
    in which no task was committed or saved (its start failed): that one is removed, whatever changed."""
    try:
        store = RunStore.open(job.run_dir)
    except StoreError:
        return None
    if store.committed() or store.latest_snapshot() is not None:
        return store
    if store.fingerprint_changes(job.fingerprint):
        doomed = job.run_dir / f".{STORE_NAME}.unstarted-{os.getpid()}"
        (job.run_dir / STORE_NAME).rename(doomed)  # atomic: the store is there whole, or not at all
        shutil.rmtree(doomed)
        return None
    return store


def check_prerequisites(job: Job, *, local: bool = True) -> None:
    """Raise PreflightError listing what this user lacks to run ``job``: a writable run directory, and
    what each service needs (its ``check_ready``: model, image, cache; ``local``: binaries here)."""
    problems = [p for p in (_run_dir_problem(job.run_dir),) if p]
    for kind, entries in job.spec.services.items():
        pkg = service_package(kind)
        check = getattr(pkg, "check_ready", None)
        for name, settings in (entries or {}).items():
            if check is None:
                continue
            try:
                check(spec_class(kind).model_validate(settings or {}), job.dir, local=local)
            except pkg.ServiceError as e:
                problems.append(f"services.{kind}.{name}: {e}")
    if problems:
        raise PreflightError(problems)


def check_slurm_commands() -> None:
    """Raise PreflightError if Slurm's commands that ``submit`` and its follow-ups call are not on PATH."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise PreflightError([f"Slurm's {', '.join(missing)} not found on PATH: run `matrix-hpc submit` on a "
                              "Slurm login node, or add Slurm's bin folder to PATH (`matrix-hpc run JOB` needs "
                              "no Slurm)"])


def _run_dir_problem(run_dir: Path) -> str | None:
    existing = run_dir
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    if existing == run_dir:
        what = f"the run directory {run_dir} is not writable by you ({describe_owner(run_dir)})"
    else:
        what = (f"the run directory {run_dir} cannot be made: {existing} is not writable by you "
                f"({describe_owner(existing)})")
    return f"{what}: choose a folder of your own with -o DIR (or run.output_dir in the job file)"


def preflight(job: Job, *, force: bool) -> Complete | None:
    """Check ``job.run_dir`` before a run; return why there is nothing to run, or None to go on.

    Raises PreflightError if something the run needs is missing or out of reach, ResumeRefused if the run
    directory holds a run of a different job, RunDirRefused if other users could write to it (see
    ``runtime.security``).
    """
    check_prerequisites(job)
    prepare_run_dir(job.run_dir)  # owner-only; refused if others can write to it
    save_digest(job.run_dir)  # the dataset digest, so that a resume re-reads nothing
    store = open_started(job)
    if store is None:
        return None  # a fresh run
    refuse_if_changed(store, job, force=force)
    status = store.status()
    if status["pending"] > 0:
        return None
    exit_status = Exit.of_contents(status["failed"], status["total"], job.spec.run.max_failed_fraction)
    failed = ""
    if exit_status != Exit.OK:
        failed = (f"more failed tasks than run.max_failed_fraction ({job.spec.run.max_failed_fraction:g}) allows; "
                  f"failed rows: matrix-hpc export {job.run_dir} --failed; run them again from their dataset "
                  f"rows: matrix-hpc rerun {job.run_dir} -o NEW_RUN_DIR\n")
    return Complete(f"{job.run_dir}: this run is already complete: {status['done']} done, {status['failed']} "
                    f"failed of {status['total']} tasks; nothing to run.\n{failed}"
                    f"export: matrix-hpc export {job.run_dir} --format jsonl\nexit status: {exit_status}",
                    exit_status)
