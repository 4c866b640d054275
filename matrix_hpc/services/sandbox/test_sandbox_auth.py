"""The sandbox service with run credentials (real bubblewrap, real gRPC on 127.0.0.1): a caller
without the run's secret can neither run code nor close another task's sessions."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matrix_hpc.services import auth

from .client import SandboxClient, release
from .conftest import TEST_LIMITS
from .server import SandboxServer, ServiceError
from .spec import SandboxSpec

RUN_SECRET = auth.new_secret()


@pytest.fixture(scope="module")
def guarded(python_image, aloop):
    server = SandboxServer(SandboxSpec(image=str(python_image), limits=TEST_LIMITS))
    port = aloop.run(server.start("127.0.0.1", 0, secret=RUN_SECRET))
    yield server, f"127.0.0.1:{port}"
    aloop.run(server.stop())


@pytest.mark.parametrize("secret", [None, "wrong", auth.new_secret()], ids=["none", "wrong", "another-run"])
def test_sandbox_refuses_every_call_without_the_run_secret(guarded, aloop, secret):
    server, address = guarded
    owner = SandboxClient([address], key="task-1", secret=RUN_SECRET)
    session = aloop.run(owner.open_session(files={"keep.txt": "mine"}))
    intruder = SandboxClient([address], key="task-1", secret=secret, max_rounds=1)
    runs_before = server.runs_total
    try:
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):
            aloop.run(intruder.run("echo pwned"))
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):
            aloop.run(intruder.open_session())
        with pytest.raises(grpc.aio.AioRpcError) as stats:  # stats() passes gRPC errors through as they are
            aloop.run(intruder.stats())
        assert stats.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):  # the attack of issue 10: guessed task ids
            aloop.run(release([address], ["task-1"], secret=secret))
        assert server.runs_total == runs_before
        # The owner's session survived the attempt to close it.
        assert aloop.run(session.get("keep.txt")) == {"keep.txt": b"mine"}
    finally:
        aloop.run(session.close())


def test_sandbox_serves_the_right_secret_and_keeps_health_open(guarded, aloop):
    _, address = guarded
    client = SandboxClient([address], key="task-2", secret=RUN_SECRET)
    result = aloop.run(client.run(["python3", "-c", "print(6 * 7)"]))
    assert (result.exit_code, result.stdout) == (0, "42\n")
    assert aloop.run(release([address], ["task-2"], secret=RUN_SECRET)) == 0
    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_sandbox_over_tls(python_image, aloop, tmp_path):
    pair = auth.tls_pair(tmp_path / "creds")
    server = SandboxServer(SandboxSpec(image=str(python_image), limits=TEST_LIMITS))
    address = f"127.0.0.1:{aloop.run(server.start('127.0.0.1', 0, secret=RUN_SECRET, tls=pair))}"
    try:
        good = SandboxClient([address], key="t", secret=RUN_SECRET, tls_cert=pair.cert)
        assert aloop.run(good.run(["python3", "-c", "print(6 * 7)"])).stdout == "42\n"
        plain = SandboxClient([address], key="t", secret=RUN_SECRET, max_rounds=1)
        with pytest.raises(ServiceError, match="UNAVAILABLE"):
            aloop.run(plain.run("echo in the clear"))
    finally:
        aloop.run(server.stop())
