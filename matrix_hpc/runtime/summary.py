"""What a run tells when it ends: its numbers (``RunSummary``) and its exit status (``Exit``).

No Ray here: the CLI's ``--help`` imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matrix_hpc._gen.v1 import task_pb2


class Exit:
    """Exit statuses of ``matrix-hpc run`` / ``resume`` (also in the README and ``--help``)."""

    OK = 0  # every task of the run is done (or failures within run.max_failed_fraction)
    ERROR = 1  # an unexpected error (a traceback)
    USAGE = 2  # a bad job file, or a resume refused
    TASKS_FAILED = 3  # the run ended, but more tasks failed than run.max_failed_fraction allows
    STOPPED = 4  # stopped by a fault (a full disk, ...): fix it, then `matrix-hpc resume RUN_DIR`
    INTERRUPTED = 130  # Ctrl-C or SIGTERM/SIGHUP: checkpointed; `matrix-hpc resume RUN_DIR`

    @staticmethod
    def of_contents(failed_total: int, total: int, max_failed_fraction: float) -> int:
        """The status a run directory's contents deserve, whichever command ran it: a run with more
        failed tasks than allowed says so every time (a script's ``resume || alert`` sees it)."""
        return Exit.TASKS_FAILED if failed_total > max_failed_fraction * total else Exit.OK


@dataclass
class RunSummary:
    run_dir: Path
    done: int  # tasks committed as done by this run (from the store: exact across restarts)
    failed: int  # tasks committed as failed by this run
    total: int
    wall_s: float
    resumed: int = 0  # tasks restored from a snapshot at start
    recovered: int = 0  # tasks re-sent after an actor died
    checkpoints: int = 0
    interrupted: bool = False
    step_latency: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> p50/p99 seconds
    # role -> steps in the traces of the tasks this run committed (from the store: exact; a task
    # resumed from a checkpoint brings the steps it had made before)
    steps: dict[str, int] = field(default_factory=dict)
    # role -> steps each live actor ran, as last polled (how the load was spread; not exact)
    actor_steps: dict[str, list[int]] = field(default_factory=dict)
    processing_s: float = 0.0  # from the first task sent to the last one committed (no start-up, no teardown)
    stopped_by: str | None = None  # the fault that ended the run early (resumable), if any
    done_total: int = 0  # in the store, all runs of this run directory
    failed_total: int = 0
    max_failed_fraction: float = 0.0
    retries: int = 0  # step tries that raised and were tried again, in the tasks this run committed
    service_waits: int = 0  # step tries that met an unavailable service and waited, likewise
    commit_retries: int = 0
    send_retries: int = 0  # as counted by live actors
    actor_restarts: int = 0
    checkpoint_failures: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "role: ErrorType" -> failed tasks (store)
    sample_error: str | None = None

    def counts(self) -> dict:
        """What the run did, as plain numbers (the summary's event in events.jsonl)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("run_dir", "step_latency", "actor_steps")}
        out["exit_status"] = self.exit_status
        out["throughput_rows_per_s"] = round(self.throughput, 2)
        return out

    @property
    def throughput(self) -> float:
        """Rows this run committed per second of processing (from its first row sent to its last
        commit; store/throughput.py): the figure of the progress line, ``status`` and events."""
        return (self.done + self.failed) / self.processing_s if self.processing_s > 0 else 0.0

    @property
    def exit_status(self) -> int:
        if self.interrupted:
            return Exit.INTERRUPTED
        if self.stopped_by:
            return Exit.STOPPED
        return Exit.of_contents(self.failed_total, self.total, self.max_failed_fraction)


def failure_breakdown(failed: Iterable[bytes]) -> tuple[dict[str, int], str | None]:
    """Failed task envelopes counted by "role: ErrorType", and one sample error."""
    by: dict[str, int] = {}
    sample = None
    for data in failed:
        task = task_pb2.Task.FromString(data)
        err = task.error
        key = f"{err.role}: {err.message.split(':', 1)[0]}"
        by[key] = by.get(key, 0) + 1
        if sample is None:
            sample = f"{task.task_id} ({err.role}, after {err.attempts} attempt(s)): {err.message}"
    return by, sample
