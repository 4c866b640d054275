"""The `sim` backend: a simulated engine (continuous batching, a per-step cost model), not a model.

The scheduling tests drive the backend object with a tiny time_scale and check the engine's
counts exactly; one test goes through the real gRPC server.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from matrix_hpc.services.llm import InvalidRequest, LLMSpec
from matrix_hpc.services.llm.backends import make_backend
from matrix_hpc.services.llm.backends.base import Backend, GenRequest
from matrix_hpc.services.llm.backends.replay import Recorder
from matrix_hpc.services.llm.backends.sim import SimBackend, cost_terms, smallest_instance
from matrix_hpc.services.llm.background import BackgroundServer
from matrix_hpc.services.llm.results import ChatResult, Choice, Usage


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


def test_guided_sequences_cost_structured_seq_s_more_per_step():
    spec = sim_spec(step_s=0.0, prefill_token_s=0.0, decode_seq_s=0.0, kv_token_s=0.0, structured_seq_s=0.005)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}

    async def work(backend):
        return await asyncio.gather(backend.generate(chat(0, structured={"json": schema})), backend.generate(chat(1)))

    (guided, plain), stats = asyncio.run(with_backend(spec, work))
    tokens = guided.usage.completion_tokens
    assert guided.text == '{"a": ""}' and tokens == 3 and plain.usage.completion_tokens == 10
    assert stats["guided_sum"] == tokens and stats["busy_ms"] == pytest.approx(5 * tokens, abs=1)


def test_a_step_computes_at_most_max_batched_tokens():
    # prompts of 5 tokens, 12 per step: step 1 prefills 2 (10), step 2 decodes 2 and prefills 2 (12);
    # the second pair finishes one step after the first: 11 steps, where 10 without the budget.
    async def work(backend):
        return await asyncio.gather(*[backend.generate(chat(i)) for i in range(4)])

    results, stats = asyncio.run(with_backend(sim_spec(max_batched_tokens=12), work))
    assert {r.usage.prompt_tokens for r in results} == {5}
    assert stats["steps"] == 11 and stats["batch_sum"] == 40 and stats["max_batch"] == 4
    _, unbounded = asyncio.run(with_backend(sim_spec(), work))
    assert unbounded["steps"] == 10
    # the same scheduling without the clock (what benchmarks/bench_sim_fit.py fits the cost model on)
    dry = cost_terms(sim_spec(max_batched_tokens=12), [(5, 0, 10, False)] * 4 + [(100, 64, 2, True)])
    assert dry["batch_sum"] == 42 and dry["prefilled_tokens"] == 4 * 5 + 36 and dry["guided_sum"] == 2


class CachingEngine(Backend):
    """A double of an engine with a prefix cache: 100 prompt tokens, 64 of them cached, 7 generated."""

    def __init__(self):
        self.calls = 0

    async def generate(self, req: GenRequest) -> ChatResult:
        self.calls += 1
        return ChatResult([Choice(0, f"reply {self.calls}", "stop", completion_tokens=7)], Usage(100, 7, 107, 64))

    async def stream(self, req: GenRequest):
        yield await self.generate(req)


def test_a_recorded_run_is_replayed_with_its_tokens_and_cache_hits(tmp_path):
    recorder = make_backend(LLMSpec(backend="scripted", record="trace.jsonl"), base_dir=tmp_path)
    assert isinstance(recorder, Recorder)
    recorder.inner = CachingEngine()

    async def record():
        await recorder.start()
        for req in (chat(0), chat(0), chat(1)):  # chat(0) twice: replayed in the recorded order
            await recorder.generate(req)
        await recorder.close()

    asyncio.run(record())
    spec = sim_spec(replay="trace.jsonl", step_s=0.0, prefill_token_s=0.001, decode_seq_s=0.0, kv_token_s=0.0)
    sim = make_backend(spec, base_dir=tmp_path)

    async def replay():
        await sim.start()
        try:
            return [await sim.generate(r) for r in (chat(0), chat(0), chat(0), chat(1), chat(2))]
        finally:
            await sim.close()

    results = asyncio.run(replay())
    assert [r.text for r in results[:4]] == ["reply 1", "reply 2", "reply 2", "reply 3"]
    assert [r.usage.completion_tokens for r in results] == [7, 7, 7, 7, 10]  # chat(2): not recorded
    assert [r.usage.cached_prompt_tokens for r in results] == [64, 64, 64, 64, 0]
    stats = sim.stats()
    assert stats["replayed"] == 4 and stats["replay_misses"] == 1
    assert stats["prompt_tokens"] == 4 * 100 + 5 and stats["prefix_cache_hits"] == 4 * 64
    assert stats["prefilled_tokens"] == 4 * (100 - 64) + 5  # only what the cache did not serve
    assert stats["busy_ms"] == pytest.approx(4 * 36 + 5, abs=1)


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
        stats = asyncio.run(client.model_info())[0]["stats"]  # the sim's own counters come through too
        assert stats["simulated"] == 1 and stats["steps"] == 10 and stats["generation_tokens"] == 10
        assert stats["prefilled_tokens"] == 2 * whole.usage.prompt_tokens and stats["guided_sum"] == 0
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


def test_a_malformed_record_is_refused_with_its_file_and_line(tmp_path):
    good = {"key": "k", "prompt_tokens": 3, "cached_prompt_tokens": 0,
            "choices": [{"text": "x", "finish_reason": "stop", "completion_tokens": 1, "tool_calls": []}]}
    (tmp_path / "calls.jsonl").write_text(json.dumps(good) + '\n{"key": "k2", "choices": []}\n')
    with pytest.raises(ValueError, match=r"calls\.jsonl:2: not a recorded reply"):
        make_backend(sim_spec(replay="calls.jsonl"), base_dir=tmp_path)
