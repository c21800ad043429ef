"""The house keeps its plan: no import cycles between the project's modules (imports inside
functions and under ``TYPE_CHECKING`` count too), and no private name crosses a module boundary
(a ``_name`` imported from another module, or a private module imported from outside its
package)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parents[2]
PACKAGES = {
    "autopart": "autopart",
    "passes": "autopart.passes",
    "cost_models": "autopart.cost_models",
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or is inside (``autopart.x.f`` -> ``autopart.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    here = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(
                    (sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno)
                )
    return found


def test_no_import_cycles() -> None:
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_node(module)
        for target, _, _ in _imports(module):
            resolved = _resolve(target)
            if (
                resolved is not None
                and resolved != module
                and not module.startswith(resolved + ".")
            ):
                graph.add_edge(module, resolved)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_a_module() -> None:
    crossings = []
    for module in MODULES:
        for target, name, line in _imports(module):
            resolved = _resolve(target)
            if resolved is None or resolved == module:
                continue
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            if name is not None and name.startswith("_") and not name.startswith("__"):
                crossings.append(f"{where} imports {name} from {resolved}")
            owner, _, leaf = resolved.rpartition(".")
            if leaf.startswith("_") and not leaf.startswith("__") and not module.startswith(owner):
                crossings.append(f"{where} imports the private module {resolved}")
    assert not crossings, "\n".join(dict.fromkeys(crossings))


def test_the_checks_see_every_package() -> None:
    """A check that walks nothing proves nothing."""
    assert {
        "autopart.planning.planner",
        "autopart.passes.tp.shard",
        "autopart.cost_models.memory",
    } <= set(MODULES)
    assert any(
        name == "op_name" or target.endswith("tp.strategies")
        for target, name, _ in _imports("autopart.passes.tp.check")
    )
