"""What runs inside the allocation, once per node (``srun``, one task a node).

The first node's task starts the Ray head, waits for the other nodes, and runs the driver; the
others join and keep their Ray up until the head is done. USR2 (Slurm's warning before a
preemption or the time limit, through ``--signal``) and SIGTERM (scancel, node shutdown) make
the driver stop taking rows and checkpoint every task in flight; after USR2 the job requeues
itself, and the requeued job resumes from the run store.

Called by submitit (``SlurmEntry``, pickled by ``matrix-hpc submit``) or directly
(``python -m matrix_hpc.slurm.entry JOB RUN_DIR``, by the standalone sbatch script).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc.rundir import RunDir
from matrix_hpc.rundir.holder import SLURM_JOB, RunDirHeld
from matrix_hpc.runtime.summary import Exit
from matrix_hpc.slurm import bootstrap
from matrix_hpc.slurm.bootstrap import Node

log = logging.getLogger("matrix_hpc.slurm")

# After SIGTERM (scancel), the time the driver has to checkpoint and stop before this node stops its
# Ray and cleans up: well under Slurm's KillWait (30 s by default, 10 s on the local Slurm).
TERM_DEADLINE_S = 4.0


@dataclass(frozen=True)
class Options:
    max_requeues: int = 10
    nodes_timeout_s: float = 300.0  # for every node to join Ray
    ray_head_args: tuple[str, ...] = ()
    ray_worker_args: tuple[str, ...] = ()

    @classmethod
    def load(cls, run_dir: Path) -> Options:
        d = RunDir(run_dir).record().options
        return cls(max_requeues=d.get("max_requeues", 10), nodes_timeout_s=d.get("nodes_timeout_s", 300.0),
                   ray_head_args=tuple(d.get("ray_head_args", ())),
                   ray_worker_args=tuple(d.get("ray_worker_args", ())))


class SlurmEntry:
    """The callable submitit pickles and runs on every node of the allocation."""

    def __init__(self, job_path: str, run_dir: str):
        self.job_path = job_path
        self.run_dir = run_dir

    def __call__(self) -> str:
        code = run_node(Path(self.job_path), Path(self.run_dir))
        if code:
            raise SystemExit(code)
        return "ok"


def run_node(job_path: Path, run_dir: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    node = Node.from_env()
    options = Options.load(run_dir)
    adir = bootstrap.attempt_dir(run_dir, node)
    os.environ[bootstrap.CLUSTER_ENV] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Each node's Ray is stopped once the run's work is over (or the job is going down): no 30 s
    # drain on its SIGTERM, which on a worker waits for a head that is already gone.
    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    log.info("node %d/%d %s (%s): %d CPU(s), %d GPU(s); job %s, requeue %d", node.rank, node.num_nodes, node.name,
             node.ip, node.cpus, node.gpus, node.job_id, node.restart)
    if node.rank != 0:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the head handles it for the whole run
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # scancel: stop this node's Ray, clean its scratch
        try:
            _private_ray(run_dir)
            return bootstrap.run_worker(node, adir, list(options.ray_worker_args), options.nodes_timeout_s)
        except Exception as e:  # the head, waiting for this node to join, fails at once with the reason
            bootstrap.report_failure(adir, node, f"{type(e).__name__}: {e}")
            raise
    _private_ray(run_dir)
    return _hold_and_run_head(node, adir, job_path, run_dir, options)


def _hold_and_run_head(node: Node, adir: Path, job_path: Path, run_dir: Path, options: Options) -> int:
    """The run directory's one writer is this job: refused (exit 2, nothing run, not requeued) while
    another live run holds it. Held by this job's id after it ends: alive while Slurm requeues it."""
    rundir = RunDir(run_dir)
    try:
        lease = rundir.hold(SLURM_JOB, slurm_job=node.job_id)
    except RunDirHeld as e:
        log.error("not run: %s", e)
        (adir / "done").write_text("")  # the other nodes stop waiting for a Ray head
        return 2
    try:
        rundir.record_slurm_job(node.job_id)  # status, logs and cancel find an sbatch job too
        return _run_head(node, adir, job_path, run_dir, options)
    finally:
        lease.hand_to_slurm(node.job_id)


def _exit_on_sigterm(signum, _frame) -> None:
    log.warning("got SIGTERM: stopping this node's Ray")
    raise SystemExit(128 + signum)


def _private_ray(run_dir: Path) -> None:
    """The Ray this job starts on its nodes is the run's alone: token authentication with the run's
    token (whatever RAY_AUTH_* the submitting shell had), files owner-only, no metrics exporter
    (they answer HTTP without credentials). Every ``ray start`` of the job and its driver inherit
    this environment."""
    from matrix_hpc.runtime.security import RAY_METRICS_OFF, use_cluster_token

    os.umask(0o077)
    os.environ.update(RAY_METRICS_OFF)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    use_cluster_token(run_dir)


def _run_head(node: Node, adir: Path, job_path: Path, run_dir: Path, options: Options) -> int:
    import ray

    stop = threading.Event()
    signals: list[int] = []
    term_deadline: list[float] = []

    def on_signal(signum, _frame):
        log.warning("got %s: checkpointing the tasks in flight and stopping", signal.Signals(signum).name)
        signals.append(signum)
        if signum == signal.SIGTERM:
            term_deadline.append(time.monotonic() + TERM_DEADLINE_S)
        stop.set()

    signal.signal(signal.SIGUSR2, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ray_node, terminated = None, False
    try:
        ray_node, address = bootstrap.start_head(node, adir, list(options.ray_head_args), options.nodes_timeout_s)
        # ray.init installed Ray's own SIGTERM handler (it aborts the process): ours again.
        signal.signal(signal.SIGTERM, on_signal)
        os.environ["RAY_ADDRESS"] = address
        bootstrap.wait_for_nodes(node, adir, options.nodes_timeout_s, stop)
        if stop.is_set():  # signalled while Ray came up: nothing ran yet, nothing to checkpoint
            interrupted = True
        else:
            log.info("all %d node(s) joined Ray at %s", node.num_nodes, address)
            summary = _drive(job_path, run_dir, stop, term_deadline)
            interrupted = summary.interrupted
    except _Terminated:
        terminated = True
    finally:
        (adir / "done").write_text("")
        t_stop = time.monotonic()
        if ray.is_initialized() and not terminated:  # a Ray that is going down can hang the call
            ray.shutdown()
        if ray_node is not None:
            ray_node.stop()  # and its scratch folder is removed
        log.info("Ray stopped on this node in %.1f s", time.monotonic() - t_stop)
    if terminated:
        log.error("terminated: the checkpoint did not finish within %gs of SIGTERM (Slurm signals Ray's processes "
                  "too); in-flight tasks restart from the last checkpoint; continue with matrix-hpc resume %s",
                  TERM_DEADLINE_S, run_dir)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)  # the driver thread may be stuck on the Ray that is gone
    if not interrupted:
        if summary.stopped_by:  # a fault (full disk, ...): requeueing would meet it again
            log.error("stopped: %s; after fixing it, continue with matrix-hpc resume %s", summary.stopped_by, run_dir)
            return int(summary.exit_status)
        log.info("finished: %d done, %d failed", summary.done, summary.failed)
        return int(summary.exit_status)  # non-zero if more rows failed than run.max_failed_fraction allows
    return _after_interruption(node, run_dir, options, signals)


class _Terminated(Exception):
    """The driver did not stop within TERM_DEADLINE_S of a SIGTERM."""


def _drive(job_path: Path, run_dir: Path, stop: threading.Event, term_deadline: list[float]):
    """The driver runs in a thread so that this (main) thread stays free to handle signals; after
    SIGTERM it has until ``term_deadline`` to checkpoint and stop."""
    from matrix_hpc.job.load import load_job
    from matrix_hpc.runtime.driver import run

    job = load_job(job_path, run_dir=run_dir)
    outcome: dict = {}

    def target():
        try:
            outcome["summary"] = run(job, progress=False, stop_requested=stop, force=RunDir(run_dir).record().force)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="matrix-hpc-driver", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if term_deadline and time.monotonic() > term_deadline[0]:
            raise _Terminated
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


def _after_interruption(node: Node, run_dir: Path, options: Options, signals: list[int]) -> int:
    """Requeue after USR2 (preemption or time limit), unless cancelled or requeued too often."""
    if RunDir(run_dir).cancel_marker.exists():
        log.info("cancelled by matrix-hpc cancel: in-flight tasks saved; continue with matrix-hpc resume %s", run_dir)
        return Exit.INTERRUPTED  # never "completed 0:0" in Slurm's accounting; `status` says cancelled
    if signal.SIGUSR2 not in signals:
        log.info("terminated; continue with matrix-hpc resume %s", run_dir)
        return Exit.INTERRUPTED
    if node.restart >= options.max_requeues:
        log.error("not requeued: already requeued %d time(s) (slurm.max_requeues); continue with "
                  "matrix-hpc resume %s", node.restart, run_dir)
        return 1
    log.info("requeueing job %s", node.job_id)
    done = subprocess.run(["scontrol", "requeue", node.job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:  # e.g. a preemption already requeues it
        log.warning("scontrol requeue %s: %s", node.job_id, (done.stderr or done.stdout).strip())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="matrix-hpc's task on one node of a Slurm allocation (run by srun)")
    p.add_argument("job", type=Path)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    return run_node(args.job, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
