"""The layering of the package (docs/architecture.md), checked on the source.

* No import cycles between genprog's modules, counting every import (module level or
  inside a function): the import graph read from the source is acyclic.
* No function-level (lazy) imports of genprog modules — the usual way a cycle is hidden —
  except the entries of ``LAZY_ALLOWED``, each with its reason.
* Each layer imports only the layers below it (``LAYERS``).
* A few modules import in a fresh interpreter on their own (no hidden order dependence).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: lazy imports that stay, with why
LAZY_ALLOWED = {
    # gp.capabilities() reads the zoo's table; importing the whole zoo on `import genprog`
    # would slow every start-up, and the zoo sits above the core.
    ("genprog", "genprog.models"),
}

#: layer of each package prefix (longest prefix wins); a module may import only modules of
#: its own layer or below
LAYERS = [
    ("genprog.errors", 0), ("genprog.validation", 0), ("genprog.inputs", 0),
    ("genprog.estimate", 0), ("genprog.rng", 0), ("genprog.monte_carlo", 0),
    ("genprog.threads", 0), ("genprog.optim", 0), ("genprog.dtypes", 0),
    ("genprog.sites", 1), ("genprog.handlers", 1), ("genprog.vectorize", 1), ("genprog.vmap_einsum", 1),
    ("genprog.density", 1), ("genprog.convergence", 1), ("genprog.arviz_convert", 1),
    ("genprog.infer", 2),
    ("genprog.fit", 3),
    ("genprog.model", 4),
    ("genprog.pk", 5), ("genprog.models", 5),
    ("genprog", 6),  # the package's __init__: the public API
]


def _module_files():
    out = {}
    for base, pkg in ((ROOT / "genprog", "genprog"), (ROOT / "models", "genprog.models")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts]) if parts else pkg] = path
    return out


MODULES = _module_files()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(target module, lazy?)`` for every genprog import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    lazy_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lazy_nodes.add(id(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("genprog"):
                yield name, id(node) in lazy_nodes


def _layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


GRAPH = {m: sorted({t for t, _ in _imports(m)}) for m in MODULES}


def _is_package_init(target: str) -> bool:
    return MODULES[target].name == "__init__.py"


def test_no_import_cycles():
    """Depth-first search for a back edge in the module import graph. An import of a
    package's ``__init__`` by one of its own modules is a cycle too."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in GRAPH[m]:
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_lazy_imports_of_genprog_modules():
    lazy = sorted({(m, t) for m in MODULES for t, is_lazy in _imports(m) if is_lazy} - LAZY_ALLOWED)
    assert not lazy, "function-level imports of genprog modules (move them to the top): " + str(lazy)


def test_layers_import_only_downwards():
    upward = [(m, t) for m in MODULES for t in GRAPH[m]
              if _layer(t) > _layer(m) and (m, t) not in LAZY_ALLOWED
              and not (t == "genprog" or _is_package_init(t) and m.startswith(t + "."))]
    assert not upward, "imports of a higher layer: " + str(upward)


def _private_imports(module: str):
    """``(target, name)`` for every ``from <genprog module> import _name`` in ``module``."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.startswith("genprog"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        yield target, a.name


def test_no_module_imports_another_modules_private_names():
    """What one module shares with another is public (and documented); a ``_name`` is the
    module's own business."""
    private = sorted((m, t, n) for m in MODULES for t, n in _private_imports(m))
    assert not private, "imports of private names (make them public): " + str(private)


def test_checker_sees_a_cycle():
    """The cycle finder itself: a two-module cycle is reported."""
    saved = dict(GRAPH)
    try:
        GRAPH["genprog.errors"] = ["genprog.validation"]
        GRAPH["genprog.validation"] = ["genprog.errors"]
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("module", ["genprog.density", "genprog.infer.nuts", "genprog.fit",
                                    "genprog.pk.data", "genprog.pk.estimation"])
def test_module_imports_in_isolation(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
