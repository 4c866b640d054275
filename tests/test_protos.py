"""Generated code under matrix_hpc/_gen is what `python -m matrix_hpc.protogen` makes of protos/."""

from pathlib import Path

from matrix_hpc.protogen import GEN_DIR, generate_repo_protos


def test_generated_code_is_current(tmp_path: Path):
    generate_repo_protos(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    checked_in = {p.relative_to(GEN_DIR): p.read_text() for p in GEN_DIR.rglob("*.py*")}
    stale = sorted(str(p) for p in fresh if checked_in.get(p) != fresh[p])
    extra = sorted(str(p) for p in set(checked_in) - set(fresh))
    assert not stale and not extra, f"run `make protos`: stale {stale}, not from any proto {extra}"
