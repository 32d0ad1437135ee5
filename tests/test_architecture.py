"""Guards of the architecture (ARCHITECTURE.md, "Layout"): who may import whom, no import cycles,
public surfaces that import, and a CLI whose every command answers ``--help``.

The import graph is read from the source with :mod:`ast` (nothing is imported to build it), so
a failure names the file and line of the offending import.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from auditpipe import cli

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the package it is mapped to (pyproject.toml, package-dir).
FOLDERS = {
    "auditpipe": "auditpipe",
    "producer": "auditpipe.producer",
    "processors": "auditpipe.processors",
    "sinks": "auditpipe.sinks",
    "schemas": "auditpipe.schemas",
    "api": "auditpipe.api",
}
#: The parts that never import each other.
PARTS = ("auditpipe.producer", "auditpipe.processors", "auditpipe.sinks", "auditpipe.api")
#: The documented exception: the read API reads the PostgreSQL sink's storage layout through
#: the small public interface that module exports.
ALLOWED_CROSSINGS = {("auditpipe.api", "auditpipe.sinks.postgres")}
#: Import-time weight the producer must never carry (its users install no extra for it).
PRODUCER_FORBIDDEN = ("faust", "boto3", "botocore", "pymongo", "psycopg", "psycopg_pool")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a submodule when ``from pkg import submodule``)
    file: Path
    line: int
    lazy: bool  # inside a function, or under ``if TYPE_CHECKING``: not run at import time


def source_modules() -> dict[str, Path]:
    """Every module of the ``auditpipe`` namespace: dotted name -> file."""
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "auditpipe" and parts and parts[0] in FOLDERS:
                continue  # (no such folders inside auditpipe/, but be safe)
            out[".".join([package, *parts])] = path
    return out


MODULES = source_modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, True)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            yield from _walk(child, True)
        else:
            yield from _walk(child, lazy)


def imports_of(module: str, path: Path) -> list[Import]:
    """The ``auditpipe`` modules ``module`` imports (anything else is left out)."""
    out = []
    for node, lazy in _walk(ast.parse(path.read_text("utf-8")), False):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _resolve(module, path, node)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a module we know
                target = target.rpartition(".")[0]
            if target and target != module:
                out.append(Import(module, target, path, node.lineno, lazy))
    return out


ALL_IMPORTS = [imp for mod, path in MODULES.items() for imp in imports_of(mod, path)]


def part_of(module: str) -> str | None:
    return next((p for p in PARTS if module == p or module.startswith(p + ".")), None)


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """Every strongly connected component of more than one module, each as one cycle path."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
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
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(c, graph) for c in components]


def _cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module, for the failure message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a component always has a cycle


def describe(cycle: list[str], edges: list[Import]) -> str:
    where = {(e.source, e.target): f"{e.file.relative_to(ROOT)}:{e.line}" for e in edges}
    hops = [f"{a} -> {b} ({where.get((a, b), '?')})" for a, b in pairwise(cycle)]
    return "\n  ".join(hops)


class TestImportBoundaries:
    def test_the_import_graph_covers_the_tree(self) -> None:
        """The scan sees every part and real edges (a broken scan cannot pass the rules)."""
        assert {part_of(m) for m in MODULES} >= set(PARTS)
        assert any(e.target == "auditpipe.schemas.manifest" for e in ALL_IMPORTS)
        assert len(ALL_IMPORTS) > 100

    def test_parts_never_import_each_other(self) -> None:
        """producer, processors, sinks and api import auditpipe and auditpipe.schemas only
        (api may read auditpipe.sinks.postgres, the storage layout it serves)."""
        crossings = [
            f"{e.file.relative_to(ROOT)}:{e.line}: {e.source} imports {e.target}"
            for e in ALL_IMPORTS
            if (a := part_of(e.source)) and (b := part_of(e.target)) and a != b
            if (a, e.target) not in ALLOWED_CROSSINGS
        ]
        assert not crossings, "imports across parts:\n" + "\n".join(crossings)

    def test_the_documented_exception_is_still_used(self) -> None:
        """An allowance nobody needs any more is removed, not left open."""
        used = {(part_of(e.source), e.target) for e in ALL_IMPORTS}
        assert ALLOWED_CROSSINGS <= used

    def test_schemas_import_no_part(self) -> None:
        """auditpipe.schemas is below every part: it imports none of them."""
        bad = [
            e for e in ALL_IMPORTS if e.source.startswith("auditpipe.schemas") and part_of(e.target)
        ]
        assert not bad, bad

    def test_importing_the_producer_loads_no_heavy_client(self) -> None:
        """``import auditpipe.producer`` (and its submodules) loads no faust, boto3, pymongo or
        psycopg, checked in a fresh interpreter's sys.modules."""
        producer = sorted(m for m in MODULES if part_of(m) == "auditpipe.producer")
        code = (
            "import importlib, json, sys\n"
            f"for m in {producer!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        loaded = set(json.loads(proc.stdout))
        assert {"auditpipe", "orjson"} <= loaded  # the check sees real imports
        assert not loaded & set(PRODUCER_FORBIDDEN), sorted(loaded & set(PRODUCER_FORBIDDEN))


#: Cycles through a lazy import (inside a function or under TYPE_CHECKING) that are known and
#: scheduled for removal. Each must still exist (else delete it here): the list only shrinks.
KNOWN_LAZY_CYCLES: list[set[str]] = []


class TestNoImportCycles:
    def test_no_cycle_among_import_time_imports(self) -> None:
        """Module-level imports form no cycle (each failure names every hop's file and line)."""
        edges = [e for e in ALL_IMPORTS if not e.lazy]
        cycles = find_cycles(edges)
        assert not cycles, "import cycles:\n  " + "\n\n  ".join(describe(c, edges) for c in cycles)

    def test_no_cycle_through_lazy_imports_either(self) -> None:
        """A function-level import only hides a cycle: none beyond the known, listed ones."""
        cycles = find_cycles(ALL_IMPORTS)
        unknown = [c for c in cycles if set(c) not in KNOWN_LAZY_CYCLES]
        assert not unknown, "cycles:\n  " + "\n\n  ".join(describe(c, ALL_IMPORTS) for c in unknown)
        stale = [k for k in KNOWN_LAZY_CYCLES if k not in [set(c) for c in cycles]]
        assert not stale, f"known cycle(s) gone, delete them from KNOWN_LAZY_CYCLES: {stale}"

    def test_the_detector_finds_a_cycle_and_names_its_hops(self) -> None:
        """Three modules importing in a ring are reported as that ring, with file and line."""
        f = Path(__file__)
        ring = [Import("a", "b", f, 1, False), Import("b", "c", f, 2, False)]
        ring.append(Import("c", "a", f, 3, False))
        (cycle,) = find_cycles([*ring, Import("c", "d", f, 4, False)])
        assert cycle == ["a", "b", "c", "a"]
        assert "c -> a (tests/test_architecture.py:3)" in describe(cycle, ring)


def packages() -> list[str]:
    return sorted(m for m, p in MODULES.items() if p.name == "__init__.py")


class TestPublicSurface:
    def test_every_package_is_listed(self) -> None:
        """The scan finds the packages pyproject.toml ships (a missed one is not checked)."""
        assert {"auditpipe", "auditpipe.schemas", "auditpipe.sinks", "auditpipe.redaction"} <= set(
            packages()
        )

    @pytest.mark.parametrize("name", packages())
    def test_all_names_are_importable(self, name: str) -> None:
        """Every name in a package's ``__all__`` exists (``from pkg import *`` works)."""
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not define: {missing}"
        assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"

    def test_every_module_imports(self) -> None:
        """Every module of the namespace imports (with all extras installed)."""
        for name in sorted(m for m in MODULES if not m.endswith(".__main__")):  # runs the CLI
            importlib.import_module(name)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of ``parser`` (``("schemas", "check")``...), found by walking its
    subparsers, so commands added later are covered without editing this test."""
    out = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, (*path, name))
    return out


COMMANDS = commands(cli.build_parser())


class TestCommandLine:
    def test_the_walk_finds_nested_commands(self) -> None:
        """The walk reaches the nested ``schemas`` commands, not only the top level."""
        assert ("schemas", "check") in COMMANDS and ("sink",) in COMMANDS and len(COMMANDS) > 10

    @pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "auditpipe")
    def test_help_exits_zero(
        self, path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``auditpipe ... --help`` prints usage and exits 0."""
        with pytest.raises(SystemExit) as exit_:
            cli.main([*path, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith("usage:")

    def test_the_installed_command_answers_help(self) -> None:
        """The console script itself (a fresh process) exits 0 on --help, listing commands."""
        exe = Path(sys.executable).with_name("auditpipe")
        proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert all(p[0] in proc.stdout for p in COMMANDS if len(p) == 1)
