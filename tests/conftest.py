"""Shared fixtures: one real local Ray for the session, and a factory for small jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROTO = """
syntax = "proto3";
package tests.{pkg};
message Item {{
  string text = 1;
  int64 n = 2;
  repeated string path = 3;
  bytes blob = 4;
}}
"""


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One Ray for the session, on loopback with token auth like a run's own (runtime.security)."""
    import ray

    from matrix_hpc.runtime.security import LocalRay

    with LocalRay(tmp_path_factory.mktemp("ray"), num_cpus=2, object_store_memory=512 * 1024**2,
                  log_to_driver=False):
        yield ray


@pytest.fixture
def make_job(tmp_path: Path):
    """Write a job folder (proto, agents, dataset, job.yaml) and return the job.yaml path."""

    def make(agents: str, roles: dict, first_role: str, rows: int | list[dict] = 10, *, run: dict | None = None,
             dataset: dict | None = None, payload: dict | None = None, name: str = "t",
             services: dict | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "item.proto").write_text(PROTO.format(pkg=name))
        (d / "agents.py").write_text(textwrap.dedent(agents))
        data = [{"id": f"r{i}", "text": f"row {i}", "n": i} for i in range(rows)] if isinstance(rows, int) else rows
        (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        spec = {
            "name": name,
            "dataset": {"path": "data.jsonl", "id_field": "id", **(dataset or {})},
            "payload": {"proto": "item.proto", "type": f"tests.{name}.Item", **(payload or {})},
            "roles": roles,
            "first_role": first_role,
            "run": {"output_dir": "out", "commit_interval_s": 0.2, **(run or {})},
            **({"services": services} if services else {}),
        }
        (d / "job.yaml").write_text(json.dumps(spec, indent=2))
        return d / "job.yaml"

    return make


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def _raise(*_):
        raise TimeoutError(f"did not finish within {seconds}s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def session_pids(sid: int) -> set[int]:
    """Every process of session ``sid`` (a process started with start_new_session=True has sid == pid)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}


def listening(pids: set[int], *, udp: bool = False) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP (and with ``udp`` UDP) socket these processes
    listen on (`ss`)."""
    out = subprocess.run(["ss", "-lntupH" if udp else "-ltnpH"], capture_output=True, text=True, check=True).stdout
    local = 4 if udp else 3  # the netid column comes first with -u
    found = []
    for line in out.splitlines():
        owners = {int(p): n for n, p in re.findall(r'\("([^"]+)",pid=(\d+)', line)}
        if owners.keys() & pids:
            addr, port = line.split()[local].rsplit(":", 1)
            found.append((addr, int(port), next(n for p, n in owners.items() if p in pids)))
    return found
