"""The package's layering: no import cycles, and lower layers never import upper ones.

The import graph is read statically with ``ast`` from every file of ``src/formerkit``: imports
at module level and inside functions both count, relative and absolute alike. ``from P import
x`` is an edge to the module ``P.x`` when that is a module, else to ``P`` (for a package, its
``__init__``). The parent packages Python imports implicitly are not edges.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "formerkit"

# lowest first: a module imports modules of its own layer or the layers below it, never above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "fieldtypes", "fileio", "rundir", "hardware", "presets", "config", "precision",
                    "cliargs", "version")),
    ("layers", ("layers", "cache")),
    ("model", ("heads", "inputs", "model")),
    ("text and data", ("tokenizers", "data")),
    ("checkpoints", ("checkpoints",)),
    ("tasks", ("generate", "embed", "predict", "convert", "quantize", "train", "interp", "compress", "serve",
               "repro")),
    ("command line", ("cli",)),
]
# the modules that must stay readable alone: nothing of what builds on them, even indirectly
LEAVES = ("formerkit.config", "formerkit.errors", "formerkit.fileio", "formerkit.layers")
UPPER = ("formerkit.checkpoints", "formerkit.train", "formerkit.generate", "formerkit.cli")


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` files name their package)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (see the module docstring)."""
    files = module_files(src)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if _within(alias.name, PACKAGE))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if not _within(base, PACKAGE):
                    continue
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {e for e in edges if e != name}
        unknown = {e for e in graph[name] if e not in files}
        assert not unknown, f"{name} imports {', '.join(sorted(unknown))}, which are not modules of the package"
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the first module of ``component``, as the list of modules along it (first = last)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` of the module's layer (the longest matching name wins), or None."""
    best = None
    for rank, (_, names) in enumerate(LAYERS):
        for name in names:
            full = f"{PACKAGE}.{name}"
            if _within(module, full) and (best is None or len(full) > len(best[1])):
                best = (rank, full)
    return best[0] if best else None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_there_is_no_import_cycle():
    graph = import_graph()
    cycles = [f"{len(c)} modules import each other ({', '.join(c)}); one cycle: {' -> '.join(a_cycle(graph, c))}"
              for c in strongly_connected(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_leaves_import_nothing_that_builds_on_them():
    graph = import_graph()
    for module in graph:
        if any(_within(module, leaf) for leaf in LEAVES):
            upper = sorted(m for m in reachable(graph, module) if any(_within(m, u) for u in UPPER))
            assert not upper, f"{module} imports (directly or through others) {', '.join(upper)}"


def test_every_import_goes_down_the_layers():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != PACKAGE and layer_of(m) is None)
    assert not unplaced, f"modules without a layer in LAYERS (add them): {', '.join(unplaced)}"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m in sorted(graph) if m != PACKAGE for t in sorted(graph[m])
              if t != PACKAGE and layer_of(t) > layer_of(m)]
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_only_the_package_itself_imports_its_top_level():
    """``import formerkit`` inside the package is an edge to ``__init__``, which imports nearly everything."""
    graph = import_graph()
    offenders = sorted(m for m, edges in graph.items() if PACKAGE in edges)
    assert not offenders, f"these modules import the top-level package; import the defining module: {offenders}"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from formerkit.a import x\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "e.py").write_text("")
    (package / "sub" / "b.py").write_text("import formerkit.sub.c as c\n")
    (package / "sub" / "c.py").write_text("from formerkit.sub import VALUE\nfrom .. import e\n")
    graph = import_graph(tmp_path)
    assert graph == {"formerkit": {"formerkit.a"}, "formerkit.a": {"formerkit.sub.b"}, "formerkit.e": set(),
                     "formerkit.sub": set(), "formerkit.sub.b": {"formerkit.sub.c"},
                     "formerkit.sub.c": {"formerkit.sub", "formerkit.e"}}
    assert strongly_connected(graph) == []
    (package / "sub" / "__init__.py").write_text("from formerkit.sub.b import c\n")
    graph = import_graph(tmp_path)
    assert [a_cycle(graph, c) for c in strongly_connected(graph)] == [
        ["formerkit.sub", "formerkit.sub.b", "formerkit.sub.c", "formerkit.sub"]]


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(module_files())
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    importlib.import_module(name)\n"
              "print('imported', len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
