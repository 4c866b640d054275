"""Generated code under matrix_hpc/_gen is what `python -m matrix_hpc.protogen` makes of protos/."""

from importlib.metadata import version
from pathlib import Path

from matrix_hpc.protogen import GEN_DIR, generate_repo_protos


def test_generated_code_is_current(tmp_path: Path):
    generate_repo_protos(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    checked_in = {p.relative_to(GEN_DIR): p.read_text() for p in GEN_DIR.rglob("*.py*")}
    stale = sorted(str(p) for p in fresh if checked_in.get(p) != fresh[p])
    extra = sorted(str(p) for p in set(checked_in) - set(fresh))
    assert not stale and not extra, (
        f"run `make protos` (grpcio-tools {version('grpcio-tools')}): stale {stale}, not from any proto {extra}"
    )


def test_generated_code_is_an_ordinary_package():
    import importlib.util

    import matrix_hpc
    from matrix_hpc._gen.sandbox.v1 import sandbox_pb2
    from matrix_hpc._gen.v1 import task_pb2

    assert len(matrix_hpc.__path__) == 1  # no second folder grafted onto the package
    assert importlib.util.find_spec("matrix_hpc.sandbox") is None  # only matrix_hpc.services.sandbox
    assert importlib.util.find_spec("matrix_hpc.v1") is None
    assert task_pb2.DESCRIPTOR.package == "matrix_hpc.v1"  # the wire names are unchanged
    assert sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"].full_name == "matrix_hpc.sandbox.v1.Sandbox"
    assert not (GEN_DIR / "v1" / "task_pb2_grpc.py").exists()  # task.proto declares no service
