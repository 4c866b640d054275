"""From a job file to a Slurm job: the ``slurm:`` section (plus command-line overrides) becomes
submitit's Slurm parameters; the run directory is created and the submission recorded in it.

The run record (``RunDir.record()``: job file, ``--force``, Slurm settings, options every node reads,
the latest Slurm job) is what ``matrix-hpc resume`` submits again; ``slurm/`` keeps submitit's
pickles and per-node logs (``<jobid>_<node>_log.{out,err}``) and ``ray/`` (bootstrap).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_hpc._compat import SUBMITIT_MAX_NUM_TIMEOUT, sbatch_script, submitit_sbatch_text
from matrix_hpc.job.load import Job
from matrix_hpc.job.spec import SlurmSpec
from matrix_hpc.rundir import RunDir
from matrix_hpc.rundir.holder import RunDirHeld
from matrix_hpc.slurm.checks import SubmitError, check_satisfiable, sbatch_reason
from matrix_hpc.slurm.entry import SlurmEntry

# Paths that are private to one node on most clusters (override with MATRIX_HPC_NODE_LOCAL_PATHS,
# colon-separated; empty where every node shares them, as on the local Slurm of slurm/).
DEFAULT_NODE_LOCAL = "/tmp:/var/tmp:/dev/shm:/run"


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_dir: Path


def slurm_settings(spec: SlurmSpec, overrides: dict[str, Any] | None = None) -> SlurmSpec:
    """The job file's ``slurm:`` section with command-line overrides (not None) applied and re-validated."""
    merged = {**spec.model_dump(), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return SlurmSpec.model_validate(merged)


def executor_parameters(spec: SlurmSpec, name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` arguments: one task per node, requeueable, USR2
    ``signal_delay_s`` before the end."""
    params: dict[str, Any] = {
        "job_name": f"matrix-hpc-{name}",
        "nodes": spec.nodes,
        "ntasks_per_node": 1,
        "time": spec.time_min,
        "signal_delay_s": spec.signal_delay_s,
        "additional_parameters": {"requeue": True, **spec.extra},
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    if spec.cpus_per_node:
        params["cpus_per_task"] = spec.cpus_per_node
    if spec.mem_gb:
        params["mem"] = f"{int(spec.mem_gb)}GB" if spec.mem_gb == int(spec.mem_gb) else f"{int(spec.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            params[key] = getattr(spec, key)
    if spec.exclusive:
        params["exclusive"] = True
    return params


def _executor(run_dir: Path, params: dict[str, Any]):
    import submitit

    executor = submitit.SlurmExecutor(folder=RunDir(run_dir).slurm, max_num_timeout=SUBMITIT_MAX_NUM_TIMEOUT)
    executor.update_parameters(**params)
    return executor


def sbatch_text(job: Job, spec: SlurmSpec) -> str:
    """The sbatch script ``submit`` would hand to Slurm (submitit's, running the pickled entry)."""
    executor = _executor(job.run_dir, executor_parameters(spec, job.spec.name))
    return submitit_sbatch_text(executor)


def standalone_sbatch_text(job: Job, spec: SlurmSpec) -> str:
    """An sbatch script that needs no pickle: ``srun`` runs ``python -m matrix_hpc.slurm.entry`` on every node."""
    params = executor_parameters(spec, job.spec.name)
    command = shlex.join([sys.executable, "-u", "-m", "matrix_hpc.slurm.entry", str(job.path), str(job.run_dir)])
    setup = [f"export {k}={shlex.quote(v)}" for k, v in _environment().items()]
    return sbatch_script(command, RunDir(job.run_dir).slurm, setup, **params)


def _environment() -> dict[str, str]:
    """What the nodes need from the submitting shell (sbatch exports it anyway; the standalone script pins it)."""
    keys = ("PATH", "PYTHONPATH", "MATRIX_HPC_CACHE", "SLURM_CONF")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def check_shared_paths(job: Job, spec: SlurmSpec) -> None:
    """Every node reads the job folder, dataset, cache and run directory: refuse node-local paths
    when the allocation has more than one node."""
    if spec.nodes == 1:
        return
    local = [p for p in os.environ.get("MATRIX_HPC_NODE_LOCAL_PATHS", DEFAULT_NODE_LOCAL).split(":") if p]
    cache = os.environ.get("MATRIX_HPC_CACHE")
    named = {"run directory": job.run_dir, "job folder": job.dir, "dataset": job.dataset_path}
    if cache:
        named["cache (MATRIX_HPC_CACHE)"] = Path(cache)
    named["Python environment (the venv every node runs)"] = Path(sys.prefix)
    for what, path in named.items():
        resolved = Path(path).resolve()
        for prefix in local:
            if resolved == Path(prefix) or Path(prefix) in resolved.parents:
                raise SubmitError(
                    f"the {what} {resolved} is on a node-local path ({prefix}), but the run spans {spec.nodes} "
                    "nodes that must all see it: put it on a shared filesystem (or set MATRIX_HPC_NODE_LOCAL_PATHS "
                    "if your cluster shares it)")


def preflight(job: Job, spec: SlurmSpec) -> str:
    """Every check a submission passes before anything is written (``--dry-run`` runs them too):
    shared paths, nothing the cluster can never satisfy. Returns the script. (That no other live run
    holds the run directory is checked when ``submit`` takes it.)"""
    check_shared_paths(job, spec)
    script = sbatch_text(job, spec)
    check_satisfiable(spec, script)
    return script


def submit(job: Job, spec: SlurmSpec, *, force: bool = False, nodes_timeout_s: float = 300.0,
           ray_worker_args: list[str] | None = None) -> Submitted:
    """Submit the run and record how, for ``resume``. Refused when it can never run, or while another
    live run (a Slurm job pending or running, a local run) holds the run directory; the new job holds
    it from here on."""
    import submitit

    preflight(job, spec)
    rundir = RunDir(job.run_dir)
    rundir.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        lease = rundir.hold("submit")
    except RunDirHeld as e:
        raise SubmitError(str(e)) from None
    handed = False
    try:
        write_options(job, spec, force=force, nodes_timeout_s=nodes_timeout_s, ray_worker_args=ray_worker_args)
        executor = _executor(job.run_dir, executor_parameters(spec, job.spec.name))
        try:
            submitted = executor.submit(SlurmEntry(str(job.path), str(job.run_dir)))
        except submitit.core.utils.FailedJobError as e:
            raise SubmitError(f"Slurm refused the job: {sbatch_reason(str(e))}") from None
        lease.hand_to_slurm(submitted.job_id)
        handed = True
        rundir.record_slurm_job(submitted.job_id)
    finally:
        if not handed:
            lease.release()
    return Submitted(submitted.job_id, job.run_dir)


def write_options(job: Job, spec: SlurmSpec, *, force: bool = False, nodes_timeout_s: float = 300.0,
                  ray_worker_args: list[str] | None = None) -> dict[str, Any]:
    """Record the run for Slurm (what every node reads, what ``resume`` submits again) and create
    ``<run_dir>/slurm``; clear an earlier cancel request."""
    rundir = RunDir(job.run_dir)
    rundir.slurm.mkdir(parents=True, exist_ok=True)
    rundir.cancel_marker.unlink(missing_ok=True)
    options = {"max_requeues": spec.max_requeues, "nodes_timeout_s": nodes_timeout_s,
               "ray_worker_args": list(ray_worker_args or [])}
    rundir.update_record(job=str(job.path), force=force, slurm=spec.model_dump(), options=options)
    return options

