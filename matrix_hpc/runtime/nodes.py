"""Where the work runs: each agent actor's node, and the per-node view the driver keeps in the run
directory (``logs/nodes.json``) for ``matrix-hpc status``.

On a Slurm allocation every Ray process inherits the node's ``SLURM_PROCID`` (its rank, as in
``matrix-hpc logs --node N``) and ``SLURMD_NODENAME``; each actor there also writes its output
(prints, log records, tracebacks) to ``<run_dir>/logs/node-<rank>.log`` on the shared filesystem,
where Ray would keep it in the node's private session folder, deleted when the job ends.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from matrix_hpc.rundir import RunDir

CLUSTER_ENV = "MATRIX_HPC_CLUSTER"  # set by matrix_hpc.slurm on every node of an allocation


def this_node() -> str:
    """This process's node: ``<rank> <name>`` on a Slurm allocation, else the host name."""
    rank = os.environ.get("SLURM_PROCID")
    if os.environ.get(CLUSTER_ENV) and rank is not None:
        return f"{rank} {os.environ.get('SLURMD_NODENAME') or socket.gethostname()}"
    return socket.gethostname()


def output_to_run_dir(run_dir: str | Path) -> None:
    """On a Slurm allocation, send this process's stdout and stderr to its node's log in the run
    directory (appending: every actor of the node shares it); elsewhere nothing changes."""
    rank = os.environ.get("SLURM_PROCID")
    if not os.environ.get(CLUSTER_ENV) or rank is None:
        return
    path = RunDir(run_dir).actors_log(int(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


def node_view(current: list[dict], every: list[dict]) -> dict[str, dict]:
    """Per node: tasks in flight (``current``: the live actors' latest stats), steps run (``every``:
    the last stats of every incarnation, dead ones' included) and the latest error there."""
    view: dict[str, dict] = {}
    for st in every:
        node = view.setdefault(st.get("node", "?"), {"in_flight": 0, "steps": 0, "last_error": None})
        node["steps"] += st.get("steps", 0)
        error = st.get("last_error")
        if error and (node["last_error"] is None or error["at"] > node["last_error"]["at"]):
            node["last_error"] = error
    for st in current:
        view.setdefault(st.get("node", "?"), {"in_flight": 0, "steps": 0, "last_error": None})
        view[st.get("node", "?")]["in_flight"] += st.get("inbox", 0) + st.get("active", 0)
    return dict(sorted(view.items()))


def write_node_view(run_dir: Path, view: dict[str, dict]) -> None:
    path = RunDir(run_dir).node_view
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(view, indent=1))
    tmp.replace(path)


def read_node_view(run_dir: Path) -> dict[str, dict]:
    try:
        return json.loads(RunDir(run_dir).node_view.read_text())
    except (OSError, ValueError):
        return {}


def describe(view: dict[str, dict]) -> list[str]:
    """``status`` lines, one a node."""
    lines = []
    for node, v in view.items():
        error = v.get("last_error")
        last = f"; last error {error['error']} (role {error['role']}, task {error['task_id']})" if error else ""
        lines.append(f"node {node}: {v['in_flight']} task(s) in flight, {v['steps']} step(s){last}")
    return lines
