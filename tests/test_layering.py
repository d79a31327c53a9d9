"""The package's layering, read from its source with `ast` (every import statement, those inside
functions included): no import cycle between its parts, the engine free of torch, Ray and the
layers that run stages, and no module over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jamba_ray"
MAX_LINES = 300
LONG_FOR_NOW: set[str] = set()
ENGINE_MUST_NOT_IMPORT = {"torch", "ray", "model", "runtime", "serve", "batch"}


def module_name(path: Path) -> str:
    parts = ("jamba_ray", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """The part a module belongs to: its subpackage, or itself for a top-level module
    (`jamba_ray.errors` -> "errors"; the package's own `__init__` -> "jamba_ray")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def imports(path: Path, modules: set[str]) -> set[str]:
    """Absolute names of what `path` imports: jamba_ray modules, and top-level names of others."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            # `from . import x`: x may be a module of the package, or a name in it
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found |= subs or {target}
    return found


def graph() -> dict[str, set[str]]:
    """part -> the other parts it imports; outside imports by their top-level name."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {}
    for f in files:
        src = part(module_name(f))
        for name in imports(f, modules):
            inside = name == "jamba_ray" or name.startswith("jamba_ray.")
            dst = part(name) if inside else "ext:" + name.split(".")[0]
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle, as the path around it, or None (depth-first search)."""
    state: dict[str, str] = {}  # node -> "open" | "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_the_package_parts():
    edges = {k: {d for d in v if not d.startswith("ext:")} for k, v in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_engine_imports_neither_torch_ray_nor_the_layers_that_run_stages():
    outside = {d.removeprefix("ext:") for d in graph().get("engine", set())}
    assert not outside & ENGINE_MUST_NOT_IMPORT, sorted(outside & ENGINE_MUST_NOT_IMPORT)


def test_no_module_is_over_300_lines():
    long = {
        str(f.relative_to(ROOT)): n
        for f in ROOT.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in LONG_FOR_NOW} == {}


@pytest.mark.parametrize(
    "edges, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ],
)
def test_the_cycle_search_finds_a_cycle_and_only_one_that_is_there(edges, cycle):
    assert find_cycle(edges) == cycle
