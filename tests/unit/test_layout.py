"""The package's shape: short modules and functions, no import cycles, TensorFlow only where
training needs it, and one owner for the variables a launcher passes to a rank."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "knl_train"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# One algorithm each, long by nature (architecture review §4.12).
LONG_FUNCTIONS = {("tuning/plan.py", "plan"), ("data/pipeline.py", "images")}


def modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def test_no_module_is_longer_than_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules ``name`` imports anywhere in its body (function-level ones too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("knl_train"):
                out.add(target)
                # Importing a.b.c runs a and a.b first, unless this module is inside them already.
                parent = target.rpartition(".")[0]
                while parent and not name.startswith(parent + ".") and parent != name:
                    out.add(parent)
                    parent = parent.rpartition(".")[0]
    out.discard(name)
    return out


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules_function_level_imports_included():
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("modules_", [
    "knl_train.tuning, knl_train.studies, knl_train.train.config",
    "knl_train.runtime.rankenv, knl_train.runtime.bootstrap, knl_train.cli",
    "knl_train, knl_train.optim.names, knl_train.optim.recipes, knl_train.autotune.space",
])
def test_configs_presets_plans_and_studies_load_without_tensorflow(modules_):
    code = f"import {modules_}, sys; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def code_strings(path: Path) -> List[str]:
    """String constants in code, docstrings left out (docs may name the variables)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_rankenv_spells_knl_train_variables():
    spelled = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel == "runtime/rankenv.py":
            continue
        names = sorted({m for s in code_strings(path) for m in re.findall(r"KNL_TRAIN_[A-Z_]+", s)})
        if names:
            spelled[rel] = names
    assert spelled == {}
