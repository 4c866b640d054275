"""A Slurm run seen from outside: its job's state, its per-node logs, and cancelling it cleanly."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from matrix_hpc.rundir import RunDir

_POLL_S = 0.5
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_id_of(run_dir: Path) -> str:
    rundir = RunDir(run_dir)
    job_id = rundir.slurm_job_id()
    if job_id is None:
        raise FileNotFoundError(f"{run_dir} was not submitted to Slurm (no Slurm job in {rundir.record_file})")
    return job_id


def slurm_state(run_dir: Path) -> dict | None:
    """The latest job's state, reason, nodes and requeue count; None for a run that never went to Slurm."""
    try:
        job_id = job_id_of(run_dir)
    except FileNotFoundError:
        return None
    state = _job_state(run_dir, job_id)
    if state["state"] in _ENDED and RunDir(run_dir).cancel_marker.exists():
        state["state"] = "CANCELLED"  # by matrix-hpc cancel: checkpointed, then stopped on purpose
    return state


def _job_state(run_dir: Path, job_id: str) -> dict:
    fields = _scontrol_fields(job_id)
    if fields:
        return {"job_id": job_id, "state": fields.get("JobState", "UNKNOWN"), "reason": fields.get("Reason"),
                "nodes": fields.get("NodeList"), "requeues": int(fields.get("Restarts", "0"))}
    # Gone from the controller's memory (MinJobAge): ask the accounting database.
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,NodeList"], capture_output=True,
                         text=True, timeout=60).stdout.strip().splitlines()
    state, nodes = (out[-1].split("|") + [""])[:2] if out else ("UNKNOWN", "")
    requeues = len(list(RunDir(run_dir).ray_attempts.glob(f"{job_id}.*"))) - 1
    return {"job_id": job_id, "state": state.split()[0] if state else "UNKNOWN", "reason": None, "nodes": nodes,
            "requeues": max(requeues, 0)}


def _scontrol_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return {}
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def node_logs(run_dir: Path, node: int) -> list[Path]:
    """The stdout and stderr files of node ``node`` of the latest job (submitit names them), the
    output of the run's actors on that node (``logs/node-<node>.log``), and for node 0 also the
    driver's log of the run (``logs/run.log``, where it writes while it runs)."""
    job_id = job_id_of(run_dir)
    rundir = RunDir(run_dir)
    paths = [rundir.node_log(job_id, node, stream) for stream in ("out", "err")]
    paths.append(rundir.actors_log(node))
    if node == 0:
        paths.append(rundir.run_log)
    existing = [p for p in paths if p.exists()]
    if not existing:
        raise FileNotFoundError(f"no log of node {node} for job {job_id} yet ({paths[0].parent})")
    return existing


def cancel(run_dir: Path, *, timeout: float = 120) -> str:
    """Ask the run to checkpoint and stop without requeueing (USR2 plus a marker), wait until the job
    ends, then ``scancel`` whatever is left. Returns what happened, in words."""
    job_id = job_id_of(run_dir)
    state = (slurm_state(run_dir) or {}).get("state", "UNKNOWN")
    if state in _ENDED:
        return f"job {job_id} already ended ({state.lower()})"
    RunDir(run_dir).cancel_marker.write_text(job_id)
    if state == "RUNNING":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=False, timeout=60)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (slurm_state(run_dir) or {}).get("state") in _ENDED:
                return f"job {job_id} checkpointed and stopped; continue with: matrix-hpc resume {run_dir}"
            time.sleep(_POLL_S)
    subprocess.run(["scancel", job_id], check=False, timeout=60)
    return f"job {job_id} cancelled ({state.lower()}); continue with: matrix-hpc resume {run_dir}"
