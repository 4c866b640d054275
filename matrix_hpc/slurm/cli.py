"""Sub-commands ``submit``, ``sbatch-script``, ``cancel``, ``logs``; the Slurm side of ``status`` and ``resume``."""

from __future__ import annotations

import argparse
import contextlib
import io
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
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
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

    _wrap(sub, "status", _status_with_slurm)
    _wrap(sub, "resume", _resume_on_slurm)


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


def _wrap(sub: argparse._SubParsersAction, name: str, wrapper) -> None:
    """Give an existing sub-command a Slurm side without that concern knowing about Slurm."""
    parser = sub.choices[name]
    inner = parser.get_default("func")
    parser.set_defaults(func=lambda args: wrapper(args, inner))


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
    from matrix_hpc.slurm.submit import SubmitError, sbatch_text, submit

    try:
        job, spec = _load(args)
        if args.dry_run:
            print(sbatch_text(job, spec))
            return 0
        check_slurm_commands()
        check_prerequisites(job, local=False)  # before anything reaches Slurm; the nodes' binaries are theirs
        done = submit(job, spec, nodes_timeout_s=args.nodes_timeout_s,
                      ray_worker_args=shlex.split(args.ray_worker_args))
    except (JobFileError, SubmitError, PreflightError) as e:
        print(f"matrix-hpc submit: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted Slurm job {done.job_id}\nrun directory: {done.run_dir}\n"
          f"  matrix-hpc status {done.run_dir}\n  matrix-hpc logs {done.run_dir} --follow\n"
          f"  matrix-hpc cancel {done.run_dir}")
    return 0


def _sbatch_script(args: argparse.Namespace) -> int:
    from matrix_hpc.slurm.submit import SubmitError, check_shared_paths, standalone_sbatch_text, write_options

    try:
        job, spec = _load(args)
        check_shared_paths(job, spec)
    except (JobFileError, SubmitError) as e:
        print(f"matrix-hpc sbatch-script: error: {e}", file=sys.stderr)
        return 2
    write_options(job, spec, nodes_timeout_s=args.nodes_timeout_s)
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


def _status_with_slurm(args: argparse.Namespace, inner) -> int:
    """Today's totals plus the Slurm job's state; a run still pending in Slurm has no store yet."""
    from matrix_hpc.slurm.status import slurm_state

    state = slurm_state(args.run_dir)
    if state is None:
        return inner(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inner(args)
    if getattr(args, "json", False):
        totals = json.loads(out.getvalue()) if code == 0 else {"store": "not created yet"}
        print(json.dumps({**totals, "slurm": state}, indent=2))
        return 0
    if code == 0:
        print(out.getvalue(), end="")
    else:
        print("store       not created yet (the job has not started)")
    where = f" on {state['nodes']}" if state.get("nodes") and state["nodes"] != "(null)" else ""
    reason = f" ({state['reason']})" if state.get("reason") not in (None, "", "None") else ""
    print(f"slurm       job {state['job_id']} {state['state'].lower()}{reason}{where}; "
          f"requeued {state['requeues']} time(s)")
    return 0


def _resume_on_slurm(args: argparse.Namespace, inner) -> int:
    """A run that was submitted to Slurm is resumed by submitting it again with the same settings."""
    from matrix_hpc.job.load import load_job
    from matrix_hpc.job.spec import SlurmSpec
    from matrix_hpc.slurm.submit import SubmitError, submit

    record_path = args.run_dir / "slurm" / "submit.json"
    if not record_path.exists():
        return inner(args)
    record = json.loads(record_path.read_text())
    try:
        job = load_job(args.job or Path(record["job"]), run_dir=args.run_dir)
        done = submit(job, SlurmSpec.model_validate(record["slurm"]),
                      nodes_timeout_s=record["options"]["nodes_timeout_s"],
                      ray_worker_args=record["options"].get("ray_worker_args"))
    except (JobFileError, SubmitError) as e:
        print(f"matrix-hpc resume: error: {e}", file=sys.stderr)
        return 2
    print(f"resubmitted {args.run_dir} as Slurm job {done.job_id}")
    return 0

