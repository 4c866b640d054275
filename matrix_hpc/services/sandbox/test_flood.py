"""A flood against a standalone sandbox service with a secret (over TLS, as a secret on a TCP port must
be), run by an ordinary user (issue 17: it held; this keeps it so): 2,000 connections held open
that never finish their handshake, and 2,000 calls without the secret. Every call is refused, the
refusals are logged a line per 10 s, and the owner's call runs while the connections are held."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections import Counter

import grpc

from matrix_hpc.services import auth

from .client import SandboxClient
from .test_unprivileged import _read_line, _start, _stop

CONNECTIONS = CALLS = 2000


async def _calls_without_the_secret(address: str, cert: bytes) -> Counter:
    channels = [auth.channel(address, None, tls_cert=cert) for _ in range(20)]
    stats = [ch.unary_unary("/matrix_hpc.sandbox.v1.Sandbox/Stats") for ch in channels]
    try:
        got = await asyncio.gather(*[stats[i % 20](b"", timeout=120) for i in range(CALLS)], return_exceptions=True)
    finally:
        await asyncio.gather(*[ch.close() for ch in channels])
    return Counter(g.code().name if isinstance(g, grpc.aio.AioRpcError) else "OK" for g in got)


def test_2000_connections_and_calls_without_the_secret_leave_it_serving(aloop, unprivileged_user, user_dir,
                                                                        python_image):
    secret_file, tls_dir = user_dir / "sandbox.secret", user_dir / "tls"
    srv = _start(unprivileged_user, [sys.executable, "-m", "matrix_hpc.cli", "serve", "sandbox", "--host", "127.0.0.1",
                                     "--port", "0", "--image", str(python_image), "--secret-file", str(secret_file),
                                     "--tls-dir", str(tls_dir)])
    held: list[socket.socket] = []
    try:
        port = int(_read_line(srv, r"on 127\.0\.0\.1:(\d+)", 60).group(1))
        address = f"127.0.0.1:{port}"
        start = time.monotonic()
        for _ in range(CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))  # and silence
        cert = (tls_dir / "tls.crt").read_bytes()  # (the suite's user, root, reads the owner's files)
        refused = aloop.run(_calls_without_the_secret(address, cert), timeout=180)
        owner = SandboxClient([address], key="owner", secret=secret_file.read_text().strip(), tls_cert=cert)
        result = aloop.run(owner.run(["python3", "-c", "print(6 * 7)"]), timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for s in held:
            s.close()
        _stop(srv)
    log = srv.stdout.read().decode(errors="replace")
    # None got through. With the 2,000 idle connections held, a few percent of the refused calls end
    # as CANCELLED instead of UNAUTHENTICATED (grpc's server under that many open connections; none
    # without them): refused all the same.
    assert refused["OK"] == 0 and refused["UNAUTHENTICATED"] > 0, refused
    assert set(refused) <= {"UNAUTHENTICATED", "CANCELLED"}, refused
    assert (result.exit_code, result.stdout) == (0, "42\n"), result
    lines = re.findall(r"refused /matrix_hpc\.sandbox\.v1\.Sandbox/Stats from ", log)
    assert 1 <= len(lines) <= 2 + elapsed // 10, log[-3000:]
