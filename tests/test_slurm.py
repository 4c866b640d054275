"""`matrix-hpc submit` on the real local Slurm of slurm/ (two nodes on 127.0.0.2 and 127.0.0.3),
submitting as an ordinary user: 2-node runs, preemption -> checkpoint -> requeue -> resume, cancel ->
resume, bad settings refused with Slurm's reason, a Ray worker that cannot join.

`make test` starts the local Slurm (slurm/local-slurm-up.sh) and stops it after the suite. The agents
are plain Python (no LLM) and append "task step node" to calls.log, which counts every step run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import PROTO

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.rundir import RunDir
from matrix_hpc.store import RunStore

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONF = Path(os.environ.get("TMPDIR", "/tmp")) / "matrix-hpc-slurm" / "slurm.conf"
STEPS = 6
AGENTS = f"""
import asyncio, os
from matrix_hpc import DONE

STEPS = {STEPS}

def _count(ctx):
    fd = os.open(os.path.join(os.path.dirname(__file__), "calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{{ctx.task_id}} {{ctx.step}} {{os.environ.get('SLURMD_NODENAME')}}\\n".encode())
    os.close(fd)

async def ping(item, ctx):
    await asyncio.sleep(float(os.environ.get("STEP_S", "0.3")) * (0.5 + ctx.random.random()))
    try:
        llm = ctx.llm("echo")  # declared by the jobs that test a service across the nodes
    except KeyError:
        llm = None
    if llm is not None:
        reply = await llm.chat(f"{{ctx.task_id}} {{ctx.step}}")
        assert reply.text == f"{{ctx.task_id}} {{ctx.step}}", reply.text
    _count(ctx)
    print(f"ping {{ctx.task_id}} {{ctx.step}} on {{os.environ.get('SLURMD_NODENAME')}}", flush=True)
    item.path.append(f"ping{{ctx.step}}")
    return "pong"

async def pong(item, ctx):
    await asyncio.sleep(float(os.environ.get("STEP_S", "0.3")) * (0.5 + ctx.random.random()))
    _count(ctx)
    item.path.append(f"pong{{ctx.step}}")
    return DONE if ctx.step + 1 >= STEPS else "ping"
"""


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    conf = os.environ.get("SLURM_CONF") or str(DEFAULT_CONF)
    if not shutil.which("sbatch") or not Path(conf).exists():
        pytest.skip("no local Slurm: run slurm/local-slurm-up.sh as root (make test does)")
    env = {**os.environ, "SLURM_CONF": conf}
    if subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode != 0:
        pytest.skip(f"the local Slurm of {conf} does not answer: run slurm/local-slurm-up.sh")
    os.environ["SLURM_CONF"] = conf
    return conf


class SlurmRun:
    """A job folder owned by the test user, and `matrix-hpc` run as that user against the local Slurm."""

    def __init__(self, user, folder: Path, conf: str, rows: int, slurm: dict, step_s: float, in_flight: int,
                 services: dict):
        self.user, self.dir, self.rows = user, folder / "job", rows
        self.run_dir = self.dir / "out"
        self.env = {"SLURM_CONF": conf, "MATRIX_HPC_NODE_LOCAL_PATHS": "", "STEP_S": str(step_s),
                    "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
        self.job_ids: list[str] = []
        self.dir.mkdir()
        (self.dir / "item.proto").write_text(PROTO.format(pkg="slurmjob"))
        (self.dir / "agents.py").write_text(AGENTS)
        (self.dir / "data.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}", "n": i}) + "\n"
                                                     for i in range(rows)))
        spec = {"name": "slurmjob", "dataset": {"path": "data.jsonl", "id_field": "id"},
                "payload": {"proto": "item.proto", "type": "tests.slurmjob.Item"},
                "roles": {"ping": {"agent": "agents:ping", "replicas": 2}, "pong": {"agent": "agents:pong", "replicas": 2}},
                "first_role": "ping", "services": services,
                "run": {"output_dir": "out", "commit_interval_s": 0.2, "checkpoint_interval_s": 1,
                        "max_in_flight": in_flight},
                "slurm": {"time_min": 10, "signal_delay_s": 10, **slurm}}
        (self.dir / "job.yaml").write_text(json.dumps(spec, indent=1))
        for p in [folder, *folder.rglob("*")]:
            os.chown(p, user.uid, user.gid)

    @property
    def job(self) -> Path:
        return self.dir / "job.yaml"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.user.run([sys.executable, "-m", "matrix_hpc.cli", *args], env=self.env, timeout=timeout,
                             cwd=self.dir)

    def submit(self, *args: str) -> str:
        out = self.cli("submit", str(self.job), *args)
        assert out.returncode == 0, out.stdout + out.stderr
        job_id = re.search(r"submitted Slurm job (\d+)", out.stdout).group(1)
        self.job_ids.append(job_id)
        return job_id

    def state(self, job_id: str) -> str | None:
        """The job's state in squeue, "" once it has left the queue, None if squeue did not answer
        (slurmctld busy: that is not the job's end)."""
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return "" if "Invalid job id" in out.stderr else None
        return out.stdout.strip()

    def calls(self) -> Counter:
        path = self.dir / "calls.log"
        return Counter(tuple(line.split()[:2]) for line in path.read_text().splitlines()) if path.exists() else Counter()

    def nodes_that_ran_steps(self, role_parity: int | None = None) -> set[str]:
        """Nodes that ran steps (only the ping steps, the even ones, with ``role_parity=0``)."""
        lines = [line.split() for line in (self.dir / "calls.log").read_text().splitlines()]
        return {node for _, step, node in lines if role_parity is None or int(step) % 2 == role_parity}

    def committed(self) -> set[str]:
        try:
            return set(RunStore.open(self.run_dir).committed())
        except Exception:  # noqa: BLE001 - no store yet
            return set()

    def logs(self) -> str:
        """The allocation's logs, the per-node view and the nodes the agents' steps ran on."""
        view = self.run_dir / "logs" / "nodes.json"
        calls = self.dir / "calls.log"
        steps_by_node = Counter(line.split()[2] for line in calls.read_text().splitlines()) if calls.exists() else {}
        return "\n".join([*(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted((self.run_dir / "slurm").rglob("*.err")) + sorted(
                                 (self.run_dir / "slurm").rglob("node-*.log")) + sorted(
                                 (self.run_dir / "logs").glob("*.log"))),
                           f"--- {view}\n{view.read_text() if view.exists() else '(none)'}",
                           f"--- steps by node (calls.log): {dict(steps_by_node)}"])

    def wait(self, condition, timeout: float, what: str, job_id: str | None = None) -> None:
        """Poll ``condition`` until it holds; fail with the run's logs on the deadline, or at once if
        ``job_id`` has ended meanwhile."""
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            if job_id and self.state(job_id) == "" and not condition():
                raise AssertionError(f"job {job_id} ended before {what}\n{self.logs()}")
            time.sleep(0.5)

    def wait_ended(self, job_id: str, timeout: float) -> None:
        self.wait(lambda: self.state(job_id) == "", timeout, f"job {job_id} to end")

    def snapshot_steps(self) -> dict[str, int]:
        """The latest snapshot's task -> step ({} before the first). Read while the run writes the
        next one: a read that catches a snapshot half-written (KeyError in the store) is read again."""
        for _ in range(50):
            try:
                snap = RunStore.open(self.run_dir).latest_snapshot()
                break
            except Exception:  # noqa: BLE001 - no store yet, or a snapshot being written
                time.sleep(0.05)
        else:
            snap = None
        return {t.task_id: t.step for t in map(task_pb2.Task.FromString, snap[0])} if snap else {}

    def check_complete(self) -> None:
        store = RunStore.open(self.run_dir)
        got = [task_pb2.Task.FromString(d) for d in store.iter_results()]
        assert Counter(t.task_id for t in got) == Counter({f"r{i}#0": 1 for i in range(self.rows)})
        assert all(t.status == task_pb2.TASK_STATUS_DONE and t.step == STEPS for t in got)
        calls = self.calls()
        assert all(calls[(f"r{i}#0", str(s))] >= 1 for i in range(self.rows) for s in range(STEPS))

    def check_continued(self, before: Counter, snapshot: dict[str, int], committed: set[str]) -> None:
        """After an interruption (``before``: the step counts then; ``snapshot``: the checkpoint it
        took; ``committed``: the rows committed by then): committed rows never ran again, and tasks
        part-way through continued from their saved step, so their earlier steps ran once. (The step
        a task was inside at the checkpoint runs again: its result was not saved.)"""
        after = self.calls()
        for tid in committed:
            assert after[(tid, str(STEPS - 1))] == before[(tid, str(STEPS - 1))] == 1, tid
        mid_way = [tid for tid, step in snapshot.items() if tid not in committed and step > 0]
        assert mid_way, "no task was part-way through at the interruption"
        for tid in mid_way:
            for s in range(snapshot[tid]):
                assert after[(tid, str(s))] == 1, (tid, s, snapshot[tid])


@pytest.fixture
def slurm_run(slurm_conf, unprivileged_user, user_dir):
    made: list[SlurmRun] = []

    def make(rows: int, slurm: dict | None = None, step_s: float = 0.3, in_flight: int = 1000,
             services: dict | None = None) -> SlurmRun:
        r = SlurmRun(unprivileged_user, user_dir, slurm_conf, rows, slurm or {}, step_s, in_flight, services or {})
        made.append(r)
        return r

    yield make
    for r in made:  # nothing keeps running after a test, pass or fail
        for job_id in r.job_ids:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        for job_id in r.job_ids:
            r.wait_ended(job_id, 60)


def preempt_both_nodes() -> str:
    """A job in the high partition that needs every CPU of both nodes: it preempts whatever runs there."""
    out = subprocess.run(["sbatch", "-p", "high", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1"],
                         capture_output=True, text=True, check=True, timeout=30)
    return re.search(r"(\d+)", out.stdout).group(1)


def test_submit_dry_run_prints_the_sbatch_script_with_overrides(slurm_run):
    r = slurm_run(rows=3, slurm={"nodes": 2, "gpus_per_node": 1, "partition": "debug", "extra": {"comment": "x"}})
    out = r.cli("submit", str(r.job), "--dry-run", "--nodes", "1", "--time-min", "7")
    assert out.returncode == 0, out.stderr
    flags = {line for line in out.stdout.splitlines() if line.startswith("#SBATCH")}
    assert {"#SBATCH --nodes=1", "#SBATCH --time=7", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=debug",
            "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=USR2@10",
            "#SBATCH --comment=x"} <= flags
    assert "srun" in out.stdout and "submitit.core._submit" in out.stdout
    assert not r.run_dir.exists()  # a dry run submits and creates nothing


def test_sbatch_script_runs_the_entry_on_every_node(slurm_run):
    r = slurm_run(rows=3, slurm={"nodes": 2})
    out = r.cli("sbatch-script", str(r.job))
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "#SBATCH --signal=USR2@10" in out.stdout
    assert re.search(r"srun .*-m matrix_hpc\.slurm\.entry \S+/job\.yaml \S+/out", out.stdout)
    assert RunDir(r.run_dir).record().options["max_requeues"] == 10


def test_a_node_gets_what_slurm_granted_and_its_cluster_address(slurm_conf):
    from matrix_hpc.slurm.bootstrap import Node

    env = {"SLURM_PROCID": "1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3",
           "SLURMD_NODENAME": "node2", "SLURM_CPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1",
           "SLURM_GPUS_ON_NODE": "2"}
    assert Node.from_env(env) == Node(rank=1, num_nodes=2, job_id="77", restart=3, name="node2", ip="127.0.0.3",
                                      cpus=2, gpus=2)
    no_gpu = Node.from_env({**env, "CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0", "SLURMD_NODENAME": "node1"})
    assert (no_gpu.gpus, no_gpu.ip) == (0, "127.0.0.2")


def test_the_per_node_view_counts_dead_incarnations_and_keeps_each_nodes_latest_error():
    from matrix_hpc.runtime.nodes import describe, node_view

    error = {"error": "ValueError: bad row", "role": "ping", "task_id": "r7#0", "step": 2, "at": 20.0}
    older = {**error, "error": "KeyError: 'x'", "at": 10.0}
    dead = {"node": "1 node2", "steps": 5, "inbox": 9, "active": 1, "last_error": older}  # a restarted actor's
    live = [{"node": "0 node1", "steps": 7, "inbox": 2, "active": 1, "last_error": None},
            {"node": "1 node2", "steps": 3, "inbox": 0, "active": 4, "last_error": error}]
    view = node_view(live, [dead, *live])
    assert describe(view) == [
        "node 0 node1: 3 task(s) in flight, 7 step(s)",
        "node 1 node2: 4 task(s) in flight, 8 step(s); last error ValueError: bad row (role ping, task r7#0)"]


def test_unknown_slurm_key_is_a_file_line_error(slurm_run):
    r = slurm_run(rows=3)
    r.job.write_text(r.job.read_text().replace('"time_min"', '"partiton": "x", "time_min"'))
    out = r.cli("submit", str(r.job))
    assert out.returncode == 2
    assert re.search(r"job\.yaml:\d+: slurm\.partiton: unknown key", out.stderr), out.stderr


@pytest.mark.parametrize("settings, reason", [
    (["--partition", "nosuch"], "invalid partition specified: nosuch"),
    (["--gpus-per-node", "3"], "Requested node configuration is not available"),
    (["--nodes", "5"], "the partition debug can never run this job: nodes 5 is more than it has or allows (2)"),
    (["--mem-gb", "100", "--dry-run"], "Requested node configuration is not available"),
    (["--cpus-per-node", "3", "--dry-run"], "Requested node configuration is not available"),
])
def test_requests_the_cluster_can_never_satisfy_are_refused_at_submit_and_dry_run(slurm_run, settings, reason):
    tag = f"refused-{os.getpid()}-{settings[1]}"
    r = slurm_run(rows=3, slurm={"extra": {"comment": tag}})
    out = r.cli("submit", str(r.job), *settings)
    assert out.returncode == 2
    assert reason in out.stderr, out.stderr
    assert RunDir(r.run_dir).slurm_job_id() is None
    comments = subprocess.run(["squeue", "-h", "-o", "%k"], capture_output=True, text=True, timeout=30).stdout
    assert tag not in comments.split()  # nothing left pending


def test_limits_of_the_partition_that_slurm_would_leave_pending_are_ours_to_refuse(slurm_conf):
    """With EnforcePartLimits=NO (the local Slurm's and Slurm's default) a job over MaxTime pends
    forever; the partition's fields as `scontrol show partition` gives them, with limits set."""
    from matrix_hpc.job.spec import SlurmSpec
    from matrix_hpc.slurm.checks import beyond_partition, partition_fields, slurm_minutes

    fields = partition_fields(None)
    assert fields["PartitionName"] == "debug" and beyond_partition(SlurmSpec(nodes=2, time_min=10**6), fields) == []
    limited = {**fields, "MaxTime": "1-00:00:00", "MaxNodes": "1", "MaxCPUsPerNode": "1", "MaxMemPerNode": "2048"}
    assert beyond_partition(SlurmSpec(nodes=2, time_min=1441, cpus_per_node=2, mem_gb=3), limited) == [
        "time_min 1441 is over its MaxTime 1-00:00:00 (1440 min)", "nodes 2 is more than it has or allows (1)",
        "cpus_per_node 2 is over its MaxCPUsPerNode 1", "mem_gb 3 is over its MaxMemPerNode 2048 MB"]
    assert beyond_partition(SlurmSpec(nodes=1, time_min=1440, cpus_per_node=1, mem_gb=2), limited) == []
    assert [slurm_minutes(t) for t in ("30", "30:30", "2:00:00", "1-2", "2-00:30:00", "UNLIMITED")] == [
        30, 30.5, 120, 1560, 2910, None]


def test_node_local_run_directory_is_refused_for_several_nodes(slurm_run):
    r = slurm_run(rows=3, slurm={"nodes": 2})
    r.env.pop("MATRIX_HPC_NODE_LOCAL_PATHS")  # the default: /tmp is private to each node
    out = r.cli("submit", str(r.job))
    assert out.returncode == 2
    assert f"the run directory {r.run_dir} is on a node-local path (/tmp)" in out.stderr, out.stderr
    venv = Path(sys.prefix).resolve()
    r.env["MATRIX_HPC_NODE_LOCAL_PATHS"] = str(venv)  # the venv is checked like the others
    out = r.cli("submit", str(r.job), "--dry-run")
    assert out.returncode == 2
    assert f"the Python environment (the venv every node runs) {venv} is on a node-local path ({venv})" \
        in out.stderr, out.stderr


@pytest.mark.slow
def test_two_node_run_hits_its_time_limit_requeues_and_commits_every_row_once(slurm_run):
    rows = 200
    # 40 rows in flight, 6 steps of 1-3 s (jittered, so rows do not move in lockstep): about 60 s of
    # work, spread over both nodes; every ping step calls an LLM service (the scripted stand-in, two
    # replicas, one on each node).
    r = slurm_run(rows=rows, slurm={"nodes": 2, "signal_delay_s": 60}, step_s=2.0, in_flight=40,
                  services={"llm": {"echo": {"backend": "scripted", "replicas": 2}}})
    job_id = r.submit()
    again = r.cli("submit", str(r.job))  # never submitted twice
    assert again.returncode == 2 and f"as Slurm job {job_id}" in again.stderr, again.stderr
    r.wait(lambda: len(r.committed()) >= 1, 180, "the first commit", job_id)
    # Shorten the time limit of the running job to 2 minutes from now: Slurm sends USR2
    # signal_delay_s before it ends (give or take its 30 s timer), the run checkpoints and requeues itself.
    elapsed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    minutes = sum(int(x) * 60**i for i, x in enumerate(reversed(elapsed.split(":")))) // 60
    subprocess.run(["scontrol", "update", f"jobid={job_id}", f"timelimit={minutes + 2}"], check=True, timeout=30)
    r.wait(lambda: any((r.run_dir / "slurm" / "ray").glob(f"{job_id}.1")), 150, "the requeued job to start")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "timelimit=10"], check=True, timeout=30)
    snapshot, committed, before = r.snapshot_steps(), r.committed(), r.calls()  # as the USR2 checkpoint left them
    assert len(committed) < rows, "the run finished before its time limit"
    # Node 0's stderr, and the driver's log, where it writes while the run goes on.
    first_err = (r.run_dir / "slurm" / f"{job_id}_0_log.err").read_text() + (r.run_dir / "logs" / "run.log").read_text()
    assert "got SIGUSR2" in first_err and f"requeueing job {job_id}" in first_err, first_err
    r.wait_ended(job_id, 240)

    r.check_complete()
    r.check_continued(before, snapshot, committed)
    assert r.nodes_that_ran_steps(role_parity=0) == {"node1", "node2"}  # ping steps, each calling the LLM
    # The replicas spread over the nodes, each bound to its node's cluster address (not 127.0.0.1).
    serving = re.search(r"LLM 'echo': 2 replica\(s\) serving .*", first_err)
    assert serving and {"127.0.0.2", "127.0.0.3"} == set(re.findall(r"127\.0\.0\.\d+", serving.group())), first_err
    status = r.cli("status", str(r.run_dir))
    assert re.search(rf"slurm +job {job_id} completed.*requeued 1 time", status.stdout), status.stdout
    logs = r.cli("logs", str(r.run_dir), "--node", "1")
    assert "node 1/2 node2 (127.0.0.3)" in logs.stdout, logs.stdout
    logs = r.cli("logs", str(r.run_dir))
    assert "node 0/2 node1 (127.0.0.2)" in logs.stdout and "LLM 'echo'" in logs.stdout, logs.stdout


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_then_cancel_and_resume(slurm_run):
    rows = 160
    # 40 rows in flight at a time, 6 steps of 1-3 s: about 48 s of work.
    r = slurm_run(rows=rows, slurm={"nodes": 2}, step_s=2.0, in_flight=40)
    job_id = r.submit()
    r.wait(lambda: (done := r.committed()) and any(s > 0 and t not in done for t, s in r.snapshot_steps().items()),
           180, "a first commit and a snapshot with tasks part-way through", job_id)
    preempt_both_nodes()
    r.wait(lambda: any((r.run_dir / "slurm" / "ray").glob(f"{job_id}.1")), 120, "the requeued job to start")
    snapshot = r.snapshot_steps()  # the checkpoint taken on USR2, the last before the requeue
    committed = r.committed()
    before = r.calls()
    assert len(committed) < rows, "the run finished before the preemption"

    # The requeued job runs; cancel it (checkpoint first), then resume it with a new submission.
    r.wait(lambda: len(r.committed()) > len(committed), 180, "the requeued job's first new commit")
    cancelled = r.cli("cancel", str(r.run_dir), timeout=180)
    assert cancelled.returncode == 0 and "checkpointed and stopped" in cancelled.stdout, cancelled.stdout
    assert len(r.committed()) < rows, "the run finished before the cancel"
    resumed = r.cli("resume", str(r.run_dir))
    assert resumed.returncode == 0, resumed.stderr
    new_id = re.search(r"as Slurm job (\d+)", resumed.stdout).group(1)
    r.job_ids.append(new_id)
    r.wait_ended(new_id, 240)

    r.check_complete()
    r.check_continued(before, snapshot, committed)
    status = r.cli("status", str(r.run_dir))
    assert f"committed   {rows} (100.0%)" in status.stdout and "completed" in status.stdout, status.stdout


@pytest.mark.slow
def test_one_writer_on_slurm_then_a_forced_resume_and_never_a_second_submission(slurm_run):
    """While a submitted job runs, a local run, a resume and a plain sbatch job of the same run
    directory are refused, naming the job; after a cancel, a changed job resumes only with --force
    (checked before submitting, and --force reaches the allocation); a complete run is never resubmitted."""
    rows = 40
    # 1 node, 4 rows in flight, 6 steps of 1-3 s: about two minutes of work, far longer than the checks.
    r = slurm_run(rows=rows, step_s=2.0, in_flight=4)
    job_id = r.submit()
    r.wait(lambda: len(r.committed()) >= 1, 180, "the first commit", job_id)
    holder = RunDir(r.run_dir).holder()
    assert (holder.command, holder.slurm_job_id) == ("slurm job", job_id)  # adopted by the job's first node
    for argv in (["run", str(r.job), "--no-progress"], ["resume", str(r.run_dir)]):
        out = r.cli(*argv)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"{r.run_dir} is already running as Slurm job {job_id} (pid {holder.pid} on" in out.stderr, out.stderr
    script = r.dir / "run.sbatch"
    assert r.cli("sbatch-script", str(r.job), "--output", str(script)).returncode == 0
    sbatch = r.user.run(["sbatch", "--parsable", str(script)], env=r.env, timeout=60)
    assert sbatch.returncode == 0, sbatch.stderr
    second = sbatch.stdout.strip().split(";")[0]
    r.job_ids.append(second)
    r.wait_ended(second, 180)
    err = RunDir(r.run_dir).node_log(second, 0, "err").read_text()
    assert f"not run: {r.run_dir} is already running as Slurm job {job_id}" in err, err
    assert r.state(job_id) == "RUNNING" and RunDir(r.run_dir).slurm_job_id() == job_id

    cancelled = r.cli("cancel", str(r.run_dir), timeout=180)
    assert cancelled.returncode == 0 and "checkpointed and stopped" in cancelled.stdout, cancelled.stdout
    kept = len(r.committed())
    assert 0 < kept < rows, "the run finished before the cancel"
    (r.dir / "agents.py").write_text((r.dir / "agents.py").read_text() + "\n# edited\n")
    refused = r.cli("resume", str(r.run_dir))
    assert refused.returncode == 2 and "changed since: agent_code" in refused.stderr, refused.stderr
    assert RunDir(r.run_dir).slurm_job_id() == job_id  # refused before anything was submitted
    r.env["STEP_S"] = "0.05"
    forced = r.cli("resume", str(r.run_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    new_id = re.search(r"as Slurm job (\d+)", forced.stdout).group(1)
    r.job_ids.append(new_id)
    r.wait_ended(new_id, 240)
    r.check_complete()
    assert RunDir(r.run_dir).record().force is True
    state = subprocess.run(["sacct", "-j", new_id, "-X", "-n", "-o", "State"], capture_output=True, text=True,
                           timeout=30).stdout
    assert "COMPLETED" in state, state + r.logs()
    again = r.cli("resume", str(r.run_dir), "--force")
    assert again.returncode == 0 and "this run is already complete" in again.stdout, again.stdout + again.stderr
    assert RunDir(r.run_dir).slurm_job_id() == new_id  # nothing submitted


@pytest.mark.slow
def test_a_worker_that_cannot_join_fails_the_run_with_its_log(slurm_run):
    r = slurm_run(rows=5, slurm={"nodes": 2})
    # A real `ray start` failure on the second node only: an argument it rejects.
    job_id = r.submit("--ray-worker-args=--resources=not-json")
    r.wait_ended(job_id, 180)
    err = (r.run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "node 1 of the allocation could not join Ray" in err, err
    assert "--resources=not-json" in err  # the tail of the worker's own log
    # squeue forgets the job before the accounting records its end: wait for sacct's final state.
    r.wait(lambda: sacct_state(job_id).split("|")[0] not in ("", "RUNNING", "PENDING", "COMPLETING"), 60,
           f"sacct to record job {job_id}'s end")
    assert sacct_state(job_id).startswith("FAILED|"), sacct_state(job_id)


def test_the_jobs_ray_uses_the_runs_token_whatever_the_shell_said(tmp_path):
    """sbatch passes the submitting shell's environment on: RAY_AUTH_MODE=disabled there must not
    leave the job's Ray (on cluster addresses) open to every user of the nodes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    code = ("import os, pathlib, sys; from matrix_hpc.slurm.entry import _private_ray; "
            "_private_ray(pathlib.Path(sys.argv[1])); print(os.environ['RAY_AUTH_MODE'], "
            "os.environ['RAY_AUTH_TOKEN_PATH'], oct(os.umask(0)))")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "from-the-shell"}
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    mode, token_path, umask = out
    assert (mode, umask) == ("token", "0o77")
    assert Path(token_path).parent == run_dir / "credentials"
    assert Path(token_path).stat().st_mode & 0o777 == 0o600 and len(Path(token_path).read_text().strip()) >= 32


def sacct_state(job_id: str) -> str:
    return subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


@pytest.mark.slow
def test_a_run_started_by_plain_sbatch_is_seen_cancelled_resumed_and_cleaned_up_after_scancel(slurm_run):
    """The sbatch path is first-class: status (Slurm state, per node), logs --node N (the actors'
    output there), cancel, resume; a plain scancel stops it cleanly and leaves no scratch on the nodes."""
    rows = 120
    r = slurm_run(rows=rows, slurm={"nodes": 2}, step_s=2.0, in_flight=20)
    script = r.dir / "run.sbatch"
    made = r.cli("sbatch-script", str(r.job), "--output", str(script))
    assert made.returncode == 0, made.stderr
    submitted = r.user.run(["sbatch", str(script)], env=r.env, timeout=60)
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    r.job_ids.append(job_id)
    view = lambda: json.loads((r.run_dir / "logs" / "nodes.json").read_text())  # noqa: E731
    r.wait(lambda: len(r.committed()) >= 1 and (r.run_dir / "logs" / "nodes.json").exists() and len(view()) == 2
           and all(node["steps"] >= 1 for node in view().values()), 240, "a first commit and steps on both nodes", job_id)

    status = r.cli("status", str(r.run_dir))
    assert re.search(rf"slurm +job {job_id} running on node\[1-2\]", status.stdout), status.stdout
    for rank, name in ((0, "node1"), (1, "node2")):
        assert re.search(rf"node {rank} {name}: \d+ task\(s\) in flight, [1-9]\d* step\(s\)", status.stdout), \
            status.stdout
    # A ping step prints as it starts; node 2's agents may so far have run only pong steps.
    node_1_logs = lambda: r.cli("logs", str(r.run_dir), "--node", "1").stdout  # noqa: E731
    r.wait(lambda: re.search(r"ping r\d+#0 \d+ on node2", node_1_logs()), 120, "a ping on node 2 in its log", job_id)
    logs = r.cli("logs", str(r.run_dir), "--node", "1")
    assert "node 1/2 node2 (127.0.0.3)" in logs.stdout, logs.stdout
    assert not re.search(r"ping r\d+#0 \d+ on node1", logs.stdout)

    cancelled = r.cli("cancel", str(r.run_dir), timeout=180)
    assert cancelled.returncode == 0 and "checkpointed and stopped" in cancelled.stdout, cancelled.stdout + r.logs()
    status = r.cli("status", str(r.run_dir))
    assert re.search(rf"slurm +job {job_id} cancelled", status.stdout), status.stdout
    state, exit_code = sacct_state(job_id).split("|")
    assert exit_code != "0:0" and state != "COMPLETED", (state, exit_code)
    assert len(r.committed()) < rows, "the run finished before the cancel"

    resumed = r.cli("resume", str(r.run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    second = re.search(r"as Slurm job (\d+)", resumed.stdout).group(1)
    r.job_ids.append(second)
    before = len(r.committed())
    r.wait(lambda: len(r.committed()) > before, 240, "the resumed job's first new commit", second)
    subprocess.run(["scancel", second], check=True, timeout=30)  # SIGTERM to every process of the job
    r.wait_ended(second, 60)
    left = [p.name for p in Path("/tmp").glob(f"mhpc-{second}.*")]  # each node's Ray folder
    assert not left, left
    assert sacct_state(second).split("|")[0].startswith("CANCELLED")
    node0 = (r.run_dir / "slurm" / f"{second}_0_log.err").read_text() + (r.run_dir / "logs" / "run.log").read_text()
    assert "got SIGTERM" in node0 and "Aborted" not in node0, node0
    assert "node1: task 0: Exited with exit code 143" in node0 and "node2: task 1: Exited with exit code 143" in node0

    third = re.search(r"as Slurm job (\d+)", r.cli("resume", str(r.run_dir)).stdout).group(1)
    r.job_ids.append(third)
    r.wait_ended(third, 300)
    r.check_complete()

