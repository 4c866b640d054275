"""Where a replica listens, and what a client checks before it trusts an address.

On one machine a replica listens on a Unix socket in a folder only the run's owner can enter: no
other user can connect to it, and no other user can take its place when it dies (a port on
loopback can be bound by anyone the moment it is free). Across nodes (``MATRIX_HPC_CLUSTER``, set
by the Slurm launcher, or a Ray cluster of several nodes) it listens on its node's address, on a
port the kernel picks, over TLS with the run's certificate: a server without the run's key cannot
complete the handshake, so the run's secret is never sent to it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matrix_hpc.services.auth import CredentialError, check_private_folder, private_folder

CLUSTER_ENV = "MATRIX_HPC_CLUSTER"
UNIX = "unix:"
SUN_PATH_MAX = 107  # bytes of a socket path the kernel keeps (sockaddr_un.sun_path, less the NUL)
_TEMP_PREFIX = "mhpc-sock-"


def on_cluster() -> bool:
    """True where the services must be reached from other nodes (the Slurm launcher says so)."""
    return bool(os.environ.get(CLUSTER_ENV))


def is_unix(address: str) -> bool:
    return address.startswith(UNIX)


def tcp_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def node_address(port: int = 0) -> str:
    """``host:port`` on this node's address (as Ray knows it), for a replica reached from other nodes."""
    import ray

    return tcp_address(ray.util.get_node_ip_address(), port)


def _fits(folder: Path, longest_name: str) -> bool:
    return len(os.fsencode(folder / longest_name)) <= SUN_PATH_MAX


def socket_folder(preferred: str | Path | None, longest_name: str) -> tuple[Path, bool]:
    """An owner-only folder for the sockets of one deployment, and whether it is a fresh temporary one
    (to remove at shutdown). ``preferred`` (a folder inside the run directory) is made 0700 or checked;
    where it is missing, or a socket path in it would pass the kernel's limit, a private folder is made
    in the temporary directory (``mkdtemp``: 0700, a name no one could have guessed)."""
    if preferred is not None:
        folder = Path(preferred).resolve()
        if _fits(folder, longest_name):
            return private_folder(folder), False
    folder = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    if not _fits(folder, longest_name):
        os.rmdir(folder)
        raise CredentialError(f"{folder}: the temporary folder's path is too long for a Unix socket; set TMPDIR")
    return folder, True


def check_address(address: str) -> None:
    """Before a client connects (and sends the run's secret): a Unix socket must be in a folder of
    ours that no one else can enter, or someone else could have put it there. Raises CredentialError."""
    if is_unix(address):
        path = Path(address[len(UNIX):])
        try:
            check_private_folder(path.parent)
        except CredentialError as e:
            raise CredentialError(f"refusing to connect to {address}: {e}") from None


def prepare_socket(address: str) -> None:
    """Before a replica binds a Unix socket: its folder is ours and owner-only, and the socket file a
    previous incarnation left behind is removed (only we can have made it there)."""
    if is_unix(address):
        check_address(address)
        path = Path(address[len(UNIX):])
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def serve_address(args) -> str:
    """Where a ``matrix-hpc serve`` command listens: ``unix:PATH`` for ``--socket PATH`` (its folder made
    owner-only, or checked; CredentialError otherwise), else ``--host``:``--port``."""
    if args.socket is None:
        return tcp_address(args.host, args.port)
    path = Path(args.socket).absolute()
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise CredentialError(f"{path}: longer than a Unix socket path may be ({SUN_PATH_MAX} bytes)")
    private_folder(path.parent)
    return UNIX + str(path)
