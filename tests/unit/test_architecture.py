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
    here = module if _is_package(module) else module.rpartition(".")[0]
    return _imports_in(MODULES[module], here)


def _imports_in(path: Path, here: str) -> list[tuple[str, str | None, int]]:
    """As :func:`_imports`, for the file ``path`` of package ``here``."""
    tree = ast.parse(path.read_text())
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _crossings(
    path: Path, module: str, imports: list[tuple[str, str | None, int]]
) -> list[tuple[str, str]]:
    """(file:line, what) for every private name or private module of the project that ``module``
    (in file ``path``) imports from outside."""
    found = []
    for target, name, line in imports:
        resolved = _resolve(target)
        if resolved is None or resolved == module:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if name is not None and _private(name):
            found.append((where, f"imports {name} from {resolved}"))
        owner, _, leaf = resolved.rpartition(".")
        if _private(leaf) and not module.startswith(owner):
            found.append((where, f"imports the private module {resolved}"))
    return found


def test_no_private_name_crosses_a_module() -> None:
    crossings = [
        f"{where} {what}"
        for module in MODULES
        for where, what in _crossings(MODULES[module], module, _imports(module))
    ]
    assert not crossings, "\n".join(dict.fromkeys(crossings))


TESTS_INTO_PRIVATES = {
    ("tests/unit/test_bench_runtime.py", "imports _describe from autopart.bench.runtime"),
    ("tests/unit/test_codegen.py", "imports _Program from autopart.codegen.emitter"),
    ("tests/unit/test_codegen.py", "imports _write from autopart.codegen.emitter"),
    ("tests/unit/test_joint.py", "imports _infeasible from autopart.planning.mesh_search"),
    ("tests/unit/test_joint.py", "imports _Mesh from autopart.planning.mesh_search"),
    ("tests/unit/test_repeat.py", "imports the private module autopart.capture._repeat"),
    ("tests/unit/test_tp_ilp.py", "imports the private module autopart.solver._tp_graph"),
}
"""The tests' imports of the project's private names that predate the check below: each one is to
be replaced by a public name (the check fails when one is gone, so that it leaves this list)."""


def test_tests_use_the_project_through_public_names() -> None:
    """The tests import no private name or private module of autopart / passes / cost_models
    (their own helpers, ``tests/_*.py``, are theirs to share), except those listed above."""
    found = set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if "golden" in path.parts:
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        imports = _imports_in(path, module.rpartition(".")[0])
        found |= {
            (where.partition(":")[0], what) for where, what in _crossings(path, module, imports)
        }
    new = sorted(found - TESTS_INTO_PRIVATES)
    assert not new, "tests import private names of the project:\n" + "\n".join(map(str, new))
    cleared = sorted(TESTS_INTO_PRIVATES - found)
    assert not cleared, f"no longer imported: remove them from TESTS_INTO_PRIVATES: {cleared}"


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
