"""Where a service's replicas go on a Ray cluster of several nodes: spread over the nodes, never
all on the head.

Without GPUs, replica ``i`` goes to node ``i`` (mod the node count; nodes in address order, so the
head's replica is not always first to be added). With ``gpus_per_replica`` GPUs per replica, each
node offers one slot per ``gpus_per_replica`` of its GPUs, and replicas take the slots round-robin
over the nodes (one on every node before a second on any); asking for more replicas than there
are slots is an error, never a replica pending forever.

The result is one Ray scheduling strategy per replica, for ``.options(scheduling_strategy=...)``.
On a single node it is Ray's default (nothing to spread).
"""

from __future__ import annotations

from typing import Any


class PlacementError(ValueError):
    """The replicas asked for cannot be placed on the cluster's nodes; the message says why."""


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (``ray.nodes()`` entries), in address order."""
    import ray

    return sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))


def replica_nodes(nodes: list[dict[str, Any]], replicas: int | None, gpus_per_replica: int = 0) -> list[dict]:
    """The node (a ``ray.nodes()`` entry) of each replica. ``replicas=None`` with GPUs: one per
    ``gpus_per_replica`` GPUs on every node; without GPUs: one per node."""
    if not nodes:
        raise PlacementError("no alive Ray node")
    if gpus_per_replica <= 0:
        count = len(nodes) if replicas is None else replicas
        return [nodes[i % len(nodes)] for i in range(count)]
    per_node = [int(n.get("Resources", {}).get("GPU", 0)) // gpus_per_replica for n in nodes]
    slots = [node for k in range(max(per_node, default=0)) for node, n in zip(nodes, per_node, strict=True) if k < n]
    count = len(slots) if replicas is None else replicas
    if count > len(slots):
        gpus = ", ".join(f"{n['NodeManagerAddress']}: {int(n.get('Resources', {}).get('GPU', 0))}" for n in nodes)
        raise PlacementError(f"{count} replica(s) of {gpus_per_replica} GPU(s) each do not fit the nodes' GPUs "
                             f"({gpus}): at most {len(slots)}")
    return slots[:count]


def replica_strategies(replicas: int | None, gpus_per_replica: int = 0,
                       nodes: list[dict[str, Any]] | None = None) -> list:
    """One Ray scheduling strategy per replica (see the module's docstring); needs ``ray.init()``.
    GPU replicas are pinned to their node (the slot was counted there); CPU ones prefer theirs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes() if nodes is None else nodes
    placed = replica_nodes(nodes, replicas, gpus_per_replica)
    if len(nodes) == 1:
        return ["DEFAULT"] * len(placed)
    return [NodeAffinitySchedulingStrategy(n["NodeID"], soft=gpus_per_replica == 0) for n in placed]
