"""Sub-command ``matrix-hpc serve llm``: one LLM replica as a standalone gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from matrix_hpc.services.auth import OPEN_SERVER_WARNING, CredentialError, add_credential_arguments, serve_credentials
from matrix_hpc.services.core.listen import serve_address

_EPILOG = """\
examples:
  # the embedded SmolLM2-135M on this CPU (run `make model` once first)
  matrix-hpc serve llm --backend vllm --model smollm2-135m --port 50051
  # a local model folder on 2 GPUs (tensor parallel)
  matrix-hpc serve llm --backend vllm --model /models/Qwen2.5-7B-Instruct --gpus 2 --port 50051
  # forward to an OpenAI-compatible server; the key is read from $OPENAI_API_KEY
  matrix-hpc serve llm --backend openai --base-url https://api.example.com/v1 \\
      --model gpt-4o-mini --api-key-env OPENAI_API_KEY --port 50051
  # a scripted stand-in (tests and benchmarks only: echoes the last user message)
  matrix-hpc serve llm --backend scripted --port 50051
  # everything from a YAML/JSON file holding one LLMSpec (flags given override it)
  matrix-hpc serve llm --spec teacher.yaml --port 50051

The server speaks matrix_hpc.llm.v1.LLM (protos/matrix_hpc/llm/v1/llm.proto) and the standard
grpc.health.v1.Health service. With --secret-file, every call but health checks must carry that
secret, and the server listens on a Unix socket (--socket PATH) or over TLS (--tls-dir DIR);
without one it only binds loopback. From Python:
  secret = read_secret_file("llm.secret")   # from matrix_hpc.services.auth
  LLMEndpoint.from_addresses(["unix:/home/me/.matrix-hpc/llm.sock"], secret=secret).client().chat([...])
"""


def register_serve(sub) -> None:
    p = sub.add_parser(
        "llm",
        help="serve an LLM (vLLM, an OpenAI-compatible upstream, or scripted) over gRPC",
        description="Run one LLM replica as a gRPC server (matrix_hpc.llm.v1.LLM + grpc health) "
        "until interrupted. Inside a job, replicas are started for you from services.llm.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--spec", type=Path, help="YAML or JSON file with one LLMSpec (the job's services.llm entry)")
    p.add_argument("--name", default="llm", help="service name reported by ModelInfo (default: llm)")
    p.add_argument("--backend", choices=["vllm", "openai", "scripted", "sim"], help="default: vllm")
    p.add_argument(
        "--model",
        help="vllm: 'smollm2-135m' (embedded) or a Hugging Face model folder; openai: the upstream model name",
    )
    p.add_argument("--served-name", help="the name requests may use in `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; 0.0.0.0 for all, which needs --secret-file)")
    add_credential_arguments(p)
    p.add_argument("--port", type=int, default=50051, help="port to bind (0: any free port; default: 50051)")
    p.add_argument("--gpus", type=int, help="vllm: GPUs for tensor parallelism (0: CPU build; default 0)")
    p.add_argument("--max-model-len", type=int, help="vllm: context length (default 2048 on CPU)")
    p.add_argument("--max-concurrency", type=int, help="requests admitted at once (default 256)")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vllm: extra AsyncEngineArgs, VALUE parsed as JSON when it can be (repeatable)",
    )
    p.add_argument("--base-url", help="openai: the upstream, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", help="openai: environment variable holding the API key")
    p.add_argument("--base-dir", type=Path, default=Path("."), help="folder relative model paths start from")
    p.set_defaults(func=_serve)


def _build_spec(args):
    from matrix_hpc.services.llm.spec import LLMSpec

    data: dict = {}
    if args.spec:
        import yaml

        data = yaml.safe_load(args.spec.read_text()) or {}
    for flag, key in [
        ("backend", "backend"),
        ("model", "model"),
        ("served_name", "served_name"),
        ("gpus", "gpus_per_replica"),
        ("max_model_len", "max_model_len"),
        ("max_concurrency", "max_concurrency"),
        ("base_url", "base_url"),
        ("api_key_env", "api_key_env"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    for item in args.engine_arg:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        data.setdefault("engine_args", {})[key] = value
    data.pop("replicas", None)  # one process serves one replica
    return LLMSpec.model_validate(data)


def _serve(args) -> int:
    from pydantic import ValidationError

    from matrix_hpc.services.llm.errors import ServiceError

    try:
        spec = _build_spec(args)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        secret, tls = serve_credentials(args, f"LLM {args.name!r}")
        address = serve_address(args)
    except CredentialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(spec, args, address, secret, tls))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


async def _run(spec, args, address: str, secret: str | None, tls) -> int:
    import logging

    from matrix_hpc.services.llm.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await serve(spec, args.name, address=address, base_dir=args.base_dir, secret=secret, tls=tls)
    except Exception as e:  # noqa: BLE001 - each backend fails its own way; the command says which and exits 1
        print(f"error: the {spec.backend} backend failed to start: {e}", file=sys.stderr)
        return 1
    print(f"serving {args.name!r} ({spec.backend}, {spec.name_served}) on {server.address}", flush=True)
    if secret is None:
        print(OPEN_SERVER_WARNING, file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop()
    return 0
