"""The house rules of the import graph: no cycles (imports inside functions and TYPE_CHECKING
blocks included), dependencies one way (job -> runtime -> services/store), clients that import no
server code, and public names that type checkers can see."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "matrix_hpc"
GENERATED = "matrix_hpc._gen"  # a leaf: generated modules import only protobuf, grpc and each other


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE.parent)
        if "_gen" in rel.parts or p.name.startswith("test_") or p.name == "conftest.py":
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    return mods


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the matrix_hpc modules it imports anywhere in its text."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(name, path, node):
                    if target.startswith(GENERATED):
                        continue
                    while target and target not in mods:
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        deps.add(target)
        graph[name] = deps
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack, path, on_path = [(start, iter(sorted(graph[start])))], [start], {start}
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            on_path.discard(path.pop())
        elif child in on_path:
            return path[path.index(child):] + [child]
        else:
            stack.append((child, iter(sorted(graph[child]))))
            path.append(child)
            on_path.add(child)
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # the package facade imports everything lazily and is imported by no module of ours
    assert not [m for m, deps in graph.items() if "matrix_hpc" in deps]
    cycles = [c for m in graph if (c := _cycle_from(graph, m))]
    assert cycles == []


def test_dependencies_run_one_way():
    below = {"matrix_hpc.job": ("matrix_hpc.runtime", "matrix_hpc.slurm"),
             "matrix_hpc.services": ("matrix_hpc.runtime", "matrix_hpc.job", "matrix_hpc.slurm"),
             "matrix_hpc.store": ("matrix_hpc.runtime", "matrix_hpc.job", "matrix_hpc.services", "matrix_hpc.slurm")}
    backwards = [(m, d) for m, deps in import_graph().items() for layer, banned in below.items()
                 if m.startswith(layer) for d in deps if d.startswith(banned)]
    assert backwards == []


def test_job_reads_only_the_list_of_service_kinds():
    """job/ validates each service entry with the class its kind names (``matrix_hpc.services``) and
    reaches no further into services/: what both need lives below them (``owner_only``, ``paths``)."""
    reached = {d for m, deps in import_graph().items() if m.startswith("matrix_hpc.job")
               for d in deps if d.startswith("matrix_hpc.services")}
    assert reached == {"matrix_hpc.services"}


def test_clients_import_no_server_code():
    graph = import_graph()
    for client in ("matrix_hpc.services.llm.client", "matrix_hpc.services.sandbox.client"):
        reach, todo = set(), [client]
        while todo:
            for d in graph[todo.pop()] - reach:
                reach.add(d)
                todo.append(d)
        servers = sorted(d for d in reach if d.rpartition(".")[2] in ("server", "deploy", "executor", "runtimes"))
        assert servers == [], client


def test_public_names_are_visible_to_type_checkers():
    assert (PACKAGE / "py.typed").is_file()
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    checked = {a.asname or a.name: imp.module for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", "") == "TYPE_CHECKING"
               for imp in node.body if isinstance(imp, ast.ImportFrom) for a in imp.names}
    import importlib

    import matrix_hpc

    assert set(matrix_hpc.__all__) - {"DONE"} <= set(checked)
    # each lazy name resolves at run time to the very object the type checkers are shown
    for name, module in checked.items():
        assert getattr(matrix_hpc, name) is getattr(importlib.import_module(module), name), name
