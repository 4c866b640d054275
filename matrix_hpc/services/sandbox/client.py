"""Async client of the sandbox service, for agents (``ctx.sandbox(name)``).

Cheap to create per step: the replicas (channels, load, health, finding a restarted replica) are
the service core's replica set, shared per process and event loop. A one-shot run goes to the
replica with the fewest calls outstanding; one that answers RESOURCE_EXHAUSTED (full) or
UNAVAILABLE is skipped for the next, with a bounded number of rounds and backoff. A session stays
on the replica that opened it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from matrix_hpc._gen.sandbox.v1 import sandbox_pb2 as pb
from matrix_hpc._gen.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from matrix_hpc.retry import retrying
from matrix_hpc.services.core.endpoint import ReplicaRef, ServiceEndpoint, addresses_uid
from matrix_hpc.services.core.replicas import Replica, ReplicaSet, replica_set

from .wire import MAX_MESSAGE, ServiceError

_LIMIT_NAMES = {v: k for k, v in {
    "memory": pb.LIMIT_MEMORY, "processes": pb.LIMIT_PROCESSES, "cpu_time": pb.LIMIT_CPU_TIME,
    "wall_time": pb.LIMIT_WALL_TIME, "file_size": pb.LIMIT_FILE_SIZE, "disk": pb.LIMIT_DISK,
    "output": pb.LIMIT_OUTPUT}.items()}
_RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


def _endpoint(addresses: list[str] | ServiceEndpoint, name: str, secret: str | None,
              tls_cert: bytes | None) -> ServiceEndpoint:
    """The endpoint itself, or one for servers known by address only (``matrix-hpc serve sandbox``)."""
    if isinstance(addresses, ServiceEndpoint):
        return addresses
    if not addresses:
        raise ServiceError(f"sandbox service {name!r} has no replicas")
    return ServiceEndpoint(name, [ReplicaRef(a) for a in addresses], secret=secret, tls_cert=tls_cert,
                           uid=addresses_uid(list(addresses), secret, tls_cert))


def _replicas(endpoint: ServiceEndpoint) -> ReplicaSet:
    return replica_set(endpoint, MAX_MESSAGE)


@dataclass
class RunResult:
    """What a command did. ``ok``: exit code 0 and no limit hit."""

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0
    peak_memory_bytes: int = 0
    limits_hit: list[str] = field(default_factory=list)  # memory, processes, cpu_time, wall_time, ...
    error: str = ""

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def limit_hit(self) -> str | None:
        return self.limits_hit[0] if self.limits_hit else None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.limits_hit and not self.error

    @classmethod
    def from_proto(cls, m: pb.ExecResult) -> RunResult:
        return cls(
            exit_code=m.exit_code, stdout_bytes=m.stdout, stderr_bytes=m.stderr, signal=m.signal,
            stdout_truncated=m.stdout_truncated, stderr_truncated=m.stderr_truncated,
            wall_time_s=m.wall_time_s, cpu_time_s=m.cpu_time_s, peak_memory_bytes=m.peak_memory_bytes,
            limits_hit=[_LIMIT_NAMES.get(x, str(x)) for x in m.limits_hit], error=m.error,
        )


def _argv(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return [str(c) for c in command]


def _files(files: Mapping[str, bytes | str] | None) -> list[pb.File]:
    out = []
    for path, content in (files or {}).items():
        if isinstance(content, str):
            content = content.encode()
        out.append(pb.File(path=path, content=content))
    return out


def _limits(limits: Mapping | None) -> pb.Limits | None:
    return pb.Limits(**limits) if limits else None


def _transient(e: BaseException) -> bool:
    """A replica full or down: another one (or the same, a little later) may take the call."""
    if isinstance(e, ServiceError):
        return e.code == "UNAVAILABLE"
    return isinstance(e, grpc.aio.AioRpcError) and e.code() in _RETRYABLE


def _error(e: grpc.aio.AioRpcError, what: str, address: str) -> ServiceError:
    return ServiceError(f"sandbox {what} failed on {address}: {e.code().name}: {e.details()}", e.code().name)


class SandboxClient:
    """``run`` one-shot commands and ``open_session`` for multi-step work; sessions belong to ``key``."""

    def __init__(self, addresses: list[str] | ServiceEndpoint, *, key: str | None = None, name: str = "sandbox",
                 default_wall_s: float = 30.0, margin_s: float = 60.0, max_rounds: int = 4,
                 secret: str | None = None, tls_cert: bytes | None = None) -> None:
        self.endpoint = _endpoint(addresses, name, secret, tls_cert)
        self.key = key or ""
        self.name = name
        self.default_wall_s = default_wall_s
        self.margin_s = margin_s
        self.max_rounds = max_rounds

    @property
    def addresses(self) -> list[str]:
        return self.endpoint.addresses

    def _deadline(self, limits: Mapping | None, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        wall = (limits or {}).get("wall_time_s") or self.default_wall_s
        return wall + self.margin_s

    async def _balanced(self, method: str, request, timeout: float) -> tuple[Replica, object]:
        """Call ``method`` on one replica, moving to the next when one is full or down; after a
        whole round of refusals, back off and go round again (``max_rounds`` rounds at most)."""
        replicas = _replicas(self.endpoint)
        n = len(replicas.replicas)
        avoid: set[str] = set()
        addr = ""
        try:
            async for attempt in retrying(attempts=self.max_rounds * n, every=n, base_s=0.1, cap_s=1.0,
                                          retry_on=_transient, what=f"sandbox {self.name!r} {method}"):
                with attempt:
                    r = replicas.pick(None, avoid)
                    if r is None:
                        raise ServiceError(f"sandbox {self.name!r} {method}: no replica is reachable now",
                                           "UNAVAILABLE")
                    addr = r.address
                    try:
                        async with r.call_turn():
                            return r, await getattr(r.stub(pb_grpc.SandboxStub), method)(request, timeout=timeout)
                    except grpc.aio.AioRpcError as e:
                        avoid.add(addr)
                        replicas.failed(r, e.code())
                        raise
        except grpc.aio.AioRpcError as e:
            raise _error(e, method, addr) from e

    async def run(self, command: str | list[str], *, files: Mapping[str, bytes | str] | None = None,
                  stdin: bytes | str = b"", env: Mapping[str, str] | None = None,
                  limits: Mapping | None = None, timeout: float | None = None) -> RunResult:
        """Run ``command`` (argv, or a string for /bin/sh -c) in a fresh sandbox with ``files`` in /work."""
        req = pb.RunRequest(command=_argv(command), files=_files(files),
                            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
                            env=dict(env or {}), limits=_limits(limits), owner=self.key)
        _, resp = await self._balanced("Run", req, self._deadline(limits, timeout))
        return RunResult.from_proto(resp)

    async def open_session(self, *, files: Mapping[str, bytes | str] | None = None,
                           env: Mapping[str, str] | None = None, limits: Mapping | None = None,
                           ttl_s: float | None = None, image: str = "") -> Session:
        """A sandbox whose /work persists across ``exec`` calls until ``close`` (or release, or TTL)."""
        req = pb.OpenSessionRequest(owner=self.key, image=image, files=_files(files), env=dict(env or {}),
                                    limits=_limits(limits), ttl_s=ttl_s or 0)
        replica, resp = await self._balanced("OpenSession", req, self.margin_s)
        return Session(self, replica, resp.session_id, self._deadline(limits, None))

    def session(self, address: str, session_id: str) -> Session:
        """The open session ``session_id`` on the replica at ``address`` (as a payload recorded them),
        to go on using it in a later step; NOT_FOUND on the first call if it is gone."""
        for replica in _replicas(self.endpoint).replicas:
            if replica.address == address:
                return Session(self, replica, session_id, self.default_wall_s)
        raise ServiceError(f"sandbox {self.name!r}: no replica at {address} (session {session_id})", "NOT_FOUND")

    async def stats(self) -> list[pb.StatsResponse]:
        return [await r.stub(pb_grpc.SandboxStub).Stats(pb.StatsRequest(), timeout=10)
                for r in _replicas(self.endpoint).replicas]


class Session:
    """An open sandbox session on one replica. Use as ``async with``, or call ``close()``."""

    def __init__(self, client: SandboxClient, replica: Replica, session_id: str, deadline_s: float) -> None:
        self.client = client
        self.replica = replica
        self.address = replica.address
        self.id = session_id
        self._deadline_s = deadline_s

    async def _call(self, method: str, request, timeout: float):
        try:
            return await getattr(self.replica.stub(pb_grpc.SandboxStub), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _error(e, method, self.address) from e

    async def exec(self, command: str | list[str], *, stdin: bytes | str = b"",
                   env: Mapping[str, str] | None = None, limits: Mapping | None = None,
                   timeout: float | None = None) -> RunResult:
        req = pb.ExecRequest(session_id=self.id, command=_argv(command),
                             stdin=stdin.encode() if isinstance(stdin, str) else stdin,
                             env=dict(env or {}), limits=_limits(limits))
        wall = (limits or {}).get("wall_time_s")
        t = timeout if timeout is not None else (wall + self.client.margin_s if wall else self._deadline_s)
        return RunResult.from_proto(await self._call("Exec", req, t))

    async def put(self, files: Mapping[str, bytes | str]) -> None:
        await self._call("PutFiles", pb.PutFilesRequest(session_id=self.id, files=_files(files)),
                         self.client.margin_s)

    async def get(self, paths: list[str] | str) -> dict[str, bytes]:
        """Contents of these files (relative to /work); missing ones are left out of the dict."""
        if isinstance(paths, str):
            paths = [paths]
        resp = await self._call("GetFiles", pb.GetFilesRequest(session_id=self.id, paths=list(paths)),
                                self.client.margin_s)
        return {f.path: f.content for f in resp.files}

    async def close(self) -> bool:
        resp = await self._call("CloseSession", pb.CloseSessionRequest(session_id=self.id), self.client.margin_s)
        return resp.closed

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.close()
        except ServiceError:
            pass


async def release(addresses: list[str] | ServiceEndpoint, owners: list[str], timeout: float = 30.0,
                  secret: str | None = None, tls_cert: bytes | None = None) -> int:
    """Close every session of these owners on every replica; returns how many were closed."""
    if not owners:
        return 0
    req = pb.ReleaseOwnersRequest(owners=list(owners))
    total = 0
    errors = []
    replicas = _replicas(_endpoint(addresses, "sandbox", secret, tls_cert)).replicas
    for r in replicas:
        try:
            total += (await r.stub(pb_grpc.SandboxStub).ReleaseOwners(req, timeout=timeout)).sessions_closed
        except grpc.aio.AioRpcError as e:
            errors.append(_error(e, "ReleaseOwners", r.address))
    if errors and len(errors) == len(replicas):
        raise errors[0]
    return total
