"""Sub-commands ``serve sandbox`` (a standalone gRPC server) and ``image build NAME``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from matrix_hpc.services.auth import OPEN_SERVER_WARNING, CredentialError, add_credential_arguments, serve_credentials
from matrix_hpc.services.core.listen import serve_address


def register_serve(sub) -> None:
    p = sub.add_parser(
        "sandbox",
        help="run the sandbox service (bubblewrap or Apptainer) as a standalone gRPC server",
        description="Serve matrix_hpc.sandbox.v1.Sandbox (one-shot runs and sessions) and the standard "
        "gRPC health service. Commands run locked down: no network unless --network, a fresh /work, "
        "wall-clock, CPU, memory, process, output and file-size limits, no process left behind. "
        "Every call but health checks must carry the secret of --secret-file. "
        "Example: matrix-hpc serve sandbox --socket ~/.matrix-hpc/sandbox.sock --image python "
        "--secret-file ~/.matrix-hpc/sandbox.secret",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback: needs --secret-file)")
    add_credential_arguments(p)
    p.add_argument("--port", type=int, default=50071, help="port to bind (0: any free port)")
    p.add_argument("--runtime", choices=["bwrap", "apptainer"], default="bwrap")
    p.add_argument("--image", default="python",
                   help="built image name (see `matrix-hpc image build`), root filesystem directory or .sif")
    p.add_argument("--network", action="store_true", help="allow network access inside sandboxes")
    p.add_argument("--max-concurrent", type=int, default=0, help="sandboxes running at once (0: CPU count)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--session-ttl", type=float, default=600.0, help="idle seconds before a session is reaped")
    p.add_argument("--wall-time", type=float, default=30.0, help="default wall-clock limit per command (s)")
    p.add_argument("--cpu-time", type=float, default=30.0, help="default CPU-time limit per command (s)")
    p.add_argument("--memory-mb", type=int, default=512, help="default memory cap per command (MiB)")
    p.add_argument("--max-processes", type=int, default=64, help="default process/thread cap per command")
    p.add_argument("--max-output-kb", type=int, default=1024, help="default bytes kept per stream (KiB)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from .deploy import describe_source
    from .server import SandboxServer
    from .spec import Limits, SandboxSpec
    from .wire import ServiceError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        spec = SandboxSpec(
            runtime=args.runtime, image=args.image, network=args.network,
            max_concurrent=args.max_concurrent, max_queue=args.max_queue, session_ttl_s=args.session_ttl,
            limits=Limits(wall_time_s=args.wall_time, cpu_time_s=args.cpu_time,
                          memory_bytes=args.memory_mb << 20, max_processes=args.max_processes,
                          max_output_bytes=args.max_output_kb << 10),
        )
    except ValueError as e:
        print(f"matrix-hpc serve sandbox: {e}", file=sys.stderr)
        return 2

    try:
        secret, tls = serve_credentials(args, "sandbox")
        address = serve_address(args)
    except CredentialError as e:
        print(f"matrix-hpc serve sandbox: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            server = SandboxServer(spec)
            bound = await server.serve_at(address, secret=secret, tls=tls)
        except (ServiceError, RuntimeError) as e:
            print(f"matrix-hpc serve sandbox: {e}", file=sys.stderr)
            return 1
        print(f"sandbox service ({describe_source(spec)}) on {bound}", flush=True)
        if secret is None:
            print(OPEN_SERVER_WARNING, file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()
        return 0

    return asyncio.run(main())


def register_image(sub) -> None:
    p = sub.add_parser("image", help="build sandbox images (root filesystems for bwrap / Apptainer)")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = isub.add_parser(
        "build",
        help="build an image with debootstrap (cached: a no-op when already built)",
        description="Build image NAME into $MATRIX_HPC_CACHE/images/NAME with debootstrap from the "
        "Debian mirror this machine's apt uses (needs root and debootstrap). The directory is used "
        "by the bwrap runtime and runs under Apptainer as a sandbox directory; containers/NAME.def "
        "builds the same image as a .sif.",
    )
    b.add_argument("name", help="image to build (known: python)")
    b.add_argument("--mirror", default=None, help="Debian mirror URL (default: the one apt uses)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.set_defaults(func=_build)


def _build(args) -> int:
    from .image import ImageError, build_image, is_built

    cached = is_built(args.name) and not args.force
    try:
        path = build_image(args.name, mirror=args.mirror, force=args.force)
    except ImageError as e:
        print(f"matrix-hpc image build: {e}", file=sys.stderr)
        return 1
    print(f"image {args.name}: {path}{' (cached)' if cached else ''}")
    return 0
