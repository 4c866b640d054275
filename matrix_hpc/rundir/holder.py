"""One writer per run directory: ``RUN_DIR/holder.json`` names the process (or Slurm job) that writes.

Why a file created with ``link()`` rather than ``flock``: the run directory sits on a filesystem
every node of an allocation shares (NFS, Lustre, GPFS), where ``flock`` is either node-local or not
supported, and where a lock dies with its holder only on one node. ``link(tmp, holder.json)`` is
atomic and fails if the name exists, on every POSIX filesystem, NFS included; the file is complete
the moment it appears (written under a temporary name first). The holder then proves it is alive:

- a Slurm job (``submit``, the requeued job, a plain ``sbatch`` of ``sbatch-script``): by its state
  in Slurm (``squeue``); pending, running, requeued ... is alive, gone from the queue is dead. When
  Slurm cannot answer, the holder counts as alive (never take a run away on a guess).
- a process on this host (``run``, ``resume``): by its pid and the pid's start time (a reused pid
  is not the holder).
- a process on another host: by its heartbeat, the file's mtime, touched every ``HEARTBEAT_S``;
  older than ``STALE_S`` is dead.

A dead holder is taken over under a second link-created file (``holder.json.takeover``), so that of
two processes that both found it dead only one replaces it, and never a new holder by mistake.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = float(os.environ.get("MATRIX_HPC_HOLDER_STALE_S", "60"))
_TRIES = 5
# Slurm job states in which a job still holds (or waits for) an allocation.
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED"})


SLURM_JOB = "slurm job"  # the holder is a Slurm job: alive while Slurm has it pending or running


class RunDirHeld(Exception):
    """Another live process or Slurm job writes to the run directory; the message names it."""


@dataclass(frozen=True)
class Holder:
    token: str
    command: str  # run, resume, submit, or SLURM_JOB
    host: str
    pid: int
    since: float  # unix time
    pid_start: str | None = None  # the process's start time (/proc/<pid>/stat), so a reused pid is no match
    slurm_job_id: str | None = None  # the Slurm job it runs in, if any

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        if self.command == SLURM_JOB:
            return f"Slurm job {self.slurm_job_id} (pid {self.pid} on {self.host}, since {when})"
        job = f"in Slurm job {self.slurm_job_id}, " if self.slurm_job_id else ""
        return f"matrix-hpc {self.command} ({job}pid {self.pid} on {self.host}, since {when})"


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):  # exited (a zombie waiting for its parent): not a holder any more
        return None
    return fields[19]  # field 22: start time in clock ticks after boot


def _me(command: str, slurm_job: str | None) -> Holder:
    return Holder(token=uuid.uuid4().hex, command=command, host=socket.gethostname(), pid=os.getpid(),
                  since=time.time(), pid_start=_pid_start(os.getpid()),
                  slurm_job_id=slurm_job or os.environ.get("SLURM_JOB_ID"))


def read_holder(path: Path) -> tuple[Holder, float] | None:
    """The recorded holder and the age of its heartbeat (seconds), or None if there is none."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
        return Holder(**json.loads(text)), max(0.0, time.time() - mtime)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:  # written by something else: report it, never guess
        raise RunDirHeld(f"{path} is not a holder record ({e}); remove it if no run uses {path.parent}") from None


def _link_new(path: Path, holder: Holder) -> bool:
    """Create ``path`` holding ``holder``, complete, unless it exists (atomic on a shared filesystem)."""
    tmp = path.with_name(f".{path.name}.{holder.token}")
    tmp.write_text(json.dumps(asdict(holder)) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _replace(path: Path, holder: Holder) -> None:
    """Rewrite the holder record of a hold we own (atomically: readers see the old or the new one)."""
    tmp = path.with_name(f".{path.name}.{holder.token}")
    tmp.write_text(json.dumps(asdict(holder)) + "\n")
    tmp.replace(path)


def slurm_job_state(job_id: str) -> str | None:
    """The job's state in Slurm ("" once it left the queue), or None when Slurm cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode == 0:
        return out.stdout.strip()
    return "" if "invalid job id" in out.stderr.lower() else None


def alive(holder: Holder, heartbeat_age: float) -> tuple[bool, str]:
    """Whether ``holder`` still runs, and its state in words."""
    if holder.command == SLURM_JOB and holder.slurm_job_id:  # the run is that Slurm job
        state = slurm_job_state(holder.slurm_job_id)
        if state is None:
            return True, "state unknown: Slurm does not answer"
        return state in ACTIVE_STATES, state.lower() or "ended"
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False, "exited"
        except PermissionError:
            pass
        same = holder.pid_start is None or _pid_start(holder.pid) == holder.pid_start
        return same, "running" if same else "exited"
    if holder.slurm_job_id and slurm_job_state(holder.slurm_job_id) == "":
        return False, f"its Slurm job {holder.slurm_job_id} ended"
    fresh = heartbeat_age < STALE_S
    return fresh, f"last heartbeat {heartbeat_age:.0f}s ago"


def refusal(run_dir: Path, holder: Holder, state: str) -> str:
    if holder.command == SLURM_JOB:
        return (f"{run_dir} is already {state} as {holder.describe()}; see matrix-hpc status {run_dir}, "
                f"or stop it with matrix-hpc cancel {run_dir}")
    return (f"{run_dir} is in use by {holder.describe()} ({state}): one run writes to a run directory at a "
            f"time; wait for it to end or stop it first (Ctrl-C, or kill {holder.pid} on {holder.host})")


class Lease:
    """This process holds a run directory: a heartbeat thread keeps it fresh until ``release()``."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder, self.depth = path, holder, 1
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="matrix-hpc-holder", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                found = read_holder(self.path)
                if found is None or found[0].token != self.holder.token:
                    log.error("%s: this run no longer holds its run directory (now: %s)", self.path.parent,
                              found[0].describe() if found else "nobody")
                    return
                os.utime(self.path)
            except (OSError, RunDirHeld) as e:  # a full or flaky filesystem: the next beat tries again
                log.warning("%s: heartbeat failed: %s", self.path, e)

    def _forget(self) -> None:
        self._stop.set()
        _held.pop(self.path, None)

    def release(self) -> None:
        """Stop holding (the outermost release removes holder.json, if it is still ours)."""
        self.depth -= 1
        if self.depth > 0:
            return
        self._forget()
        found = read_holder(self.path)
        if found and found[0].token == self.holder.token:
            self.path.unlink(missing_ok=True)

    def hand_to_slurm(self, job_id: str) -> None:
        """The run continues as Slurm job ``job_id`` (just submitted): it holds the run directory now,
        alive while Slurm has it pending or running; its first node adopts the hold."""
        self._forget()
        found = read_holder(self.path)
        if found is None or found[0].token != self.holder.token:
            return  # taken over meanwhile (this process was thought dead): not ours to hand on
        _replace(self.path, Holder(**{**asdict(self.holder), "command": SLURM_JOB, "slurm_job_id": str(job_id)}))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_held: dict[Path, Lease] = {}  # holder file -> this process's lease (a nested hold is the same lease)
_lock = threading.Lock()


def hold(run_dir, command: str, *, slurm_job: str | None = None) -> Lease:
    """Hold ``run_dir`` (a ``RunDir``) for this process, or raise ``RunDirHeld`` naming the live
    holder. A dead holder is taken over. ``slurm_job``: this is Slurm job ``slurm_job``'s first
    node, which adopts a hold recorded for that job (by ``submit``, or before a requeue)."""
    path = Path(run_dir.holder_file).resolve()
    with _lock:
        if path in _held:
            _held[path].depth += 1
            return _held[path]
        me = _me(command, slurm_job)
        for _ in range(_TRIES):
            if _link_new(path, me):
                break
            found = read_holder(path)
            if found is None:
                continue  # released meanwhile
            current, age = found
            if slurm_job and current.command == SLURM_JOB and current.slurm_job_id == str(slurm_job):
                _replace(path, me)  # held for this very job (submitted, or requeued): adopt it
                break
            live, state = alive(current, age)
            if live:
                raise RunDirHeld(refusal(run_dir.root, current, state))
            log.warning("%s: taking over from %s, which is gone (%s)", run_dir.root, current.describe(), state)
            if _take_over(path, current.token, me):
                break
            _wait_while_taken(path)  # another taker is at it: then see who holds it
        else:
            raise RunDirHeld(f"{run_dir.root}: could not become its holder after {_TRIES} tries "
                             f"(another process keeps taking it); see {path}")
        lease = _held[path] = Lease(path, me)
        return lease


def refuse_if_held(run_dir) -> None:
    """Raise ``RunDirHeld`` if a live process (other than this one) holds ``run_dir`` (a ``RunDir``):
    the cheap check a command makes before it loads anything. Takes nothing."""
    path = Path(run_dir.holder_file).resolve()
    found = None if path in _held else read_holder(path)
    if found is not None:
        live, state = alive(*found)
        if live:
            raise RunDirHeld(refusal(run_dir.root, found[0], state))


def _wait_while_taken(path: Path, timeout: float = 10.0) -> None:
    """Wait (bounded) until another process's takeover (``holder.json.takeover``) is over."""
    guard, end = path.with_name(path.name + ".takeover"), time.monotonic() + timeout
    while guard.exists() and time.monotonic() < end:
        time.sleep(0.02)


def _take_over(path: Path, dead_token: str, me: Holder) -> bool:
    """Replace the dead holder ``dead_token`` with ``me``; False if another process got there first."""
    guard = path.with_name(path.name + ".takeover")
    if not _link_new(guard, me):
        try:
            if time.time() - guard.stat().st_mtime > STALE_S:  # a taker killed half-way
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        found = read_holder(path)
        if found is not None and found[0].token != dead_token:
            return False  # taken over (or released and held again) meanwhile
        path.unlink(missing_ok=True)
        return _link_new(path, me)
    finally:
        guard.unlink(missing_ok=True)
