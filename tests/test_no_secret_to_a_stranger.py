"""Issue 17's first attack, replayed: another user of the machine takes the place of a dead replica.

A replica dies; a second user (the unprivileged test user) puts a fake server where it was, one
that records every call's metadata and answers every call with a forged result. The run's calls
must wait or fail clearly, the fake server must receive no call (so never the run's secret), and
no forged answer may reach the caller. Both ways a replica listens are attacked: a Unix socket in
an owner-only folder (one machine) and a TCP port over TLS with the run's certificate (a cluster),
there also after Ray restarted the replica on another port. Real Ray, real gRPC, the scripted LLM
backend (a test stand-in, not a model).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import grpc
import pytest

from matrix_hpc._gen.llm.v1 import llm_pb2 as pb
from matrix_hpc.runtime.security import LocalRay
from matrix_hpc.services import auth
from matrix_hpc.services.llm import LLMSpec, ServiceError, deploy

FORGED = "ALL TESTS PASSED"
SECRET = auth.new_secret()

# Run as the other user: ``python -c ATTACKER ADDRESS LOG CERT``. Prints one JSON line: whether it could
# listen at ADDRESS (and why not), then serves until killed, logging every call to LOG.
ATTACKER = r"""
import json, os, socket, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health_pb2
from matrix_hpc._gen.llm.v1 import llm_pb2 as pb
from matrix_hpc.services import auth

address, log_path, cert_path = sys.argv[1:4]
forged = pb.GenerateResponse(choices=[pb.Choice(text="ALL TESTS PASSED", finish_reason="stop")]).SerializeToString()
serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()

class Fake(grpc.GenericRpcHandler):
    def service(self, details):
        pairs = [[k, v if isinstance(v, str) else v.decode(errors="replace")] for k, v in details.invocation_metadata]
        with open(log_path, "a") as f:
            f.write(json.dumps({"method": details.method, "metadata": pairs}) + "\n")
        answer = serving if details.method.startswith("/grpc.health.v1.Health/") else forged
        return grpc.unary_unary_rpc_method_handler(lambda request, context: answer)

if address.startswith("unix:"):
    path = address[len("unix:"):]
    try:
        try:
            os.unlink(path)  # the dead replica's socket file
        except FileNotFoundError:
            pass
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
        os.unlink(path)
    except OSError as e:
        print(json.dumps({"bound": False, "error": type(e).__name__}), flush=True)
        sys.exit(0)
server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[Fake()], options=[("grpc.so_reuseport", 0)])
if address.startswith("unix:"):
    bound = server.add_insecure_port(address)
else:
    pair = auth.new_tls_pair()  # a certificate of the same name, with this user's own key
    with open(cert_path, "wb") as f:
        f.write(pair.cert)
    bound = server.add_secure_port(address, grpc.ssl_server_credentials([(pair.key, pair.cert)]))
server.start()
print(json.dumps({"bound": bool(bound)}), flush=True)
server.wait_for_termination()
"""


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    with nullcontext() if ray.is_initialized() else LocalRay(
            tmp_path_factory.mktemp("ray"), num_cpus=2, log_to_driver=False):
        yield ray


class Attacker:
    """The other user's fake server at ``address``; ``calls()`` is what it received."""

    def __init__(self, user, folder: Path, address: str):
        self.log, self.cert = folder / "calls.jsonl", folder / "attacker.crt"
        self.proc = subprocess.Popen(user.command([sys.executable, "-c", ATTACKER, address, str(self.log),
                                                   str(self.cert)]),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        assert line, self.proc.communicate(timeout=30)
        self.status = json.loads(line)

    def calls(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def _chat(endpoint, text: str = "the honest answer") -> str:
    """One call as an agent makes it: a fresh process-side view (the pickled endpoint, a new event loop)."""
    endpoint = pickle.loads(pickle.dumps(endpoint))
    return asyncio.run(endpoint.client().chat(text)).text


def _kill(ray, endpoint, restart: bool) -> None:
    victim = ray.get_actor(endpoint.replicas[0].actor_name, namespace=endpoint.namespace)
    old = ray.get(victim.pid.remote())
    ray.kill(victim, no_restart=not restart)
    while True:  # until Ray confirms the old process gone (dead for good, or restarted)
        try:
            if ray.get(victim.pid.remote()) != old:
                return
        except ray.exceptions.RayActorError:
            if not restart:
                return


def _no_secret_in(attacker: Attacker) -> None:
    assert attacker.calls() == []
    assert not attacker.log.exists() or SECRET not in attacker.log.read_text()


SPEC = LLMSpec(backend="scripted", replicas=1, max_restarts=0, timeout_s=4, retries=2)


def test_a_dead_replicas_socket_cannot_be_taken_and_a_folder_not_ours_is_refused(
        ray_local, unprivileged_user, user_dir):
    endpoint = deploy("victim", SPEC, secret=SECRET)
    attacker = None
    try:
        address = endpoint.addresses[0]
        assert address.startswith("unix:") and _chat(endpoint) == "the honest answer"
        _kill(ray_local, endpoint, restart=False)

        # The other user cannot put anything at the socket's path (the folder is ours, 0700) ...
        attacker = Attacker(unprivileged_user, user_dir, address)
        assert attacker.status == {"bound": False, "error": "PermissionError"}
        # ... and the run's call fails clearly, within its deadline.
        with pytest.raises(ServiceError) as gone:
            _chat(endpoint)
        assert gone.value.code == "UNAVAILABLE"

        # Were the folder someone else's (made by another user before us, say), a client refuses it
        # even with a server listening there: it connects to nothing and sends nothing.
        folder = Path(address[len("unix:"):]).parent
        os.chown(folder, unprivileged_user.uid, unprivileged_user.gid)
        attacker = Attacker(unprivileged_user, user_dir, address)
        assert attacker.status == {"bound": True}
        with pytest.raises(ServiceError) as refused:
            _chat(endpoint)
        assert refused.value.code == "PERMISSION_DENIED" and "not to this user" in str(refused.value)
        _no_secret_in(attacker)
        # (the fake server does answer whoever calls it: a forged result, logged)
        with grpc.insecure_channel(address) as ch:
            raw = ch.unary_unary("/matrix_hpc.llm.v1.LLM/Chat")(b"", timeout=10)
        assert pb.GenerateResponse.FromString(raw).choices[0].text == FORGED
        assert [c["method"] for c in attacker.calls()] == ["/matrix_hpc.llm.v1.LLM/Chat"]
    finally:
        if attacker is not None:
            attacker.stop()
        endpoint.shutdown()


def _squat_port(unprivileged_user, user_dir, address: str) -> Attacker:
    attacker = Attacker(unprivileged_user, user_dir, address)
    assert attacker.status == {"bound": True}, f"could not take {address}: {attacker.proc.stderr.read()}"
    return attacker


@pytest.mark.parametrize("restart", [False, True], ids=["dead", "restarted"])
def test_on_a_cluster_a_squatted_port_gets_no_call_through_tls(ray_local, unprivileged_user, user_dir,
                                                               monkeypatch, restart):
    monkeypatch.setenv("MATRIX_HPC_CLUSTER", "1")  # what the Slurm launcher sets: node address, TLS
    tls = auth.new_tls_pair()
    spec = SPEC.model_copy(update={"max_restarts": 1 if restart else 0})
    endpoint = deploy("victim", spec, secret=SECRET, tls=tls)
    attacker = None
    try:
        old = endpoint.addresses[0]
        assert not old.startswith("unix:")
        client_loop = asyncio.new_event_loop()  # one long-lived client, as an agent holds it
        client = endpoint.client()
        assert client_loop.run_until_complete(client.chat("before")).text == "before"
        _kill(ray_local, endpoint, restart=restart)
        if restart:
            victim = ray_local.get_actor(endpoint.replicas[0].actor_name, namespace=endpoint.namespace)
            assert ray_local.get(victim.address.remote()) != old  # a new port; the old one is free
        attacker = _squat_port(unprivileged_user, user_dir, old)

        if restart:  # the client finds the restarted replica (through Ray), never the squatter
            answers = [client_loop.run_until_complete(client.chat(f"after {i}", timeout=30)).text for i in range(5)]
            assert answers == [f"after {i}" for i in range(5)]
        else:  # the call fails clearly: the squatter cannot prove it holds the run's certificate
            with pytest.raises(ServiceError) as failed:
                client_loop.run_until_complete(client.chat("after"))
            assert failed.value.code == "UNAVAILABLE"
        _no_secret_in(attacker)
        # (the squatter does answer whoever trusts its own certificate: a forged result, logged)
        creds = grpc.ssl_channel_credentials(root_certificates=attacker.cert.read_bytes())
        with grpc.secure_channel(old, creds, options=[("grpc.ssl_target_name_override", auth.TLS_NAME)]) as ch:
            raw = ch.unary_unary("/matrix_hpc.llm.v1.LLM/Chat")(b"", timeout=10)
        assert pb.GenerateResponse.FromString(raw).choices[0].text == FORGED
        assert len(attacker.calls()) == 1
        client_loop.close()
    finally:
        if attacker is not None:
            attacker.stop()
        endpoint.shutdown()
