"""Run credentials on the LLM service (real gRPC on 127.0.0.1, the scripted backend), secret files,
and `matrix-hpc serve` refusing to listen beyond loopback without a secret."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matrix_hpc._gen.llm.v1 import llm_pb2 as pb
from matrix_hpc._gen.llm.v1 import llm_pb2_grpc as pb_grpc
from matrix_hpc.services import auth
from matrix_hpc.services.llm import LLMEndpoint, LLMSpec, ServiceError
from matrix_hpc.services.llm.background import BackgroundServer

RUN_SECRET = auth.new_secret()
OTHER_RUNS_SECRET = auth.new_secret()


@pytest.fixture(scope="module")
def guarded():
    with BackgroundServer(LLMSpec(backend="scripted"), "guarded", secret=RUN_SECRET) as srv:
        yield srv


async def _chat_and_stream(endpoint: LLMEndpoint) -> tuple[str, str]:
    client = endpoint.client()
    text = (await client.chat("hello there", max_tokens=8)).text
    streamed = "".join([c.delta async for c in client.stream_chat("hello again", max_tokens=8)])
    return text, streamed


@pytest.mark.parametrize("secret, reason", [(None, "no credentials"), ("wrong", "wrong credentials"),
                                            (OTHER_RUNS_SECRET, "wrong credentials")],
                         ids=["none", "wrong", "another-run"])
def test_llm_refuses_a_call_without_the_run_secret(guarded, secret, reason):
    endpoint = LLMEndpoint.from_addresses([guarded.address], secret=secret, spec=LLMSpec(backend="scripted",
                                                                                         retries=0))
    served_before = guarded.server.servicer.finished
    with pytest.raises(ServiceError) as chat:
        asyncio.run(endpoint.client().chat("hello"))
    assert chat.value.code == "UNAUTHENTICATED" and reason in str(chat.value)
    with pytest.raises(ServiceError) as stream:
        asyncio.run(_chat_and_stream(endpoint))
    assert stream.value.code == "UNAUTHENTICATED"
    assert guarded.server.servicer.finished == served_before  # nothing reached the engine


def test_llm_serves_the_right_secret_and_keeps_health_open(guarded):
    before = guarded.server.servicer.finished
    text, streamed = asyncio.run(_chat_and_stream(guarded.endpoint()))
    assert (text, streamed) == ("hello there", "hello again")
    assert guarded.server.servicer.finished == before + 2
    with grpc.insecure_channel(guarded.address) as ch:  # no credentials at all
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LLMStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The secret must be the whole value: a prefix or a different scheme is refused too.
        for value in (f"Bearer {RUN_SECRET[:-1]}", RUN_SECRET, f"Basic {RUN_SECRET}"):
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.LLMStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=5, metadata=[("authorization", value)])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = pb_grpc.LLMStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=5,
                                           metadata=[("authorization", f"Bearer {RUN_SECRET}")])
        assert ok.replica == guarded.address


def test_refusals_are_logged_with_the_peer_and_rate_limited(caplog):
    with caplog.at_level(logging.WARNING, logger="matrix_hpc.auth"), \
            BackgroundServer(LLMSpec(backend="scripted"), "quiet", secret=RUN_SECRET) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        for _ in range(25):
            with pytest.raises(grpc.RpcError):
                pb_grpc.LLMStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "matrix_hpc.auth"]
    assert len(lines) == 1, lines  # 25 refusals from one host within 10 s: one line
    assert "LLM 'quiet': refused /matrix_hpc.llm.v1.LLM/ModelInfo from ipv4:127.0.0.1:" in lines[0]
    assert RUN_SECRET not in lines[0]


def test_secret_files_are_owner_only(tmp_path, unprivileged_user):
    path = tmp_path / "creds" / "llm.secret"
    secret = auth.secret_file(path)
    assert auth.secret_file(path) == secret == auth.read_secret_file(path)  # created once, then read
    assert (os.stat(path).st_mode & 0o777, os.stat(path.parent).st_mode & 0o777) == (0o600, 0o700)
    path.chmod(0o644)
    with pytest.raises(auth.CredentialError, match="accessible to other users"):
        auth.read_secret_file(path)
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, unprivileged_user.uid, unprivileged_user.gid)
        with pytest.raises(auth.CredentialError, match=f"belongs to uid {unprivileged_user.uid}"):
            auth.read_secret_file(path)
    link = tmp_path / "creds" / "link.secret"
    link.symlink_to(path)
    with pytest.raises(auth.CredentialError, match="cannot open"):
        auth.read_secret_file(link)


RACE = """
import sys, time
from matrix_hpc.services import auth
start = float(sys.argv[2])
while time.time() < start:
    pass
print(auth.secret_file(sys.argv[1]))
"""


def test_nodes_that_make_the_secret_together_all_read_the_one_that_was_made(tmp_path):
    """The nodes of a Slurm job start together and each reads or makes the run's Ray token: none may
    read a file another has created but not yet written (it used to fail "the secret file is empty")."""
    for attempt in range(5):
        path = tmp_path / f"creds-{attempt}" / "ray.token"
        start = time.time() + 1.5  # every process is up and spinning by then
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(path), str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, [err for _, err in results]
        assert {out.strip() for out, _ in results} == {auth.read_secret_file(path)}
        assert [p.name for p in path.parent.iterdir()] == ["ray.token"]  # no temporary file left


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("service", [["llm", "--backend", "scripted"], ["sandbox"]], ids=["llm", "sandbox"])
def test_serve_refuses_a_network_address_without_a_secret(service, tmp_path):
    done = _serve(*service, "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to listen on 0.0.0.0 without a secret" in done.stderr
    loose = tmp_path / "loose.secret"
    loose.write_text("s3cret\n")
    loose.chmod(0o644)
    done = _serve(*service, "--host", "0.0.0.0", "--port", "0", "--secret-file", str(loose))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{loose}: secret file is accessible to other users (mode 0644)" in done.stderr


def test_serve_llm_with_a_secret_file_over_tls(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret_path = tmp_path / "llm.secret"
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", "serve", "llm", "--backend", "scripted",
                             "--port", str(port), "--secret-file", str(secret_path), "--tls-dir", str(tmp_path / "tls")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server is listening
        assert f"127.0.0.1:{port}" in line, line
        secret = auth.read_secret_file(secret_path)  # created by the server, owner-only
        assert secret not in line
        cert = (tmp_path / "tls" / "tls.crt").read_bytes()  # made by the server
        good = LLMEndpoint.from_addresses([f"127.0.0.1:{port}"], secret=secret, tls_cert=cert)
        assert asyncio.run(good.client().chat("with the secret")).text == "with the secret"
        bad = LLMEndpoint.from_addresses([f"127.0.0.1:{port}"], spec=LLMSpec(backend="scripted", retries=0),
                                         tls_cert=cert)
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):
            asyncio.run(bad.client().chat("without"))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
    assert secret not in rest


def test_llm_over_tls_trusts_the_run_certificate_only(tmp_path):
    pair = auth.tls_pair(tmp_path / "creds")
    assert auth.tls_pair(tmp_path / "creds") == pair  # made once, then read
    assert [os.stat(tmp_path / "creds" / n).st_mode & 0o777 for n in ("tls.crt", "tls.key")] == [0o600, 0o600]
    spec = LLMSpec(backend="scripted", retries=0, timeout_s=5)
    with BackgroundServer(LLMSpec(backend="scripted"), "tls", secret=RUN_SECRET, tls=pair) as srv:
        assert asyncio.run(_chat_and_stream(srv.endpoint())) == ("hello there", "hello again")
        for secret, cert, code in [(RUN_SECRET, None, "UNAVAILABLE"),  # plaintext to a TLS server
                                   (RUN_SECRET, auth.new_tls_pair().cert, "UNAVAILABLE"),  # another run's cert
                                   (None, pair.cert, "UNAUTHENTICATED")]:  # TLS does not replace the secret
            endpoint = LLMEndpoint.from_addresses([srv.address], spec=spec, secret=secret, tls_cert=cert)
            with pytest.raises(ServiceError) as info:
                asyncio.run(endpoint.client().chat("hello"))
            assert info.value.code == code
    assert pair.key not in repr(pair).encode()


@pytest.mark.parametrize("service", [["llm", "--backend", "scripted"], ["sandbox"]], ids=["llm", "sandbox"])
def test_serve_refuses_a_secret_on_a_tcp_port_without_tls(service, tmp_path):
    # another user could take the port while the server restarts, and receive the secret from clients
    done = _serve(*service, "--port", "0", "--secret-file", str(tmp_path / "s.secret"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to serve --secret-file on a TCP port without --tls-dir" in done.stderr


def test_serve_llm_with_a_secret_on_a_unix_socket(tmp_path):
    socket_path = tmp_path / "sockets" / "llm.sock"
    secret_path = tmp_path / "llm.secret"
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", "serve", "llm", "--backend", "scripted",
                             "--socket", str(socket_path), "--secret-file", str(secret_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server is listening
        assert f"on unix:{socket_path}" in line, line
        assert os.stat(socket_path.parent).st_mode & 0o777 == 0o700  # made owner-only
        secret = auth.read_secret_file(secret_path)
        good = LLMEndpoint.from_addresses([f"unix:{socket_path}"], secret=secret)
        assert asyncio.run(good.client().chat("over the socket")).text == "over the socket"
        bad = LLMEndpoint.from_addresses([f"unix:{socket_path}"], spec=LLMSpec(backend="scripted", retries=0))
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):
            asyncio.run(bad.client().chat("without"))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
