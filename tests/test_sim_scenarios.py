"""The paper's three scenario jobs run on the simulated engine (`backend: sim`) with nothing changed
but the backend line: real Ray, the real gRPC LLM service around the simulator, real bubblewrap
sandboxes for the jobs that have them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import deadline

from matrix_hpc import load_job, run
from matrix_hpc.store import export

JOBS = Path(__file__).resolve().parent.parent / "jobs"
SHIPPED = "smol: {backend: vllm, model: smollm2-135m, replicas: 1}"
ROWS = 4


@pytest.mark.parametrize("name", ["collab_reasoning", "code_verify", "tool_use"])
def test_scenario_job_runs_on_the_simulated_engine(name, tmp_path, ray_session):
    job_dir = tmp_path / name
    shutil.copytree(JOBS / name, job_dir)
    text = (job_dir / "job.yaml").read_text()
    assert text.count(SHIPPED) == 1, "the job declares the embedded engine on one line"
    (job_dir / "job.yaml").write_text(text.replace(SHIPPED, SHIPPED.replace("backend: vllm", "backend: sim")))
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec["dataset"]["limit"] = ROWS
    spec["run"]["output_dir"] = "out"
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))

    job = load_job(job_dir / "job.yaml")
    with deadline(240):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (ROWS, 0)
    out = tmp_path / "out.jsonl"
    assert export(job.run_dir, out, format="jsonl") == ROWS
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["row_index"] for r in rows) == list(range(ROWS))
    assert "sim0 sim1" in json.dumps(rows), "the simulator's words (never a model's) are in the payloads"


def test_the_summary_of_a_simulated_run_says_so(tmp_path):
    job_dir = tmp_path / "collab_reasoning"
    shutil.copytree(JOBS / "collab_reasoning", job_dir)
    spec = yaml.safe_load((job_dir / "job.yaml").read_text().replace(SHIPPED, SHIPPED.replace("vllm", "sim")))
    spec["dataset"]["limit"] = 2
    spec["run"]["output_dir"] = "out"
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "run", str(job_dir / "job.yaml"), "--no-progress"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == ("SIMULATED: LLM service(s) smol ran the sim backend (an engine's timing, "
                                          "not a model's words)")
