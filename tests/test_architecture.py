"""The shape of the package: no import cycle among calib's modules, and study kinds that stand alone.

The import graph is read from the source with :mod:`ast` (nothing is
imported); an import inside a function counts like one at module level, since
it still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CALIB = Path(__file__).resolve().parent.parent / "calib"
KINDS = "calib.studies.kinds"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CALIB.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of calib/, by dotted name (a package is its ``__init__``)."""
    return {module_name(p): p for p in sorted(CALIB.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The calib module that ``import name`` runs last: ``name`` itself or its closest known parent."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """calib modules that ``name`` imports (``from pkg import mod`` counts ``pkg.mod`` when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for target in targets:
            if target == "calib" or target.startswith("calib."):
                resolved = _resolve(target, known)
                if resolved and resolved != name:
                    out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "calib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from calib.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("import calib.sub.a as a\nfrom ..sub import a\n")
    known = {module_name_in(tmp_path, p): p for p in pkg.rglob("*.py")}
    graph = {n: imports(n, p, known) for n, p in known.items()}
    assert graph["calib.sub.a"] == {"calib.sub.b"}
    assert graph["calib.sub.b"] == {"calib.sub.a"}
    assert graph["calib.sub"] == {"calib.sub.b"}
    assert cycles(graph) == [["calib.sub.a", "calib.sub.b"]]


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle():
    graph = import_graph()
    assert "calib.cli" in graph and graph["calib.cli"], "the graph reader found no import"
    found = cycles(graph)
    assert not found, "import cycles among calib modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_study_kinds_do_not_import_each_other():
    graph = import_graph()
    kinds = {n for n in graph if n.startswith(KINDS + ".")}
    assert kinds, "no study kind found"
    bad = sorted(f"{n} -> {m}" for n in kinds for m in graph[n] if m in kinds)
    assert not bad, "study kinds import each other: " + ", ".join(bad)


def test_registries_are_complete_and_fail_loudly():
    """Every study kind has a report; every registered kind, report and command imports and has its entry."""
    from calib.cli import _COMMANDS, build_parser
    from calib.errors import StudyError
    from calib.reporting import REPORTS, write_report
    from calib.studies.kinds import KINDS

    assert set(REPORTS) == set(KINDS)
    for kind in KINDS:
        assert KINDS[kind].KIND == kind and callable(KINDS[kind].run)
    build_parser()  # imports every command module; a broken one raises
    assert len(_COMMANDS) == len(set(_COMMANDS))
    with pytest.raises(StudyError, match="no report"):
        write_report({"kind": "nope"}, Path("."))
    with pytest.raises(KeyError):
        KINDS["nope"]
