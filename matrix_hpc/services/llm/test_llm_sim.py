"""The `sim` backend: a simulated engine (continuous batching, a per-step cost model), not a model.

The scheduling tests drive the backend object with a tiny time_scale and check the engine's
counts exactly; one test goes through the real gRPC server.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from matrix_hpc.services.llm import InvalidRequest, LLMSpec
from matrix_hpc.services.llm.backends.base import GenRequest
from matrix_hpc.services.llm.backends.sim import SimBackend, smallest_instance
from matrix_hpc.services.llm.background import BackgroundServer


def sim_spec(**sim) -> LLMSpec:
    base = {"time_scale": 1e-4, "output_tokens": {"dist": "fixed", "mean": 10}}
    return LLMSpec(backend="sim", sim={**base, **sim})


async def with_backend(spec: LLMSpec, work):
    backend = SimBackend(spec)
    await backend.start()
    try:
        return await work(backend), backend.stats()
    finally:
        await backend.close()


def chat(i: int, **kw) -> GenRequest:
    return GenRequest(request_id=f"r{i}", messages=[{"role": "user", "content": f"question {i:04d}"}], **kw)


def test_continuous_batching_counts_steps_and_batch_exactly():
    # 8 requests of 10 tokens, 4 sequences at a time: steps 1-10 run the first 4, 11-20 the rest.
    async def work(backend):
        return await asyncio.gather(*[backend.generate(chat(i)) for i in range(8)])

    results, stats = asyncio.run(with_backend(sim_spec(max_num_seqs=4), work))
    assert [r.usage.completion_tokens for r in results] == [10] * 8
    assert stats["steps"] == 20 and stats["max_batch"] == 4 and stats["batch_sum"] == 80
    assert stats["generation_tokens"] == 80 and stats["simulated"] == 1
    prompt = results[0].usage.prompt_tokens
    assert stats["prompt_tokens"] == 8 * prompt


def test_step_time_follows_the_cost_model():
    # one request alone: 1 prefill step + 9 more decode steps; each step decodes one sequence.
    spec = sim_spec(step_s=0.01, prefill_token_s=0.001, decode_seq_s=0.002, kv_token_s=0.0)

    async def work(backend):
        return await backend.generate(chat(0))

    result, stats = asyncio.run(with_backend(spec, work))
    prompt = result.usage.prompt_tokens
    expected_ms = 10 * (10 + 2) + prompt * 1
    assert stats["steps"] == 10 and stats["busy_ms"] == pytest.approx(expected_ms, abs=1)


def test_a_full_kv_cache_preempts_and_every_request_still_finishes():
    async def work(backend):
        return await asyncio.gather(*[backend.generate(chat(i)) for i in range(6)])

    results, stats = asyncio.run(with_backend(sim_spec(kv_cache_tokens=40, max_num_seqs=6), work))
    assert [r.usage.completion_tokens for r in results] == [10] * 6
    assert stats["preemptions"] > 0 and stats["generation_tokens"] >= 60


def test_replies_repeat_for_a_seed_and_honour_max_tokens():
    spec = sim_spec(output_tokens={"dist": "lognormal", "mean": 50, "sigma": 1.0})

    async def work(backend):
        a = await backend.generate(chat(1, sampling={"seed": 7}))
        b = await backend.generate(chat(1, sampling={"seed": 7}))
        capped = await backend.generate(chat(1, sampling={"seed": 7, "max_tokens": 3}))
        lengths = {(await backend.generate(chat(1, sampling={"seed": s}))).usage.completion_tokens
                   for s in range(20)}
        return a, b, capped, lengths

    (a, b, capped, lengths), _ = asyncio.run(with_backend(spec, work))
    assert a.text == b.text and a.usage.completion_tokens == len(a.text.split())
    assert a.text.startswith("sim0 sim1")
    assert capped.usage.completion_tokens == 3 and capped.text == "sim0 sim1 sim2"
    assert capped.finish_reason == ("length" if a.usage.completion_tokens > 3 else "stop")
    assert len(lengths) > 5  # lengths vary with the seed


def test_json_schemas_choices_and_tool_calls_are_followed():
    person = {"type": "object", "required": ["name", "age", "tags"],
              "properties": {"name": {"type": "string", "minLength": 2}, "age": {"type": "integer", "minimum": 18},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1}}}
    tool = {"name": "refund", "description": "", "parameters": {"type": "object", "required": ["order"],
                                                                 "properties": {"order": {"type": "string"}}}}

    async def work(backend):
        js = await backend.generate(chat(1, structured={"json": person}))
        pick = await backend.generate(chat(2, structured={"choice": ["yes", "no"]}))
        call = await backend.generate(chat(3, tools=[tool], tool_choice="refund"))
        plain = await backend.generate(chat(4, tools=[tool], tool_choice="none"))
        return js, pick, call, plain

    (js, pick, call, plain), _ = asyncio.run(with_backend(sim_spec(), work))
    assert json.loads(js.text) == {"name": "ss", "age": 18, "tags": ["a"]}
    assert pick.text in ("yes", "no")
    assert call.finish_reason == "tool_calls" and call.tool_calls[0].name == "refund"
    assert call.tool_calls[0].arguments == {"order": ""}
    assert plain.tool_calls == [] and plain.text.startswith("sim0")
    assert smallest_instance({"type": ["null", "number"], "minimum": 2}) == 2


def test_sim_over_grpc_streams_and_says_it_is_simulated():
    with BackgroundServer(sim_spec(), "sim") as srv:
        client = srv.endpoint().client()

        async def main():
            whole = await client.chat("hello", max_tokens=5)
            chunks = [c async for c in client.stream_chat("hello", max_tokens=5)]
            return whole, chunks

        whole, chunks = asyncio.run(main())
        assert whole.text == "sim0 sim1 sim2 sim3 sim4" and whole.finish_reason == "length"
        assert "".join(c.delta for c in chunks) == whole.text
        with pytest.raises(InvalidRequest, match="regex"):
            asyncio.run(client.chat("hello", regex="[a-z]+"))


def test_a_burst_of_thousands_of_calls_is_served_whole():
    # gRPC's core cancels calls beyond 3,000 waiting for the server by default: every one must succeed.
    calls = 6000
    with BackgroundServer(sim_spec(output_tokens={"dist": "fixed", "mean": 2}), "sim") as srv:
        client = srv.endpoint().client()

        async def main():
            return await asyncio.gather(*[client.chat(f"q{i}", max_tokens=2) for i in range(calls)],
                                        return_exceptions=True)

        results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of {calls} failed, first: {failed[0]!r}"
    assert [r.usage.completion_tokens for r in results] == [2] * calls
