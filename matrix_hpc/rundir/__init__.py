"""The run directory: every path in it, the run record, and who holds it.

This package is the one place that knows where things go under ``RUN_DIR``; every other module asks
a ``RunDir`` for its paths. It imports nothing else of matrix_hpc, so every layer (``job/``,
``runtime/``, ``store/``, ``slurm/``) can use it.

```
RUN_DIR/
  run.json             the run record: job file, --force, Slurm settings and options, latest Slurm job
  holder.json          who writes to the run now (one writer at a time: holder.py)
  job.yaml  payload.desc  fingerprint.json  store.zarr/     the run store (docs/store.md)
  logs/events.jsonl  logs/run.log                            the event log, the driver's log
  dataset_digest.json  credentials/  generated/              caches, secrets, payload modules
  local-ray.json                                             the last local Ray's owner mark (runtime/security.py)
  slurm/               submitit's files, per-node logs <job>_<node>_log.{out,err}, ray/<job>.<requeue>/,
                       cancel-requested
```
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

RECORD_FILE = "run.json"
HOLDER_FILE = "holder.json"
STORE_NAME = "store.zarr"
JOB_FILE = "job.yaml"
DESC_FILE = "payload.desc"
FINGERPRINT_FILE = "fingerprint.json"
LOGS_DIR = "logs"
EVENTS_FILE = "events.jsonl"
RUN_LOG = "run.log"
DIGEST_CACHE = "dataset_digest.json"
LOCAL_RAY_FILE = "local-ray.json"
CREDENTIALS_DIR = "credentials"
GENERATED_DIR = "generated"
SLURM_DIR = "slurm"
CANCEL_MARKER = "cancel-requested"  # under slurm/: `matrix-hpc cancel` asked to stop without requeue
# Written by versions before run.json; still read, so that their run directories can be resumed.
_LEGACY_JOB_PATH, _LEGACY_SUBMIT, _LEGACY_OPTIONS, _LEGACY_JOB_ID = (
    "job_path.txt", "slurm/submit.json", "slurm/options.json", "slurm/job_id")


@dataclass(frozen=True)
class RunRecord:
    """How a run was started, for ``resume`` and for the nodes of a Slurm allocation."""

    job: str | None = None  # the job file
    force: bool = False  # --force: resume even if the job, code, proto or data changed
    slurm: dict[str, Any] | None = None  # the SlurmSpec it was submitted with; None: never submitted
    options: dict[str, Any] = field(default_factory=dict)  # max_requeues, nodes_timeout_s, ray_worker_args
    slurm_job_id: str | None = None  # the latest Slurm job that ran (or runs) it

    @property
    def job_path(self) -> Path | None:
        return Path(self.job) if self.job else None


class RunDir:
    """One run directory: its paths, its run record and its holder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- paths ----------------------------------------------------------------------------------
    @property
    def record_file(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def holder_file(self) -> Path:
        return self.root / HOLDER_FILE

    @property
    def store(self) -> Path:
        return self.root / STORE_NAME

    @property
    def job_file(self) -> Path:
        return self.root / JOB_FILE

    @property
    def payload_desc(self) -> Path:
        return self.root / DESC_FILE

    @property
    def fingerprint(self) -> Path:
        return self.root / FINGERPRINT_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def events(self) -> Path:
        return self.logs / EVENTS_FILE

    @property
    def run_log(self) -> Path:
        return self.logs / RUN_LOG

    @property
    def node_view(self) -> Path:
        """The per-node view the driver keeps (tasks in flight, steps, last error), for ``status``."""
        return self.logs / "nodes.json"

    def actors_log(self, node: int) -> Path:
        """The output of the run's actors on node ``node`` of a Slurm allocation."""
        return self.logs / f"node-{node}.log"

    @property
    def dataset_digest(self) -> Path:
        return self.root / DIGEST_CACHE

    @property
    def local_ray(self) -> Path:
        """What the last start of a local Ray made (its owner mark, its temporary folder), for the next to clear."""
        return self.root / LOCAL_RAY_FILE

    @property
    def credentials(self) -> Path:
        return self.root / CREDENTIALS_DIR

    @property
    def generated(self) -> Path:
        return self.root / GENERATED_DIR

    @property
    def slurm(self) -> Path:
        return self.root / SLURM_DIR

    @property
    def cancel_marker(self) -> Path:
        return self.slurm / CANCEL_MARKER

    @property
    def ray_attempts(self) -> Path:
        return self.slurm / "ray"

    def ray_attempt(self, job_id: str, requeue: int) -> Path:
        """Bootstrap files of one attempt (Slurm job id and requeue count): head, node-<rank>.log, done."""
        return self.ray_attempts / f"{job_id}.{requeue}"

    def node_log(self, job_id: str, node: int, stream: str) -> Path:
        """submitit's stdout (``out``) or stderr (``err``) of node ``node`` of Slurm job ``job_id``."""
        return self.slurm / f"{job_id}_{node}_log.{stream}"

    # -- the run record -------------------------------------------------------------------------
    def record(self) -> RunRecord:
        """The run record (an empty one if the run directory has none)."""
        try:
            return RunRecord(**json.loads(self.record_file.read_text()))
        except FileNotFoundError:
            return self._legacy_record()

    def update_record(self, **changes: Any) -> RunRecord:
        """Change some fields of the run record; written whole and atomically (readers never see half)."""
        record = replace(self.record(), **changes)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{RECORD_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
        tmp.replace(self.record_file)
        return record

    def record_slurm_job(self, job_id: str) -> None:
        """Record the Slurm job that runs the run now (``submit``, or an sbatch job on its first node)."""
        if self.record().slurm_job_id != str(job_id):
            self.update_record(slurm_job_id=str(job_id))

    def slurm_job_id(self) -> str | None:
        return self.record().slurm_job_id

    def _legacy_record(self) -> RunRecord:
        def read(name: str) -> str | None:
            try:
                return (self.root / name).read_text()
            except FileNotFoundError:
                return None

        submitted = json.loads(read(_LEGACY_SUBMIT) or "{}")
        job = (read(_LEGACY_JOB_PATH) or "").strip() or submitted.get("job")
        options = json.loads(read(_LEGACY_OPTIONS) or "{}") or submitted.get("options", {})
        return RunRecord(job=job, slurm=submitted.get("slurm"), options=options,
                         slurm_job_id=(read(_LEGACY_JOB_ID) or "").strip() or None)

    # -- the holder (one writer at a time) --------------------------------------------------------
    def hold(self, command: str, *, slurm_job: str | None = None):
        """Become the run directory's one writer (see ``holder.hold``); raises ``RunDirHeld``."""
        from matrix_hpc.rundir.holder import hold

        return hold(self, command, slurm_job=slurm_job)

    def refuse_if_held(self) -> None:
        """Raise ``RunDirHeld`` naming the live holder, if there is one (takes nothing)."""
        from matrix_hpc.rundir.holder import refuse_if_held

        refuse_if_held(self)

    def holder(self):
        """Who holds the run directory now, as recorded (alive or not), or None."""
        from matrix_hpc.rundir.holder import read_holder

        found = read_holder(self.holder_file)
        return found[0] if found else None


__all__ = ["RunDir", "RunRecord"]
