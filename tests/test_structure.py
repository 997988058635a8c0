"""The package's layering, checked on its source (imports inside functions count too).

Layers, lowest first; a module may import its own layer and the ones below:
  base (errors, version) < model < method < io < integration
  < entry points (the package itself, whose import registers the method; cli) < tools.
method/, model/ and io/ never import mergekit; nothing but the tools imports the tools.
"""

import ast
import os
from typing import Dict, List, Set

import pytest

from tests.support.paths import REPO

PACKAGE = "mergekit_com"
ROOT = os.path.join(REPO, PACKAGE)
LAYERS = [
    ("base", ["mergekit_com.errors", "mergekit_com.version"]),
    ("model", ["mergekit_com.model"]),
    ("method", ["mergekit_com.method"]),
    ("io", ["mergekit_com.io"]),
    ("integration", ["mergekit_com.integration"]),
    ("entry points", ["mergekit_com", "mergekit_com.cli"]),  # importing the package registers
    ("tools", ["mergekit_com.zoo", "mergekit_com.bench", "mergekit_com.evaluate",
               "mergekit_com.evaluate_lmeval", "mergekit_com.demo", "mergekit_com.quiet"]),
]
NO_MERGEKIT = ("mergekit_com.method", "mergekit_com.model", "mergekit_com.io")


def _modules() -> Dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for folder, _dirs, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imports(name: str) -> Set[str]:
    """Every module this one imports, anywhere in its body (absolute names)."""
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            # `from package import module` imports that module
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if f"{base}.{alias.name}" in MODULES)
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _internal(name: str) -> Set[str]:
    return {m for m in IMPORTS[name] if m in MODULES and m != name}


def _layer(name: str) -> int:
    best = None
    for index, (_label, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != PACKAGE and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    mine = _layer(name)
    for target in _internal(name):
        assert _layer(target) <= mine, (
            f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[_layer(target)][0]})")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(NO_MERGEKIT)))
def test_method_model_and_io_never_import_mergekit(name):
    bad = sorted(m for m in IMPORTS[name] if m == "mergekit" or m.startswith("mergekit."))
    assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    graph = {name: _internal(name) for name in MODULES}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_class_in_the_method_is_longer_than_about_200_lines():
    for name, path in MODULES.items():
        if not name.startswith(("mergekit_com.method", "mergekit_com.model")):
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 220, f"{name}.{node.name} has {length} lines"
