"""The gRPC server of one replica, whatever the service: binding, credentials, health, shutdown.

A service adds its servicer; this module does the rest the same way for every kind: the run's
secret checked on every call but health checks, TLS with the run's certificate where given, a Unix
socket in an owner-only folder or a TCP address, and the standard health service reporting
SERVING / NOT_SERVING for ``""`` and the service's name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from matrix_hpc.services.auth import TLSPair, bind, check_bind, server_interceptors
from matrix_hpc.services.core.listen import is_unix, prepare_socket

log = logging.getLogger("matrix_hpc.services")

MAX_MESSAGE = 64 * 1024 * 1024
# gRPC's core cancels a call that arrives while 3,000 (by default) wait to be handed to the server's
# event loop: a burst of a few thousand agent calls lost a third of them as CANCELLED. Admission is
# the services' own (queues, RESOURCE_EXHAUSTED), so the core's queue may hold whatever arrives.
MAX_PENDING_CALLS = 1 << 24


def check_listen(address: str, secret: str | None, what: str) -> None:
    """Refuse to listen beyond this machine without a secret (CredentialError)."""
    check_bind(address if is_unix(address) else address.rsplit(":", 1)[0], secret, what)


class Health:
    """The health service of one server (open to every caller: probes and load balancers use it)."""

    def __init__(self, service_name: str):
        self.names = ("", service_name)
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self.set(False)

    def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.servicer.set(name, status)

    def shutting_down(self) -> None:
        self.servicer.enter_graceful_shutdown()


class GrpcHost:
    """A grpc.aio server for one service: ``await host.listen(address)`` returns the bound address."""

    def __init__(self, what: str, service_name: str, add_servicer: Callable[[grpc.aio.Server], None], *,
                 max_message: int = MAX_MESSAGE, secret: str | None = None, tls: TLSPair | None = None,
                 health: Health | None = None):
        self.what = what
        self.secret, self.tls = secret, tls
        self.health = health or Health(service_name)
        self.add_servicer = add_servicer
        self.max_message = max_message
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def listen(self, address: str) -> str:
        """Serve at ``address`` (``host:port``, port 0 for any free one, or ``unix:PATH``); health stays
        NOT_SERVING until ``health.set(True)``."""
        check_listen(address, self.secret, self.what)
        prepare_socket(address)
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.max_message),
                     ("grpc.max_send_message_length", self.max_message),
                     ("grpc.so_reuseport", 0),
                     ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                     ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)],
            maximum_concurrent_rpcs=None,
            interceptors=server_interceptors(self.secret, self.what),
        )
        self.add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        bound = bind(self.server, address, self.tls)
        if bound == 0:
            raise RuntimeError(f"{self.what}: could not listen on {address}")
        await self.server.start()
        self.address = address if is_unix(address) else f"{address.rsplit(':', 1)[0]}:{bound}"
        return self.address

    @property
    def port(self) -> int:
        return 0 if is_unix(self.address) else int(self.address.rsplit(":", 1)[1])

    async def stop(self, grace: float) -> None:
        self.health.shutting_down()
        if self.server is not None:
            await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
