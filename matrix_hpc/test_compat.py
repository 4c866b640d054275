"""The private names matrix-hpc borrows from Ray, submitit and zarr are all in matrix_hpc/_compat.py,
and each is still there, with the shape we use, in the installed versions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from matrix_hpc import _compat

PACKAGE = Path(__file__).resolve().parent
_LIBRARIES = ("ray", "submitit", "zarr", "grpc", "vllm")
_INTERNAL_MODULES = ("zarr.core.sync",)  # internals whose names have no underscore


@pytest.mark.parametrize("what", sorted(_compat.BORROWED))
def test_the_installed_library_still_has_it(what):
    _compat.BORROWED[what]()  # raises IncompatibleLibrary naming the library, its version and the name


def test_a_changed_library_is_named_with_its_version(monkeypatch):
    from importlib import metadata

    import ray._private.worker

    monkeypatch.delattr(ray._private.worker, "print_to_stdstream")
    expected = f"ray {metadata.version('ray')} changed ray._private.worker.print_to_stdstream (gone)"
    with pytest.raises(_compat.IncompatibleLibrary, match=re.escape(expected) + ".*update matrix_hpc/_compat.py"):
        _compat.BORROWED["ray._private.worker (print_to_stdstream, stdstream dispatcher)"]()


def _private_uses(path: Path) -> list[str]:
    """``_name`` segments of imports from, or attributes of names imported from, the libraries."""
    tree = ast.parse(path.read_text())
    library_names, uses = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                full = f"{module}.{alias.name}" if module else alias.name
                if full.split(".")[0] in _LIBRARIES:
                    library_names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in full.split(".")[1:]) or full.startswith(_INTERNAL_MODULES):
                        uses.append(f"{path.name}:{node.lineno}: {full}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in library_names:
                uses.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return uses


def test_no_other_module_uses_a_private_name():
    found = [use for p in sorted(PACKAGE.rglob("*.py")) if "_gen" not in p.parts and p.name != "_compat.py"
             and not p.name.startswith("test_") and p.name != "conftest.py" for use in _private_uses(p)]
    assert found == [], "borrow private names only through matrix_hpc/_compat.py"


def test_the_scan_sees_a_private_name(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import ray\nfrom zarr.core.sync import sync\nray._private.worker.x = 1\n")
    assert _private_uses(sample) == ["sample.py:2: zarr.core.sync.sync", "sample.py:3: ray._private"]
