"""Ray across a Slurm allocation: the first node's task starts the Ray head, every other node's task
joins it, and the head waits (with a deadline) until all of them are in.

Each node's Ray runs in a process group of its own that we stop ourselves, with the resources
Slurm granted on that node (not the whole machine's), a temporary folder private to the user and
the job, and SIGUSR2 ignored: Slurm signals every process of the job step, and a Ray process
with no USR2 handler would die of it; only the entry process handles it.

Files shared through the run directory (a filesystem every node sees), one folder per attempt
(job id and requeue count) under ``<run_dir>/slurm/ray/``: ``head`` (the head's address),
``node-<rank>.log`` (each node's ``ray start`` output), ``node-<rank>.failed``, ``done``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc import fate
from matrix_hpc.retry import retrying_sync
from matrix_hpc.rundir import RunDir

log = logging.getLogger("matrix_hpc.slurm")

_POLL_S = 0.2
_HEAD_STARTED = "Ray runtime started"  # what `ray start --head` prints once the head runs
START_ATTEMPTS = 3  # `ray start` of a node, before the run fails
LOG_TAIL_LINES = 30

# Set in every process of a Slurm run (the Ray daemons inherit it): services bind the node's
# cluster address, never loopback.
CLUSTER_ENV = "MATRIX_HPC_CLUSTER"


class BootstrapError(RuntimeError):
    """Ray could not be brought up across the allocation; the message holds the failing node's log."""


@dataclass(frozen=True)
class Node:
    """This task's place in the allocation, from Slurm's environment."""

    rank: int
    num_nodes: int
    job_id: str
    restart: int
    name: str
    ip: str
    cpus: int
    gpus: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Node:
        env = dict(os.environ if env is None else env)
        name = env.get("SLURMD_NODENAME") or socket.gethostname()
        return cls(
            rank=int(env.get("SLURM_PROCID", "0")),
            num_nodes=int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"),
            job_id=env.get("SLURM_JOB_ID", "local"),
            restart=int(env.get("SLURM_RESTART_COUNT", "0")),
            name=name,
            ip=node_address(name),
            cpus=int(env.get("SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0))),
            gpus=granted_gpus(env),
        )


def node_address(name: str) -> str:
    """The address Slurm reaches this node at (its NodeAddr), which the other nodes can reach too."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30).stdout
        addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), None)
    except (OSError, subprocess.TimeoutExpired):
        addr = None
    return socket.gethostbyname(addr or socket.gethostname())


def granted_gpus(env: dict[str, str]) -> int:
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("NoDevFiles", "-1"):
        return len([d for d in visible.split(",") if d])
    return int(env.get("SLURM_GPUS_ON_NODE") or 0)


class RayNode:
    """One node's ``ray start --block``, in its own process group, and how to stop it."""

    def __init__(self, node: Node, attempt_dir: Path, extra_args: list[str]):
        self.node = node
        self.log_path = attempt_dir / f"node-{node.rank}.log"
        self.temp_dir: Path | None = None
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0

    def start(self, *, head_port: int | None = None, head_address: str | None = None) -> None:
        self.temp_dir = node_temp_dir(self.node)
        ray = str(Path(sys.executable).with_name("ray"))
        # Ports Ray would otherwise take at fixed defaults, free on this node now: another Ray on the
        # same machine (another user's, or another job's) holds the defaults.
        argv = [ray, "start", "--block", f"--node-ip-address={self.node.ip}", f"--num-cpus={self.node.cpus}",
                f"--num-gpus={self.node.gpus}", f"--temp-dir={self.temp_dir / 'r'}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port(self.node.ip)}"]
        if head_port is not None:
            argv += ["--head", f"--port={head_port}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port(self.node.ip)}"]
        else:
            argv += [f"--address={head_address}"]
        argv += self.extra_args
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.log_offset = log.tell()  # where this start's output begins (the log is kept across retries)
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_ignore_usr2)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM the node's Ray (``ray start --block`` stops what it started), SIGKILL after ``timeout``
        (it does not drain: the entry sets RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0). The run's work is
        over and saved by now, and Ray's own orderly stop takes ~3.5 s that a requeued job waits for."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            # What `ray start` left of its group (raylet, GCS, workers still exiting) would write
            # into the folder again while it is being removed.
            _signal_group(self.proc.pid, signal.SIGKILL)
        if self.temp_dir is not None:
            fate.stop_users_of(self.temp_dir)  # e.g. a worker the raylet was starting: it would make the folder again
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def node_temp_dir(node: Node) -> Path:
    """A fresh owner-only folder (0700, random name: ``mkdtemp``) in ``$TMPDIR`` for this node's Ray,
    which gets ``r`` inside it (Ray makes its own temporary folder 0777). Never a fixed name in a
    shared folder: another user could make it first and own it."""
    prefix = f"mhpc-{node.job_id}.{node.rank}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR") or "/tmp"))


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def attempt_dir(run_dir: Path, node: Node) -> Path:
    d = RunDir(run_dir).ray_attempt(node.job_id, node.restart)
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_head(node: Node, adir: Path, extra_args: list[str], timeout: float) -> tuple[RayNode, str]:
    """Start the head on this node and connect this process to it as the driver; return its address.
    A start that fails (Ray gives a node 30 s to register, which a loaded machine can miss) is retried."""
    ray_node = RayNode(node, adir, extra_args)
    try:
        # whatever failed (`ray start`, the port, ray.init) is retried, then reported with the node's log
        for attempt in retrying_sync(attempts=START_ATTEMPTS, base_s=0, retry_on=lambda e: isinstance(e, Exception),
                                     what=f"starting the Ray head on {node.name}", logger=log):
            with attempt:
                ray_node = RayNode(node, adir, extra_args)
                address = _start_or_clean_up(ray_node, node, timeout)
    except Exception as e:  # noqa: BLE001 - any failure of the last try: worded with the node's log
        raise BootstrapError(f"the Ray head on {node.name} did not come up ({e}); "
                             f"{ray_node.log_path}:\n{ray_node.log_tail()}") from None
    _publish_head(adir, address)  # again, if it was not published before the driver connected
    return ray_node, address


def _start_or_clean_up(ray_node: RayNode, node: Node, timeout: float) -> str:
    try:
        return _start_and_connect(ray_node, node, timeout)
    except BaseException:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        ray_node.stop()
        raise


def _publish_head(adir: Path, address: str) -> None:
    """The head's address, for the other nodes."""
    (adir / "head.tmp").write_text(address)
    (adir / "head.tmp").rename(adir / "head")


def _start_and_connect(ray_node: RayNode, node: Node, timeout: float) -> str:
    import ray

    port = free_port(node.ip)
    ray_node.start(head_port=port)
    end = time.monotonic() + timeout
    while not _accepts(node.ip, port):
        if ray_node.exited() is not None:
            raise RuntimeError(f"`ray start` exited with {ray_node.exited()}")
        if time.monotonic() > end:
            raise RuntimeError(f"no answer on {node.ip}:{port} within {timeout:.0f}s")
        time.sleep(_POLL_S)
    address = f"{node.ip}:{port}"
    # The other nodes join while this process connects as the driver (each takes seconds on a loaded
    # node), but only once the head is fully up: a node joining a head still starting competes with
    # it and can miss Ray's 30 s registration deadline.
    if _wait_for_head_started(ray_node, end):  # else start_head publishes it once connected
        _publish_head(ray_node.log_path.parent, address)
    ray.init(address=address, _node_ip_address=node.ip, log_to_driver=False)
    return address


def _wait_for_head_started(ray_node: RayNode, end: float) -> bool:
    """Until ``ray start`` says the head runs (True); False if its log never says so by ``end``."""
    while time.monotonic() < end:
        if ray_node.exited() is not None:
            raise RuntimeError(f"`ray start` exited with {ray_node.exited()}")
        try:
            with open(ray_node.log_path, "rb") as log:
                log.seek(ray_node.log_offset)
                if _HEAD_STARTED.encode() in log.read():
                    return True
        except OSError:
            pass
        time.sleep(_POLL_S)
    return False


def _accepts(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0


def wait_for_nodes(node: Node, adir: Path, timeout: float, stop: threading.Event | None = None) -> None:
    """Until every node of the allocation is an alive Ray node (or ``stop`` is set); a node that
    failed to join, or the deadline, raises with the failing node's log."""
    import ray

    end = time.monotonic() + timeout
    while not (stop and stop.is_set()):
        failed = sorted(adir.glob("node-*.failed"))
        if failed:
            rank = failed[0].name.split("-")[1].split(".")[0]
            log_path = adir / f"node-{rank}.log"
            raise BootstrapError(f"node {rank} of the allocation could not join Ray "
                                 f"({failed[0].read_text().strip()}); {log_path}:\n{log_tail(log_path)}")
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive >= node.num_nodes:
            return
        if time.monotonic() > end:
            missing = [r for r in range(1, node.num_nodes)]
            tails = "\n".join(f"{adir / f'node-{r}.log'}:\n{log_tail(adir / f'node-{r}.log')}" for r in missing)
            raise BootstrapError(f"only {alive} of {node.num_nodes} nodes joined Ray within {timeout:.0f}s\n{tails}")
        time.sleep(_POLL_S)


def report_failure(adir: Path, node: Node, why: str) -> None:
    """Tell the head, which waits for every node to join (``wait_for_nodes``), that this one will not."""
    (adir / f"node-{node.rank}.failed").write_text(why)


def run_worker(node: Node, adir: Path, extra_args: list[str], timeout: float) -> int:
    """A non-first node: join the head once its address is published, then keep Ray up until the
    head says the attempt is done (or Ray exits). Returns the exit code for this task."""
    head_file, done_file = adir / "head", adir / "done"
    end = time.monotonic() + timeout
    while not head_file.exists():
        if done_file.exists():
            return 0
        if time.monotonic() > end:
            report_failure(adir, node, f"no Ray head address within {timeout:.0f}s")
            return 1
        time.sleep(_POLL_S)
    for attempt in range(1, START_ATTEMPTS + 1):
        ray_node = RayNode(node, adir, extra_args)
        ray_node.start(head_address=head_file.read_text().strip())  # the head's latest, if it was restarted
        try:
            while not done_file.exists():
                code = ray_node.exited()
                if code is not None:
                    break
                time.sleep(_POLL_S)
            else:
                return 0
        finally:
            ray_node.stop()
        if done_file.exists():
            return 0
        if attempt < START_ATTEMPTS:
            log.warning("`ray start` on %s exited with %s; joining again", node.name, code)
    report_failure(adir, node, f"`ray start` exited with {code}, {START_ATTEMPTS} times")
    return 1
