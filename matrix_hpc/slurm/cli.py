"""Sub-commands ``submit``, ``sbatch-script``, ``cancel``, ``logs``, and the two that serve every run
directory whichever way it runs, which only this top layer can (it sees the runtime, the store and
Slurm): ``resume`` (here, or submitted again) and ``status`` (the store's totals and the Slurm job)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from matrix_hpc.job.yamlpos import JobFileError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "submit", help="submit a job to Slurm (submitit): Ray across the allocation, requeue on preemption",
        description="Create the run directory and submit the run to Slurm. The job file's slurm: section sets "
        "the allocation; the options below override it. Prints the Slurm job id and returns. Preemption and the "
        "time limit checkpoint the tasks in flight and requeue the job, which resumes from the run directory.")
    s.add_argument("job", type=Path, help="the job file, e.g. jobs/dialogue/job.yaml")
    s.add_argument("-o", "--run-dir", type=Path, help="run directory (default: run.output_dir of the job)")
    _slurm_overrides(s)
    s.add_argument("--dry-run", action="store_true",
                   help="run every check (paths, limits, sbatch --test-only), print the sbatch script, submit nothing")
    s.add_argument("--force", action="store_true", help="resume even if the job, code, proto or data changed")
    s.add_argument("--ray-worker-args", default="", metavar="ARGS",
                   help="extra `ray start` options for the nodes other than the first (one shell-quoted string)")
    s.set_defaults(func=_submit)

    b = sub.add_parser(
        "sbatch-script", help="write a standalone sbatch script for the job (to run `sbatch` yourself)",
        description="Write an sbatch script that runs the job the way `submit` does (srun, one task per node, "
        "requeue on USR2), without submitit's pickle. Submit it with `sbatch FILE`.")
    b.add_argument("job", type=Path)
    b.add_argument("-o", "--run-dir", type=Path, help="run directory (default: run.output_dir of the job)")
    b.add_argument("--output", type=Path, help="write the script here (default: print it)")
    _slurm_overrides(b)
    b.set_defaults(func=_sbatch_script)

    c = sub.add_parser("cancel", help="stop a Slurm run: checkpoint its tasks in flight, then cancel the job",
                       description="Ask the run to checkpoint and stop (USR2, no requeue), wait for it, then scancel "
                       "whatever is left. Continue later with `matrix-hpc resume RUN_DIR`.")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--timeout", type=float, default=120, help="seconds to wait for the checkpoint (default 120)")
    c.set_defaults(func=_cancel)

    g = sub.add_parser("logs", help="print a Slurm run's log of one node",
                       description="Print the log of node N (0: the Ray head and the driver) of the run's latest job.")
    g.add_argument("run_dir", type=Path)
    g.add_argument("--node", type=int, default=0, help="node rank in the allocation (default 0)")
    g.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows (Ctrl-C to stop)")
    g.set_defaults(func=_logs)

    _register_resume(sub)
    _register_status(sub)


def _register_resume(sub: argparse._SubParsersAction) -> None:
    from matrix_hpc.runtime.cli import EXIT_CODES, add_run_options

    r = sub.add_parser(
        "resume",
        help="resume a stopped, preempted or crashed run from its run directory",
        description="Resume RUN_DIR with the job file recorded in it (or --job): committed rows are skipped, "
        "in-flight tasks continue from their last checkpoint, the other rows start fresh. A run that was "
        "submitted to Slurm is submitted again with the same settings (matrix-hpc submit); any other runs "
        "here. Refused while another run holds RUN_DIR; a complete run is never run or submitted again. "
        + EXIT_CODES)
    r.add_argument("run_dir", type=Path, help="a run directory made by `matrix-hpc run` or `matrix-hpc submit`")
    r.add_argument("--job", type=Path, help="job file to use (default: the job folder recorded at start)")
    add_run_options(r)
    r.set_defaults(func=_resume)


def _register_status(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "status",
        help="show a run's progress: done, failed, in flight, pending, throughput (and its Slurm job)",
        description="Show the totals of a run (done, failed, in flight at the last checkpoint, "
        "pending), the steps by role and the retries in its committed tasks, its throughput and the "
        "time of its last checkpoint, and for a run on Slurm its job's state. Read-only: safe to run "
        "while the run is going on, from any node that sees the run directory.",
    )
    s.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory (holds store.zarr)")
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")
    s.set_defaults(func=_status)


def _slurm_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm overrides (win over the job file's slurm: section)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--cpus-per-node", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--time-min", type=int)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclusive", action="store_true", default=None)
    g.add_argument("--max-requeues", type=int)
    g.add_argument("--nodes-timeout-s", type=float, default=300.0, help="deadline for every node to join Ray")


_OVERRIDES = ("nodes", "gpus_per_node", "cpus_per_node", "mem_gb", "time_min", "partition", "account", "qos",
              "constraint", "exclusive", "max_requeues")


def _load(args: argparse.Namespace):
    from pydantic import ValidationError

    from matrix_hpc.job.load import load_job
    from matrix_hpc.slurm.submit import slurm_settings

    job = load_job(args.job, run_dir=args.run_dir)
    try:
        spec = slurm_settings(job.spec.slurm, {k: getattr(args, k) for k in _OVERRIDES})
    except ValidationError as e:
        raise JobFileError(f"command-line slurm override: {e}") from None
    return job, spec


def _submit(args: argparse.Namespace) -> int:
    from matrix_hpc.runtime.preflight import PreflightError, check_prerequisites, check_slurm_commands
    from matrix_hpc.slurm.submit import SubmitError, preflight

    try:
        job, spec = _load(args)
        if args.dry_run:  # every check, nothing written or submitted
            check_slurm_commands()
            check_prerequisites(job, local=False)
            print(preflight(job, spec))
            return 0
    except (JobFileError, SubmitError, PreflightError) as e:
        print(f"matrix-hpc submit: error: {e}", file=sys.stderr)
        return 2
    return _submit_checked(job, spec, "submit", force=args.force, nodes_timeout_s=args.nodes_timeout_s,
                           ray_worker_args=shlex.split(args.ray_worker_args))


def _submit_checked(job, spec, command: str, *, force: bool, nodes_timeout_s: float,
                    ray_worker_args: list[str]) -> int:
    """The checks of a run before Ray (job changed, already complete: never submitted again), then submit."""
    from matrix_hpc.runtime.preflight import (
        PreflightError,
        ResumeRefused,
        check_prerequisites,
        check_slurm_commands,
        preflight,
    )
    from matrix_hpc.runtime.security import CredentialError, RunDirRefused
    from matrix_hpc.slurm.submit import SubmitError, submit

    try:
        check_slurm_commands()
        check_prerequisites(job, local=False)  # before anything reaches Slurm; the nodes' binaries are theirs
        nothing_to_do = preflight(job, force=force)
        if nothing_to_do:
            print(nothing_to_do)
            return 0
        done = submit(job, spec, force=force, nodes_timeout_s=nodes_timeout_s, ray_worker_args=ray_worker_args)
    except (SubmitError, PreflightError, ResumeRefused, RunDirRefused, CredentialError) as e:
        print(f"matrix-hpc {command}: error: {e}", file=sys.stderr)
        return 2
    if command == "resume":
        print(f"resubmitted {done.run_dir} as Slurm job {done.job_id}")
        return 0
    print(f"submitted Slurm job {done.job_id}\nrun directory: {done.run_dir}\n"
          f"  matrix-hpc status {done.run_dir}\n  matrix-hpc logs {done.run_dir} --follow\n"
          f"  matrix-hpc cancel {done.run_dir}")
    return 0


def _sbatch_script(args: argparse.Namespace) -> int:
    from matrix_hpc.slurm.submit import SubmitError, preflight, standalone_sbatch_text, write_options

    try:
        job, spec = _load(args)
        preflight(job, spec)
    except (JobFileError, SubmitError) as e:
        print(f"matrix-hpc sbatch-script: error: {e}", file=sys.stderr)
        return 2
    # The job records its id in the run directory when it starts (entry.py): status, logs, cancel and
    # resume then treat it as one from `submit`; resume submits it with these settings.
    write_options(job, spec, nodes_timeout_s=args.nodes_timeout_s)  # the run record: status, logs, cancel, resume
    text = standalone_sbatch_text(job, spec)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}; submit it with: sbatch {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def _exists(run_dir: Path) -> None:
    if not run_dir.is_dir():  # in the words of every other command
        raise FileNotFoundError(f"{run_dir}: no such run directory")


def _cancel(args: argparse.Namespace) -> int:
    from matrix_hpc.slurm.status import cancel

    try:
        _exists(args.run_dir)
        print(cancel(args.run_dir, timeout=args.timeout))
    except FileNotFoundError as e:
        print(f"matrix-hpc cancel: error: {e}", file=sys.stderr)
        return 2
    return 0


def _logs(args: argparse.Namespace) -> int:
    from matrix_hpc.slurm.status import node_logs

    try:
        _exists(args.run_dir)
        paths = node_logs(args.run_dir, args.node)
    except FileNotFoundError as e:
        print(f"matrix-hpc logs: error: {e}", file=sys.stderr)
        return 2
    if not args.follow:
        for p in paths:
            sys.stdout.write(p.read_text(errors="replace"))
        return 0
    argv = ["tail", "-n", "+1", "-F", *map(str, paths)]
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 0


def _status(args: argparse.Namespace) -> int:
    """The store's totals, plus the Slurm job's state and the per-node view for a run on Slurm (which
    has no store while pending)."""
    from matrix_hpc.runtime.nodes import describe, read_node_view
    from matrix_hpc.slurm.status import slurm_state
    from matrix_hpc.store.cli import status_lines
    from matrix_hpc.store.run_store import RunStore, StoreError

    state = slurm_state(args.run_dir)
    try:
        totals: dict | None = RunStore.open(args.run_dir).status()
    except StoreError as e:
        if state is None:
            print(f"matrix-hpc status: error: {e}", file=sys.stderr)
            return 2
        totals = None
    if args.json:
        shown = totals if state is None else {**(totals or {"store": "not created yet"}), "slurm": state,
                                               "nodes": read_node_view(args.run_dir)}
        print(json.dumps(shown, indent=2))
        return 0
    print("\n".join(status_lines(totals)) if totals else "store       not created yet (the job has not started)")
    if state is not None:
        where = f" on {state['nodes']}" if state.get("nodes") and state["nodes"] != "(null)" else ""
        reason = f" ({state['reason']})" if state.get("reason") not in (None, "", "None") else ""
        print(f"slurm       job {state['job_id']} {state['state'].lower()}{reason}{where}; "
              f"requeued {state['requeues']} time(s)")
        for line in describe(read_node_view(args.run_dir)):
            print(f"            {line}")
    return 0


def _resume(args: argparse.Namespace) -> int:
    """Resume a run where it ran: submitted again with its recorded Slurm settings if it was submitted,
    here otherwise. Either way the same checks come first (job changed without --force, already
    complete, held by another live run)."""
    from matrix_hpc.rundir import RunDir
    from matrix_hpc.runtime.cli import execute, recorded_job

    try:
        job_path = args.job or recorded_job(args.run_dir)  # the words `status` uses for a missing directory
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = RunDir(args.run_dir).record()
    if record.slurm is None:
        return execute(job_path, args.run_dir, args, command="resume")
    from matrix_hpc.job.load import load_job
    from matrix_hpc.job.spec import SlurmSpec
    from matrix_hpc.rundir.holder import RunDirHeld

    try:
        RunDir(args.run_dir).refuse_if_held()  # at once, before the job is loaded
        job = load_job(job_path, run_dir=args.run_dir)
    except (JobFileError, RunDirHeld) as e:
        print(f"matrix-hpc resume: error: {e}", file=sys.stderr)
        return 2
    return _submit_checked(job, SlurmSpec.model_validate(record.slurm), "resume", force=args.force,
                           nodes_timeout_s=record.options.get("nodes_timeout_s", 300.0),
                           ray_worker_args=record.options.get("ray_worker_args", []))
