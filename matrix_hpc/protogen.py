"""Compile .proto files with grpcio-tools (protoc inside Python, no system protoc needed).

Two users: our own protos under ``protos/`` (generated into ``matrix_hpc/_gen``, checked in,
regenerated with ``python -m matrix_hpc.protogen``) and a job's payload protos, compiled
when the job starts so every node can import them.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_tools import protoc

REPO_PROTOS = Path(__file__).resolve().parent.parent / "protos"
GEN_DIR = Path(__file__).resolve().parent / "_gen"


class ProtoCompileError(Exception):
    """protoc rejected a .proto file; the message carries protoc's file:line:column text."""


def _well_known_include() -> str:
    return str(importlib.resources.files("grpc_tools") / "_proto")


def compile_protos(
    root: Path,
    files: list[Path],
    out_dir: Path,
    *,
    grpc: bool = False,
    descriptor_set: Path | None = None,
) -> None:
    """Run protoc on ``files`` (paths under ``root``), writing Python modules into ``out_dir``.

    Raises ProtoCompileError with protoc's own messages (``file:line:col: error``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = [str(Path(f).resolve().relative_to(root.resolve())) for f in files]
    args = ["protoc", f"-I{root}", f"-I{_well_known_include()}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    if grpc:
        args.append(f"--grpc_python_out={out_dir}")
    if descriptor_set is not None:
        args += [f"--descriptor_set_out={descriptor_set}", "--include_imports"]
    # protoc writes its diagnostics to the process's fd 2; capture them for the error.
    with tempfile.TemporaryFile(mode="w+") as err:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(err.fileno(), 2)
        try:
            code = protoc.main(args + rel)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read().strip()
    if code != 0:
        raise ProtoCompileError(text or f"protoc exited with {code} for {', '.join(rel)}")


def pool_from_descriptor_set(descriptor_set: bytes) -> descriptor_pool.DescriptorPool:
    """A private pool holding the files of a descriptor set (no global registration, no imports).

    Raises whatever protobuf raises for bytes that are not a FileDescriptorSet, or a file that
    cannot be added; callers word the error for their context.
    """
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:  # protoc --include_imports writes dependencies first
        pool.Add(f)
    return pool


def repo_proto_files() -> list[Path]:
    return sorted(REPO_PROTOS.rglob("*.proto"))


def generate_repo_protos(out_dir: Path = GEN_DIR) -> None:
    """Regenerate the checked-in code for everything under protos/ (services get gRPC stubs)."""
    compile_protos(REPO_PROTOS, repo_proto_files(), out_dir, grpc=True)


if __name__ == "__main__":
    generate_repo_protos()
    print(f"generated {len(repo_proto_files())} proto file(s) into {GEN_DIR}")
