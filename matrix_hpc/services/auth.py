"""Run credentials for the gRPC services: a secret kept in an owner-only file, required on every call.

A run (or an operator of ``matrix-hpc serve``) holds one secret. Servers take it and refuse every
call whose ``authorization`` metadata is not ``Bearer <secret>`` with UNAUTHENTICATED (checked in
constant time; the health service stays open so that load balancers and probes work). Clients add
the metadata to every call through a channel interceptor, so no call site can forget it.

The secret never goes on a command line, in an environment variable or in a log line: it is read
from its file and handed over in memory (Ray actor arguments, endpoint objects whose ``repr`` hides it).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from matrix_hpc.owner_only import (  # noqa: F401 - re-exported: the servers' credential files
    CredentialError,
    check_private_folder,
    new_secret,
    private_folder,
    read_secret_file,
    secret_file,
)

log = logging.getLogger("matrix_hpc.auth")

METADATA_KEY = "authorization"
_SCHEME = "Bearer "
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_LOG_EVERY_S = 10.0  # at most one refusal line per peer host in this interval


def is_loopback(host: str) -> bool:
    """A loopback address, or a Unix socket (``unix:PATH``): reachable from this machine only."""
    if host.startswith("unix:"):
        return True
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- server side ----------------------------------------------------------------------------------


class _RefusalLog:
    """Log refused calls with their peer, at most once per host and interval (a scan must not flood)."""

    def __init__(self, service: str):
        self.service = service
        self.last: dict[str, tuple[float, int]] = {}  # host -> (last logged, refusals not logged since)

    def refused(self, peer: str, method: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        logged, hidden = self.last.get(host, (-_LOG_EVERY_S, 0))
        if now - logged < _LOG_EVERY_S:
            self.last[host] = (logged, hidden + 1)
            return
        if len(self.last) > 4096:
            self.last.clear()
        self.last[host] = (now, 0)
        more = f" (and {hidden} more refused call(s) from this host since the last line)" if hidden else ""
        log.warning("%s: refused %s from %s: %s%s", self.service, method, peer, reason, more)


def _refusing_handler(handler: grpc.RpcMethodHandler, deny) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without parsing the request."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, response_serializer=handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Let a call through only with ``authorization: Bearer <secret>`` (health checks excepted)."""

    def __init__(self, secret: str, service: str):
        if not secret:
            raise ValueError("AuthInterceptor needs a non-empty secret")
        self._expected = (_SCHEME + secret).encode()
        self._log = _RefusalLog(service)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        given = [v for k, v in (details.invocation_metadata or ()) if k == METADATA_KEY]
        if len(given) == 1:
            value = given[0].encode() if isinstance(given[0], str) else given[0]
            if hmac.compare_digest(value, self._expected):
                return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without the interceptor
        reason = "no credentials" if not given else "wrong credentials"

        async def deny(_request, context):
            self._log.refused(context.peer(), details.method, reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{reason}: this service needs the run's secret (authorization metadata)")

        return _refusing_handler(handler, deny)


def server_interceptors(secret: str | None, service: str) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for ``grpc.aio.server``: none without a secret (an open, loopback-only server)."""
    return [AuthInterceptor(secret, service)] if secret else []


def check_bind(host: str, secret: str | None, what: str) -> None:
    """Refuse to serve beyond loopback without a secret."""
    if not secret and not is_loopback(host):
        raise CredentialError(
            f"{what}: refusing to listen on {host} without a secret: anyone who can reach it could use it. "
            "Give --secret-file, or bind 127.0.0.1"
        )


# -- client side ----------------------------------------------------------------------------------


class _AddCredentials:
    def __init__(self, secret: str):
        self._pair = (METADATA_KEY, _SCHEME + secret)

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()))
        metadata.add(*self._pair)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _UnaryUnary(_AddCredentials, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_AddCredentials, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_AddCredentials, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddCredentials, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def client_interceptors(secret: str | None) -> list:
    """Interceptors for ``grpc.aio.insecure_channel`` that send the secret on every call (one object
    per call kind: the channel files each interceptor under the first kind it matches)."""
    if not secret:
        return []
    return [kind(secret) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def channel(address: str, secret: str | None, options: list | None = None,
            tls_cert: bytes | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` that sends ``secret`` (if any) with every call; with
    ``tls_cert`` (the run's certificate), over TLS, trusting that certificate alone."""
    if tls_cert is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=client_interceptors(secret))
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_cert),
                                   options=[*(options or []), ("grpc.ssl_target_name_override", TLS_NAME)],
                                   interceptors=client_interceptors(secret))


# -- TLS: a self-signed certificate per run ------------------------------------------------------

TLS_NAME = "matrix-hpc-run"  # the certificate's only name; clients check it whatever address they dial


@dataclass(frozen=True)
class TLSPair:
    """A run's certificate (public: endpoints carry it to clients) and its private key (servers only)."""

    cert: bytes
    key: bytes = field(repr=False)


def new_tls_pair(days: int = 366) -> TLSPair:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return TLSPair(cert.public_bytes(serialization.Encoding.PEM),
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


def tls_pair(folder: str | Path) -> TLSPair:
    """The certificate and key in ``folder`` (tls.crt, tls.key, both 0600), made on first use."""
    folder = private_folder(folder)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    if not key_path.exists():
        pair = new_tls_pair()
        for path, data in ((cert_path, pair.cert), (key_path, pair.key)):  # the key last: it marks completion
            tmp = folder / f".{path.name}.{os.getpid()}"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    return TLSPair(read_secret_file(cert_path).encode() + b"\n", read_secret_file(key_path).encode() + b"\n")


def bind(server: grpc.aio.Server, address: str, tls: TLSPair | None) -> int:
    """Add a listening port to ``server`` (TLS with ``tls``); returns the bound port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.cert)]))


# -- `matrix-hpc serve` ---------------------------------------------------------------------------

def add_credential_arguments(parser) -> None:
    """``--secret-file``, ``--tls-dir`` and ``--socket`` of a ``matrix-hpc serve`` command."""
    parser.add_argument(
        "--socket", type=Path,
        help="listen on this Unix socket instead of --host/--port: only this user can connect, and no one "
        "else can take its place (its folder is made owner-only, or must be). Clients: unix:PATH")
    parser.add_argument(
        "--secret-file", type=Path,
        help="file holding the secret every client must send (created owner-only with a fresh secret if "
        "missing; refused if other users can read it). Required to bind beyond loopback. Clients: "
        "matrix_hpc.services.auth.read_secret_file(PATH)")
    parser.add_argument(
        "--tls-dir", type=Path,
        help="serve over TLS with the self-signed certificate in this folder (tls.crt, tls.key; made "
        "owner-only if missing). Clients trust that certificate alone: tls_cert=open(DIR/tls.crt, 'rb').read()")


def serve_credentials(args, what: str) -> tuple[str | None, TLSPair | None]:
    """The secret and TLS pair a standalone server uses (from ``add_credential_arguments``); refuses
    to bind ``args.host`` beyond loopback without a secret, and a secret on a TCP port without TLS:
    whoever takes the port while the server restarts would receive it. Raises CredentialError."""
    if args.secret_file is None:
        check_bind(args.host, None, what)
        secret = None
    else:
        secret = secret_file(args.secret_file)
        if args.socket is None and args.tls_dir is None:
            raise CredentialError(
                f"{what}: refusing to serve --secret-file on a TCP port without --tls-dir: any user of this "
                "machine can take the port while the server is down, and clients would send them the secret. "
                "Give --tls-dir DIR (clients trust its certificate alone), or --socket PATH (this machine only)")
    return secret, tls_pair(args.tls_dir) if args.tls_dir else None


OPEN_SERVER_WARNING = "warning: no --secret-file: any user of this machine can call this server"

