"""Requests the cluster can never satisfy, refused before anything is submitted: nothing is left
pending for a reason that cannot change.

Two checks: the partition's own limits (``scontrol show partition``: MaxTime, MaxNodes, the nodes
it has, MaxCPUsPerNode, MaxMemPerNode), which Slurm accepts and leaves pending when
``EnforcePartLimits=NO``; then ``sbatch --test-only`` on the very script that would be submitted,
which refuses what no node can give (more nodes, GPUs, CPUs or memory than exist, an unknown
partition, account or QOS) with Slurm's own reason.
"""

from __future__ import annotations

import subprocess

from matrix_hpc.job.spec import SlurmSpec

_UNLIMITED = {"UNLIMITED", "INFINITE", "NONE", ""}


class SubmitError(Exception):
    """The run cannot be submitted; the message says why (Slurm's own reason where Slurm refused)."""


def check_satisfiable(spec: SlurmSpec, script: str) -> None:
    """Raise SubmitError if the partition's limits or ``sbatch --test-only`` refuse ``script``."""
    fields = partition_fields(spec.partition)
    if fields:
        problems = beyond_partition(spec, fields)
        if problems:
            raise SubmitError(f"the partition {fields['PartitionName']} can never run this job: "
                              f"{'; '.join(problems)}")
    sbatch_test_only(script)


def sbatch_test_only(script: str) -> None:
    """``sbatch --test-only``: Slurm validates the script against its nodes and says when it would start."""
    done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SubmitError(f"Slurm refused the job: {sbatch_reason(done.stderr or done.stdout)}")


def sbatch_reason(message: str) -> str:
    """The lines of sbatch's output that say why (errors and allocation failures)."""
    lines = [ln.strip() for ln in message.splitlines()
             if ("error" in ln.lower() or "failure" in ln.lower()) and ln.strip()]
    return "; ".join(dict.fromkeys(lines)) or message.strip()


def partition_fields(name: str | None) -> dict[str, str]:
    """``scontrol show partition`` of ``name`` (default: the cluster's default partition) as a dict;
    {} when Slurm does not know it (``sbatch --test-only`` then says so in its words)."""
    out = subprocess.run(["scontrol", "show", "partition", "-o", *([name] if name else [])], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        return {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if name or fields.get("Default") == "YES":
            return fields
    return {}


def slurm_minutes(value: str) -> float | None:
    """A Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in minutes; None if unlimited."""
    if value.upper() in _UNLIMITED:
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        h, (m, s) = 0, (parts + [0])[:2]
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def _limit(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key, "UNLIMITED")
    return None if value.upper() in _UNLIMITED else int(value)


def beyond_partition(spec: SlurmSpec, fields: dict[str, str]) -> list[str]:
    """What of ``spec`` exceeds the limits in ``fields`` (``scontrol show partition``), in words."""
    problems = []
    max_time = slurm_minutes(fields.get("MaxTime", "UNLIMITED"))
    if max_time is not None and spec.time_min > max_time:
        problems.append(f"time_min {spec.time_min} is over its MaxTime {fields['MaxTime']} ({max_time:g} min)")
    node_limits = [n for n in (_limit(fields, "MaxNodes"), _limit(fields, "TotalNodes")) if n is not None]
    if node_limits and spec.nodes > min(node_limits):
        problems.append(f"nodes {spec.nodes} is more than it has or allows ({min(node_limits)})")
    max_cpus = _limit(fields, "MaxCPUsPerNode")
    if max_cpus is not None and spec.cpus_per_node and spec.cpus_per_node > max_cpus:
        problems.append(f"cpus_per_node {spec.cpus_per_node} is over its MaxCPUsPerNode {max_cpus}")
    max_mem = _limit(fields, "MaxMemPerNode")
    if max_mem is not None and spec.mem_gb and spec.mem_gb * 1024 > max_mem:
        problems.append(f"mem_gb {spec.mem_gb:g} is over its MaxMemPerNode {max_mem} MB")
    return problems
