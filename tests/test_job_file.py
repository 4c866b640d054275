"""Malformed job files and protos are reported with file, line and field, before anything runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from matrix_hpc.job.load import JobFileError, load_job

AGENTS = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"


@pytest.fixture
def job_dir(make_job) -> Path:
    return make_job(AGENTS, {"f": {"agent": "agents:f"}}, "f", rows=3).parent


def write_yaml(d: Path, text: str) -> Path:
    (d / "job.yaml").write_text(text)
    return d / "job.yaml"


VALID = """\
name: t
dataset:
  path: data.jsonl
  id_field: id
payload:
  proto: item.proto
  type: tests.t.Item
roles:
  f:
    agent: agents:f
first_role: f
"""


def error_of(path: Path) -> str:
    with pytest.raises(JobFileError) as e:
        load_job(path)
    return str(e.value)


def test_the_valid_job_loads(job_dir):
    job = load_job(write_yaml(job_dir, VALID))
    assert job.spec.roles["f"].agent == "agents:f" and set(job.fingerprint) == {
        "job_spec", "agent_code", "proto", "dataset"}


@pytest.mark.parametrize(
    "change, expected",
    [
        (("    agent: agents:f\n", "    agent: agents:f\n    replica: 2\n"), r"job.yaml:11: roles.f.replica: unknown key 'replica'"),
        (("first_role: f\n", "first_role: g\n"), r"job.yaml:11: first_role: 'g' is not one of the roles: f"),
        (("  id_field: id\n", "  id_field: id\n  limit: -1\n"), r"job.yaml:5: dataset.limit: Input should be greater than"),
        (("  type: tests.t.Item\n", ""), r"job.yaml:5: payload.type: missing required key 'type'"),
        (("    agent: agents:f\n", "    agent: agents\n"), r"job.yaml:10: roles.f.agent: 'agents' is not 'module:name'"),
        (("  path: data.jsonl\n", "  path: nothere.jsonl\n"), r"job.yaml:3: dataset.path: dataset file .*nothere.jsonl does not exist"),
        (("  type: tests.t.Item\n", "  type: tests.t.Nope\n"), r"job.yaml:7: payload.type: no message 'tests.t.Nope'.*defined there: tests.t.Item"),
        (("    agent: agents:f\n", "    agent: agents:g\n"), r"job.yaml:10: roles.f.agent: cannot load agent 'agents:g': AttributeError"),
        (("    agent: agents:f\n", "    agent: nomodule:f\n"), r"job.yaml:10: roles.f.agent: cannot load agent 'nomodule:f': ModuleNotFoundError"),
        (("roles:\n", "roles:\n  done:\n    agent: agents:f\n"), r"job.yaml:8: roles: 'done' cannot be a role name"),
        (("first_role: f\n", "first_role: f\nservices:\n  gpu: {}\n"), r"job.yaml:12: services: unknown service kind"),
        (("name: t\n", "name: t\nname2: x\n"), r"job.yaml:2: name2: unknown key 'name2'"),
    ],
)
def test_errors_name_file_line_and_field(job_dir, change, expected):
    old, new = change
    assert old in VALID
    msg = error_of(write_yaml(job_dir, VALID.replace(old, new)))
    assert re.search(expected, msg), msg
    assert str(job_dir / "job.yaml") in msg


def test_invalid_yaml_names_its_line(job_dir):
    msg = error_of(write_yaml(job_dir, VALID.replace("first_role: f", "first_role: [f")))
    assert re.search(r"job.yaml:1[23]: invalid YAML", msg), msg


def test_a_proto_that_does_not_compile_stops_with_protocs_message(job_dir):
    (job_dir / "item.proto").write_text('syntax = "proto3";\npackage tests.t;\nmessage Item {\n  strin text = 1;\n}\n')
    msg = error_of(write_yaml(job_dir, VALID))
    assert "job.yaml:6: payload.proto: the payload proto does not compile" in msg
    assert re.search(r"item.proto:4:\d+: .*strin", msg), msg


def test_from_row_must_name_payload_fields(job_dir):
    text = VALID.replace("  type: tests.t.Item\n", "  type: tests.t.Item\n  from_row: {txt: text}\n")
    msg = error_of(write_yaml(job_dir, text))
    assert "job.yaml:8: payload.from_row.txt: tests.t.Item has no field 'txt'" in msg


def test_an_agent_that_fails_on_import_is_reported(job_dir):
    (job_dir / "agents.py").write_text("import does_not_exist\n")
    msg = error_of(write_yaml(job_dir, VALID))
    assert "roles.f.agent: cannot load agent 'agents:f': ModuleNotFoundError: No module named 'does_not_exist'" in msg


def test_cli_reports_job_errors_with_exit_code_2(job_dir, capsys):
    from matrix_hpc.cli import main

    path = write_yaml(job_dir, VALID.replace("first_role: f\n", "first_role: f\nrun: {max_in_flight: 0}\n"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "job.yaml:12: run.max_in_flight: Input should be greater than or equal to 1" in err


def test_repo_jobs_load():
    for path in sorted(Path(__file__).resolve().parent.parent.glob("jobs/*/job.yaml")):
        job = load_job(path)
        assert job.spec.first_role in job.spec.roles, path
    json.dumps(job.fingerprint)
