"""Sub-command ``run``, and ``execute``: a run on this machine, which ``resume`` uses too (slurm/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matrix_hpc.job.yamlpos import JobFileError
from matrix_hpc.runtime.summary import Exit

EXIT_CODES = (f"exit status (it follows the run directory's contents, whichever command ran and however often): "
              f"{Exit.OK} every task done (or failures within run.max_failed_fraction); "
              f"{Exit.USAGE} a bad job file, a refused resume, a run directory another live run holds, or something "
              f"the run needs that is missing or out of reach (one line each, with its fix); {Exit.TASKS_FAILED} the "
              f"run ended with more failed tasks than run.max_failed_fraction allows (see `matrix-hpc export RUN_DIR "
              f"--failed`; `matrix-hpc rerun RUN_DIR -o NEW_RUN_DIR` runs them again); "
              f"{Exit.STOPPED} stopped by a fault such as a full disk (fix it, then `matrix-hpc resume RUN_DIR`); "
              f"{Exit.INTERRUPTED} interrupted by Ctrl-C, SIGTERM or SIGHUP after a checkpoint "
              f"(`matrix-hpc resume RUN_DIR`); {Exit.ERROR} an unexpected error.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a job on a local Ray (or the cluster in RAY_ADDRESS)",
        description="Run every dataset row of a job through its agents and commit the results to the run "
        "directory. If the run directory already holds a run of this job, it is resumed: committed rows "
        "are skipped and tasks saved at the last checkpoint continue from the step they had reached. "
        "The run is private: its run directory is owner-only (one that other users can write to is refused), "
        "its services need the secret in RUN_DIR/credentials/, and a local Ray listens on 127.0.0.1 only, "
        "with token authentication (docs/security.md). " + EXIT_CODES,
    )
    p.add_argument("job", type=Path, help="the job file, e.g. jobs/dialogue/job.yaml")
    p.add_argument("-o", "--run-dir", type=Path, help="run directory (default: run.output_dir of the job)")
    add_run_options(p)
    p.set_defaults(func=_run)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a run on this machine (``run``, and ``resume`` of a run that was not submitted)."""
    p.add_argument("--force", action="store_true", help="resume even if the job, code, proto or data changed")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def recorded_job(run_dir: Path) -> Path:
    """The job file a run directory was run with; FileNotFoundError in the words `status` uses."""
    from matrix_hpc.rundir import RunDir

    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    job_path = RunDir(run_dir).record().job_path
    if job_path is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory made by `matrix-hpc run` "
                                "(no recorded job file); pass --job")
    return job_path


def _run(args: argparse.Namespace) -> int:
    return execute(args.job, args.run_dir, args)


def execute(job_path: Path, run_dir: Path | None, args: argparse.Namespace, command: str = "run") -> int:
    """Run (or resume) a job on this machine; ``args`` has the options of ``add_run_options``. Refused
    (exit 2) at once if another run holds the run directory."""
    from matrix_hpc.job.load import load_job
    from matrix_hpc.rundir import RunDir
    from matrix_hpc.rundir.holder import RunDirHeld
    from matrix_hpc.runtime.driver import run
    from matrix_hpc.runtime.preflight import PreflightError, ResumeRefused, preflight
    from matrix_hpc.runtime.recovery import ActorsLost
    from matrix_hpc.runtime.security import CredentialError, RunDirRefused

    try:
        if run_dir is not None:
            RunDir(run_dir).refuse_if_held()  # at once, before the job is loaded
        job = load_job(job_path, run_dir=run_dir)
        nothing_to_do = preflight(job, force=args.force)  # before Ray starts
    except (JobFileError, PreflightError, ResumeRefused, RunDirRefused, CredentialError, RunDirHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if nothing_to_do:
        print(nothing_to_do.message)
        return nothing_to_do.exit_status
    if job.unfilled_fields and not (job.run_dir / "store.zarr").exists():  # said once, for a new run
        print(f"note: payload fields that no dataset column fills (left to the agents): "
              f"{', '.join(job.unfilled_fields)}", file=sys.stderr)
    try:
        with RunDir(job.run_dir).hold(command):  # before Ray starts; run() holds it on (the same hold)
            summary = run(job, force=args.force, progress=not args.no_progress)
    except (ResumeRefused, RunDirRefused, CredentialError, RunDirHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return Exit.USAGE
    except ActorsLost as e:
        print(f"stopped: {e}\ncommitted rows are kept; tasks in flight restart from the last checkpoint: "
              f"matrix-hpc resume {job.run_dir}", file=sys.stderr)
        return Exit.STOPPED
    _print_summary(summary, as_json=args.json, simulated=simulated_llms(job))
    return summary.exit_status


def simulated_llms(job) -> list[str]:
    """The job's LLM services that are the ``sim`` backend: a simulated engine, not a model."""
    return sorted(name for name, spec in (job.spec.services.get("llm") or {}).items() if spec.get("backend") == "sim")




def _print_summary(s, *, as_json: bool, simulated: list[str]) -> None:
    if as_json:
        print(json.dumps({**s.counts(), "run_dir": str(s.run_dir), "step_latency": s.step_latency,
                          "simulated_llms": simulated}))
        return
    if simulated:
        print(f"SIMULATED: LLM service(s) {', '.join(simulated)} ran the sim backend (an engine's timing, "
              "not a model's words)")
    print(f"run directory: {s.run_dir}")
    print(f"this run: {s.done} done, {s.failed} failed in {s.wall_s:.1f}s; {s.throughput:.1f} rows/s over "
          f"{s.processing_s:.1f}s of processing; "
          f"run directory: {s.done_total} done, {s.failed_total} failed of {s.total} tasks")
    if s.resumed or s.recovered:
        print(f"resumed from snapshot: {s.resumed}; recovered after an actor died: {s.recovered}")
    print(f"retries: {s.retries} step(s) in the tasks this run committed, {s.service_waits} waiting for a "
          f"service, {s.commit_retries} commit(s), {s.send_retries} send(s); "
          f"actor restarts: {s.actor_restarts}; checkpoints: {s.checkpoints}"
          + (f" ({s.checkpoint_failures} failed)" if s.checkpoint_failures else ""))
    if s.steps:
        print("steps in the tasks this run committed, by role (step latency of this run's tries):")
    for role, n in s.steps.items():
        lat = s.step_latency.get(role, {"n": 0})
        timing = f"  p50 {lat['p50'] * 1000:8.1f} ms  p99 {lat['p99'] * 1000:8.1f} ms" if lat["n"] else ""
        print(f"  {role:<16} steps {n:>7}{timing}")
    if s.failures:
        print("failed tasks by role and error:")
        for key, n in sorted(s.failures.items(), key=lambda kv: -kv[1]):
            print(f"  {n:>7}  {key}")
        print(f"sample error: {s.sample_error}")
        print(f"failed rows: matrix-hpc export {s.run_dir} --failed; run them again from their dataset rows: "
              f"matrix-hpc rerun {s.run_dir} -o NEW_RUN_DIR")
    if s.stopped_by:  # what was saved and how to go on: said once, by the driver, when it stopped
        print(f"stopped: {s.stopped_by}")
    print(f"export: matrix-hpc export {s.run_dir} --format jsonl")
    print(f"exit status: {s.exit_status}")
