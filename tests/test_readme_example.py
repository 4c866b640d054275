"""The job in README.md's "Writing a job" section runs as written (its LLM swapped for the
scripted stand-in, so the test does not need the model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from conftest import deadline

from matrix_hpc import load_job, run

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_job_example_runs(ray_session, tmp_path):
    d = tmp_path / "qa"
    d.mkdir()
    proto = next(b for b in blocks("protobuf") if "jobs/qa/qa.proto" in b)
    agents = next(b for b in blocks("python") if "jobs/qa/agents.py" in b)
    spec = yaml.safe_load(next(b for b in blocks("yaml") if "jobs/qa/job.yaml" in b))
    (d / "qa.proto").write_text(proto)
    (d / "agents.py").write_text(agents)
    spec["services"] = {"llm": {"smol": {"backend": "scripted", "scripted": {"mode": "canned",
                                                                            "replies": ["I don't know", "42"]}}}}
    (d / "job.yaml").write_text(yaml.safe_dump(spec))
    (d / "questions.jsonl").write_text("".join(json.dumps({"id": i, "q": f"question {i}?"}) + "\n" for i in range(30)))
    with deadline(120):
        summary = run(load_job(d / "job.yaml"), progress=False)
    assert (summary.done, summary.failed) == (30, 0)
    # each answer is followed by one critique; some answers are asked again
    assert summary.steps["answer"] == summary.steps["critic"] >= 30
