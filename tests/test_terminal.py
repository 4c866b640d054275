"""What a run shows: start-up phases, one progress display with warnings summarized below it,
Ray's worker output in the run's log file instead of the terminal, processes named by role."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import deadline

from matrix_hpc import load_job, run
from matrix_hpc.runtime.progress import Terminal

NOISY = """
import logging
from matrix_hpc import DONE

async def f(item, ctx):
    if item.n % 10 == 0:
        print(f"agent print {item.n}")
        logging.getLogger("agents").warning("row %d looks odd", item.n)
    return "g"

async def g(item, ctx):
    return DONE
"""
ROLES = {"f": {"agent": "agents:f", "replicas": 2}, "g": {"agent": "agents:g"}}


def test_phases_progress_and_warnings_on_a_plain_stream(tmp_path):
    out = io.StringIO()
    term = Terminal(enabled=True, stream=out)
    term.phase("starting Ray")
    term.phase("deploying llm service 'tutor'")
    term.capture(tmp_path / "logs")
    import logging

    for n in (3, 14, 15):
        logging.getLogger("matrix_hpc.runtime.driver").warning("re-sending %d task(s) lost with a dead actor", n)
    logging.getLogger("matrix_hpc.runtime.driver").warning("checkpoint slow")
    progress = term.progress(total=10, already=2)
    progress.update(done=3, failed=1, in_flight=4)
    progress.close()
    term.close()
    log = (tmp_path / "logs" / "run.log").read_text()
    assert len(re.findall(r"WARNING matrix_hpc.runtime.driver: re-sending \d+ task", log)) == 3
    assert out.getvalue() == (
        "starting Ray ...\n"
        "deploying llm service 'tutor' ...\n"
        f"warnings: 4 (details in {tmp_path / 'logs' / 'run.log'})\n"
        "  3 x re-sending 3 task(s) lost with a dead actor\n"
        "  1 x checkpoint slow\n"
    )
    assert logging.getLogger("matrix_hpc").handlers == [] and logging.getLogger("matrix_hpc").propagate


def test_actor_processes_are_named_by_run_and_role(ray_session, make_job):
    job = load_job(make_job(NOISY, ROLES, "f", rows=20))
    titles: list[str] = []

    def look(r) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip())
            except OSError:
                pass
        titles[:] = [t for t in titles if f"[t:{r.id}]" in t]

    with deadline(120):
        summary = run(job, progress=False, on_start=look)
    assert summary.done == 20
    roles = Counter(re.sub(r"\[.*?\](\..*)?$", "", t.removeprefix("ray::")) for t in titles)
    assert roles == Counter({"f": 2, "g": 1, "sink": 1, "source": 1}), titles


@pytest.mark.slow  # its own Ray, started by `matrix-hpc run` in a subprocess
def test_a_run_shows_phases_and_keeps_ray_worker_output_in_the_run_log(make_job):
    path = make_job(NOISY, ROLES, "f", rows=40)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))}
    with deadline(180):
        proc = subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "run", str(path)], capture_output=True,
                              text=True, env=env, cwd=path.parent, timeout=170)
    assert proc.returncode == 0, proc.stderr
    run_log = path.parent / "out" / "logs" / "run.log"
    lines = proc.stderr.splitlines()
    phases = [line for line in lines if line.endswith(" ...")]
    assert phases == ["starting Ray ...", "starting 5 actors: source, 1 sink, f x2, g x1 ..."]
    assert [line for line in lines if "ray" in line.lower()] == ["starting Ray ..."], lines  # none of Ray's own
    assert lines[-2] == f"warnings: 4 (details in {run_log})"
    assert re.fullmatch(r"  4 x WARNING agents: row (0|10|20|30) looks odd", lines[-1]), lines[-1]  # the first seen
    terminal = proc.stdout + "\n".join(lines[:-2])
    assert "agent print" not in terminal and "looks odd" not in terminal, terminal
    log = run_log.read_text()
    printed = re.findall(r"^\(f\[t:[0-9a-f]{8}\] pid=\d+\) agent print (\d+)$", log, re.M)
    warned = re.findall(r"^\(f\[t:[0-9a-f]{8}\] pid=\d+\) WARNING agents: row (\d+) looks odd$", log, re.M)
    assert sorted(map(int, printed)) == sorted(map(int, warned)) == [0, 10, 20, 30]


def test_the_live_display_never_hides_the_cursor(tmp_path):
    """A run killed with -9 cannot show the cursor again: the display must never hide it."""
    leader, follower = os.openpty()
    stream = os.fdopen(follower, "w", encoding="utf-8")
    term = Terminal(enabled=True, stream=stream)
    assert term.console.is_terminal
    term.phase("starting Ray")
    progress = term.progress(total=10, already=0)
    progress.update(done=3, failed=0, in_flight=2)
    stream.flush()
    written = os.read(leader, 1 << 16)  # before close: what a kill -9 at this moment leaves on the screen
    progress.close()
    term.close()
    stream.close()
    os.close(leader)
    assert b"starting Ray" in written and b"3" in written
    assert b"\x1b[?25l" not in written
