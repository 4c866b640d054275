"""Every code block of docs/writing-a-job.md, run as written: the job's files are written from the
guide, the Python blocks are executed, the shell blocks run through the real CLI.

One substitution: the guide's `smol` LLM is swapped for the scripted stand-in (canned replies: a
well-formed count and a malformed one), so this test does not start the model; the real model runs
the paper's scenarios in test_scenarios.py. The sandbox is the real bubblewrap one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import deadline

from matrix_hpc.job.spec import SlurmSpec

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-job.md"
SCRIPTED = {"backend": "scripted", "scripted": {"mode": "canned", "replies": ['{"words": 6}', "six words"]}}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), re.S)


def file_blocks() -> dict[str, str]:
    """Blocks whose first line is a comment naming their file: path -> the text after that line."""
    out = {}
    for lang in ("protobuf", "python", "json", "yaml"):
        for b in blocks(lang):
            first, _, rest = b.partition("\n")
            m = re.match(r"(?://|#) (jobs/\S+)$", first)
            if m:
                out[m.group(1)] = b if lang in ("protobuf", "python", "yaml") else rest
    return out


def cli(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line.split("#")[0])
    assert argv[0] == "matrix-hpc"
    return subprocess.run([sys.executable, "-m", "matrix_hpc.cli", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


@pytest.mark.slow
def test_the_guide_runs_as_written(ray_session, tmp_path, monkeypatch):
    files = file_blocks()
    assert sorted(files) == ["jobs/wordcount/agents.py", "jobs/wordcount/job.yaml", "jobs/wordcount/sentences.jsonl",
                             "jobs/wordcount/wordcount.proto"]
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    job_file = tmp_path / "jobs/wordcount/job.yaml"
    spec = yaml.safe_load(job_file.read_text())
    SlurmSpec.model_validate(spec["slurm"])
    spec["services"]["llm"]["smol"] = SCRIPTED
    job_file.write_text(yaml.safe_dump(spec))
    sentences = [json.loads(line) for line in files["jobs/wordcount/sentences.jsonl"].splitlines()]
    shell = [line for b in blocks("bash") for line in b.splitlines() if line.strip()]
    run_cmd, status_cmd, submit_cmd, resume_cmd, export_cmd, export_failed_cmd = shell
    assert submit_cmd == "matrix-hpc submit jobs/wordcount/job.yaml"  # the lead's Slurm tests run it

    with deadline(600):
        ran = cli(run_cmd, tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        status = cli(status_cmd, tmp_path)
        assert status.returncode == 0, status.stderr
        assert re.search(r"^done +3$", status.stdout, re.M) and re.search(r"^failed +0$", status.stdout, re.M), \
            status.stdout

        # the Python block: a second run of the same job in another run directory
        monkeypatch.chdir(tmp_path)
        spec["run"]["output_dir"] = "../../runs/wordcount-py"
        job_file.write_text(yaml.safe_dump(spec))
        python_run, load_export = blocks("python")[1:]
        scope: dict = {}
        exec(python_run, scope)
        assert (scope["summary"].done, scope["summary"].failed) == (3, 0)
        spec["run"]["output_dir"] = "../../runs/wordcount"
        job_file.write_text(yaml.safe_dump(spec))

        resumed = cli(resume_cmd, tmp_path)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        for cmd in (export_cmd, export_failed_cmd):
            exported = cli(cmd, tmp_path)
            assert exported.returncode == 0, exported.stdout + exported.stderr

    rows = pq.read_table(tmp_path / "wordcount.parquet").to_pylist()
    assert sorted(r["row_id"] for r in rows) == ["s1", "s2", "s3"]  # resuming wrote nothing twice
    for r in rows:
        truth = len(next(s["sentence"] for s in sentences if s["id"] == r["row_id"]).split())
        assert r["truth"] == truth  # counted in the sandbox
        assert r["guess"] in (6, -1)  # the canned JSON answer, or the malformed one recorded as -1
        assert r["right"] == (r["guess"] == truth)
    assert {r["guess"] for r in rows} == {6, -1}
    assert (tmp_path / "wordcount-failed.jsonl").read_text() == ""

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    scope = {}
    exec(load_export, scope)
    assert scope["ds"].num_rows == 3
    assert {"sentence", "guess", "truth", "right", "row_id", "task_id"} <= set(scope["ds"].column_names)
