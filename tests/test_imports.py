"""The package's import structure: no cycles, and the method package stands alone.

The graph is built from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
import at module level of ``a`` (also under ``if TYPE_CHECKING:`` or ``try:``), where ``from x import y``
resolves to the submodule ``x.y`` when ``y`` is one and to ``x`` otherwise. A package's ``__init__`` is
the module named after the package. The deferred graph adds the imports inside functions (the CLI's
lazy ones): a cycle there is one too, only hidden until the function runs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vcas_bench"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def top_level_imports(tree: ast.Module, deferred: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at module level, inside ``if`` and ``try`` blocks;
    with ``deferred`` every import statement, also those inside functions."""
    if deferred:
        return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement refers to (before resolving to known modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def resolve(name: str, known: set[str]) -> str | None:
    """The module ``name`` names: itself, ``x`` for an attribute ``x.y``, or None outside the package."""
    if name in known:
        return name
    parent = name.rpartition(".")[0]
    return parent if parent in known else None


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in top_level_imports(tree, deferred):
            names = imported_names(name, name in packages, node)
            if isinstance(node, ast.ImportFrom):
                # ``from x import y``: the submodule x.y if there is one, else x (y is an attribute).
                base, targets = names[-1], names[:-1]
                resolved = {t if t in known else base for t in targets}
            else:
                resolved = set(names)
            graph[name] |= {m for m in (resolve(r, known) for r in resolved) if m and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_relative_imports_submodules_and_guarded_imports():
    tree = ast.parse("from . import b\nfrom .c import f\nif X:\n    import vcas_bench.d\n"
                     "def g():\n    import vcas_bench.e\n")
    nodes = top_level_imports(tree)
    names = sorted(n for node in nodes for n in imported_names("vcas_bench.a", False, node))
    assert names == ["vcas_bench", "vcas_bench.b", "vcas_bench.c", "vcas_bench.c.f", "vcas_bench.d"]
    assert len(top_level_imports(tree, deferred=True)) == 4  # and vcas_bench.e, inside g()
    known = {"vcas_bench", "vcas_bench.c", "vcas_bench.c.f"}
    assert resolve("vcas_bench.c.f", known) == "vcas_bench.c.f" and resolve("vcas_bench.c.g", known) == \
        "vcas_bench.c" and resolve("torch.nn", known) is None


def test_find_cycle_finds_one_and_only_one_that_is_there():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_the_real_graph_has_edges_to_submodules():
    graph, deferred = import_graph(), import_graph(deferred=True)
    assert "vcas_bench.vcas.controller" in graph["vcas_bench.vcas"]
    assert "vcas_bench.samplers.base" in graph["vcas_bench.samplers.vcas"]
    assert "vcas_bench.train.run" not in graph["vcas_bench.cli"]  # imported inside hydra_main
    assert "vcas_bench.train.run" in deferred["vcas_bench.cli"]


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred"])
def test_the_package_has_no_import_cycle(deferred):
    cycle = find_cycle(import_graph(deferred))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_registry_packages_only_re_export():
    """``samplers``, ``models`` and ``tasks``: contracts in ``base.py``; no import after code (E402)."""
    for package in ("samplers", "models", "tasks"):
        source = (ROOT / package / "__init__.py").read_text()
        tree = ast.parse(source)
        code = [node for node in tree.body if not _docstring_import_or_all(node)]
        assert not code, f"vcas_bench/{package}/__init__.py line {code[0].lineno}: not a re-export (base.py)"
        assert "E402" not in source


def _docstring_import_or_all(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Constant)
    return isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith("vcas_bench.vcas")))
def test_the_method_package_imports_only_torch_stdlib_and_itself(module):
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    tree = modules()[module]
    for node in ast.walk(tree):  # every import, also inside functions
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                inside = name == "vcas_bench.vcas" or name.startswith("vcas_bench.vcas.")
                assert top in allowed or inside, f"{module} imports {name}"
