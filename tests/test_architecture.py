"""The core's module graph has no cycles: every `use crate::…` / `super::…` / `self::…` path of a
file of rust/fastserve-core/src is resolved to the file that defines that module, and the graph
of files must be a DAG (docs/architecture.md draws it)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "rust" / "fastserve-core" / "src"
PATH = re.compile(r"\b(crate|super|self)((?:::[a-z_][a-z0-9_]*)+)")


def module_of(file: Path) -> tuple[str, ...]:
    parts = file.relative_to(SRC).with_suffix("").parts
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def modules() -> dict[tuple[str, ...], Path]:
    return {module_of(f): f for f in SRC.rglob("*.rs")}


VISIBILITY = re.compile(r"pub\(in [a-z_:]+\)")


def code_without_tests(text: str) -> str:
    """Unit tests may reach anywhere; only the code the crate ships counts. A visibility
    (`pub(in crate::scheduler)`) names a module without using it."""
    cut = text.find("#[cfg(test)]\nmod tests")
    return VISIBILITY.sub("pub", text if cut < 0 else text[:cut])


def dependencies(file: Path, known: dict[tuple[str, ...], Path]) -> set[tuple[str, ...]]:
    me = module_of(file)
    out = set()
    for root, rest in PATH.findall(code_without_tests(file.read_text())):
        names = tuple(rest.strip(":").split("::"))
        base = () if root == "crate" else (me[:-1] if root == "super" else me)
        full = base + names
        # The longest prefix that is a module file is what this path uses.
        for n in range(len(full), 0, -1):
            if full[:n] in known and full[:n] != me:
                out.add(full[:n])
                break
    # A parent file declaring `mod child;` does not depend on the child by that alone.
    return out


def find_cycle(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[tuple[str, ...]] | None:
    state: dict[tuple[str, ...], int] = {}
    stack: list[tuple[str, ...]] = []

    def visit(node: tuple[str, ...]) -> list[tuple[str, ...]] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_core_module_graph_has_no_cycles() -> None:
    known = modules()
    graph = {m: dependencies(f, known) for m, f in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join("::".join(m) or "lib" for m in cycle)
