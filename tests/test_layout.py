"""The package's shape: one package per pipeline stage, no import cycles, small modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "velcro"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every velcro module ``path`` imports, anywhere in the file (functions and
    ``TYPE_CHECKING`` blocks included): a lazy import is still a dependency."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = modules()
    graph = {name: imports_of(path, set(found)) for name, path in found.items()}
    assert graph["velcro.trim._sum"] >= {"velcro.trim._writer"}  # the graph is read
    assert cycles(graph) == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("stage, verb", [
    ("graph", "trace"), ("trim", "trim"), ("search", "search"), ("report", "write_report"),
    ("hardware", "estimate"), ("distributed", "shard"), ("cli", "main"), ("demo", "run_demo"),
    ("models", "create"), ("data", "split"),
])
def test_each_stage_is_a_package_with_its_verb_in_init(stage, verb):
    init = PACKAGE / stage / "__init__.py"
    assert init.is_file()
    tree = ast.parse(init.read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                for a in n.names}
    assert verb in defined | imported


def test_private_helpers_live_inside_their_package():
    top = sorted(p.name for p in PACKAGE.glob("_*.py") if p.name != "__init__.py")
    # _io, _validate, _globals: used across stages (atomic writes, checked reading, global
    # settings kept); _format: how figures are written; _moments, _comoments, _stats_file: by
    # stats only (_moments' channels_first also by _affine);
    # _plan_file: by plan only; _affine: the affine predictions, by plan, search and trim
    assert top == ["_affine.py", "_comoments.py", "_format.py", "_globals.py", "_io.py",
                   "_moments.py", "_plan_file.py", "_stats_file.py", "_validate.py"]


def test_import_stays_lean():
    """`import velcro` pulls in no plotting, ONNX or scikit-learn (they load on use)."""
    code = ("import sys, velcro; print(','.join(sorted(m for m in "
            "('matplotlib', 'onnx', 'onnxruntime', 'onnxscript', 'sklearn') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
