"""The import graph of the product code: no module imports itself back through others, and the engine's package
(`gptjax/`) imports nothing from the folders built on it, except where it dispatches to them.

Every import statement counts, at the top of a module or inside a function: a lazy import still ties the two
modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("gptjax", "serving", "checkpoints", "benchmarks")
# gptjax modules allowed to reach the other folders: the command line dispatches to them, and the Hub resolver
# runs the converters
DISPATCHERS = {"gptjax.cli", "gptjax.hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The product module an imported name lands in: the longest prefix of it that is a module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in (_resolve(n, modules) for n in names) if target and target != module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v roots a component: everything above it on the stack
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_reads_lazy_and_relative_imports():
    graph = import_graph()
    assert "gptjax.checkpoint" in graph["checkpoints.ft"]  # a top-level import
    assert "gptjax.hub" in graph["gptjax.engine"]  # inside a method
    assert "serving.proto.inference.model_config_pb2" in graph["serving.proto.inference.grpc_service_pb2"]  # `from .`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_gptjax_imports_nothing_from_the_folders_built_on_it():
    upward = {(module, target) for module, targets in import_graph().items()
              if module.split(".")[0] == "gptjax" and module not in DISPATCHERS
              for target in targets if target.split(".")[0] != "gptjax"}
    assert upward == set()


def long_functions(packages=("gptjax", "serving"), most: int = 60) -> list[str]:
    """Functions (and methods) of the product code longer than `most` lines, as `path:line name (n lines)`."""
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" in path.relative_to(ROOT).parts:  # generated
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > most:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_functions_fit_on_a_screen():
    assert long_functions() == []
    assert len((ROOT / "gptjax" / "engine.py").read_text().splitlines()) < 300
