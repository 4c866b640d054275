"""Replica placement over the nodes of a cluster (the 2-node spread on real Ray is in tests/test_slurm.py)."""

from __future__ import annotations

import pytest

from matrix_hpc.services.placement import PlacementError, replica_nodes


def node(addr: str, gpus: int = 0) -> dict:
    return {"NodeID": f"id-{addr}", "NodeManagerAddress": addr, "Alive": True,
            "Resources": {"CPU": 2.0, **({"GPU": float(gpus)} if gpus else {})}}


def addresses(placed: list[dict]) -> list[str]:
    return [n["NodeManagerAddress"] for n in placed]


def test_cpu_replicas_go_round_robin_over_the_nodes():
    nodes = [node("10.0.0.1"), node("10.0.0.2"), node("10.0.0.3")]
    assert addresses(replica_nodes(nodes, 4)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert addresses(replica_nodes(nodes, None)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # one per node


def test_gpu_replicas_take_one_slot_per_gpus_per_replica_on_every_node_before_a_second_anywhere():
    nodes = [node("10.0.0.1", gpus=4), node("10.0.0.2", gpus=4), node("10.0.0.3", gpus=2)]
    # 2 GPUs a replica: 2 slots on the first two nodes, 1 on the third; one on every node first.
    assert addresses(replica_nodes(nodes, None, gpus_per_replica=2)) == [
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2"]
    assert addresses(replica_nodes(nodes, 2, gpus_per_replica=2)) == ["10.0.0.1", "10.0.0.2"]
    assert addresses(replica_nodes(nodes, None, gpus_per_replica=4)) == ["10.0.0.1", "10.0.0.2"]


def test_more_gpu_replicas_than_slots_is_refused_with_the_nodes_gpus():
    nodes = [node("10.0.0.1", gpus=2), node("10.0.0.2", gpus=1)]
    with pytest.raises(PlacementError, match=r"4 replica\(s\) of 1 GPU\(s\) each do not fit the nodes' GPUs "
                                             r"\(10\.0\.0\.1: 2, 10\.0\.0\.2: 1\): at most 3"):
        replica_nodes(nodes, 4, gpus_per_replica=1)
