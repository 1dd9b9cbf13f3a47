"""The modules of moe_emergence.analysis import one another one way only: no import cycle, counting imports
inside functions too (a function-level import that only dodges a cycle still hides one)."""

import ast
from pathlib import Path

PKG = "moe_emergence.analysis"
ROOT = Path(__file__).resolve().parents[1] / "moe_emergence" / "analysis"


def _module_name(path: Path) -> str:
    return PKG if path.name == "__init__.py" else f"{PKG}.{path.stem}"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere in the file. ``from pkg import name`` counts
    as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    me = _module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchored at this module's package
                parts = PKG.split(".")[: len(PKG.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != me}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (c := visit(n, [*path, n])):
                return c
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_no_import_cycle_in_analysis():
    paths = sorted(ROOT.glob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert {f"{PKG}.markdown", f"{PKG}.report_figures"} <= graph[f"{PKG}.report"]  # the check sees edges
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
