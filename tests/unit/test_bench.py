"""The solver benchmark's synthetic graphs and one solved case (autopart.bench.solver)."""

from __future__ import annotations

import networkx as nx
import pytest

from autopart.bench.solver import (
    ROW_KEYS,
    SYNTHETIC_KINDS,
    format_rows_markdown,
    solve_case,
    solver_suite,
    synthetic_op_graph,
)


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
@pytest.mark.parametrize("num_nodes", [6, 57, 1000])
def test_synthetic_graph_is_a_dag_of_the_requested_size(kind: str, num_nodes: int) -> None:
    og = synthetic_op_graph(kind, num_nodes, seed=3)  # type: ignore[arg-type]
    assert len(og.order) == og.nx.number_of_nodes() == num_nodes
    assert nx.is_directed_acyclic_graph(og.nx)
    assert nx.is_weakly_connected(og.nx)
    pos = {name: i for i, name in enumerate(og.order)}
    assert all(pos[u] < pos[v] for u, v in og.nx.edges)
    assert og.nodes[og.order[-1]].is_output
    assert all(n.compute_s > 0 and n.output_bytes >= 1 << 20 for n in og.nodes.values())
    assert og.param_bytes_by_name  # some nodes own parameters


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_graph_is_deterministic_by_seed(kind: str) -> None:
    a = synthetic_op_graph(kind, 300, seed=1)  # type: ignore[arg-type]
    b = synthetic_op_graph(kind, 300, seed=1)  # type: ignore[arg-type]
    c = synthetic_op_graph(kind, 300, seed=2)  # type: ignore[arg-type]
    assert dict(a.nodes) == dict(b.nodes)
    assert dict(a.param_bytes_by_name) == dict(b.param_bytes_by_name)
    assert dict(a.nodes) != dict(c.nodes)


def _edge_spans(kind: str, num_nodes: int = 500) -> list[int]:
    og = synthetic_op_graph(kind, num_nodes, seed=0)  # type: ignore[arg-type]
    pos = {name: i for i, name in enumerate(og.order)}
    return [pos[v] - pos[u] for u, v in og.nx.edges]


def test_chain_is_a_path() -> None:
    og = synthetic_op_graph("chain", 500, seed=0)
    assert all(og.nx.in_degree(v) <= 1 and og.nx.out_degree(v) <= 1 for v in og.order)
    assert set(_edge_spans("chain")) == {1}


def test_skip_has_long_unet_edges() -> None:
    og = synthetic_op_graph("skip", 500, seed=0)
    pos = {name: i for i, name in enumerate(og.order)}
    long = [(pos[u], pos[v]) for u, v in og.nx.edges if pos[v] - pos[u] > 1]
    assert len(long) >= 5
    assert any(v - u > 250 for u, v in long)
    assert all(u + v == 499 for u, v in long)  # node i feeds its mirror n - 1 - i


def test_branch_forks_and_joins() -> None:
    og = synthetic_op_graph("branch", 500, seed=0)
    forks = [v for v in og.order if og.nx.out_degree(v) >= 2]
    joins = [v for v in og.order if og.nx.in_degree(v) >= 2]
    assert len(forks) >= 5 and len(joins) >= 5
    assert max(og.nx.out_degree(v) for v in forks) >= 3


def test_synthetic_graph_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        synthetic_op_graph("tree", 100, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least"):
        synthetic_op_graph("chain", 3, seed=0)


@pytest.mark.parametrize(("kind", "stages"), [("branch", 4), ("skip", 3)])
def test_solve_case_row(kind: str, stages: int) -> None:
    og = synthetic_op_graph(kind, 60, seed=0)  # type: ignore[arg-type]
    row = solve_case(og, stages, "h100", time_limit_s=5.0, case="t", kind=kind)
    assert tuple(row) == ROW_KEYS
    assert row["nodes"] == 60 and row["stages"] == stages and row["blocks"] <= 96
    assert row["solver_status"] in ("OPTIMAL", "FEASIBLE")
    assert 0 < row["lower_bound_s"] <= row["bottleneck_s"]
    assert row["gap"] >= 0
    tol = 1 + 1e-6  # the ILP works in integer time units
    for name in ("equal_layers", "equal_params", "chain_dp"):
        assert row["bottleneck_s"] <= row[f"{name}_s"] * tol
        assert row[f"speedup_vs_{name}"] == pytest.approx(row[f"{name}_s"] / row["bottleneck_s"])
    assert row["solve_s"] >= row["ilp_s"] > 0


def test_solver_suite_on_a_tiny_grid_and_markdown() -> None:
    calls: list[tuple[int, int, str]] = []
    rows = solver_suite(
        synthetic_nodes=(20,),
        synthetic_stages=(2,),
        zoo_models=(),
        time_limit_s=5.0,
        progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert [(r["case"], r["kind"]) for r in rows] == [
        ("chain-20", "chain"),
        ("skip-20", "skip"),
        ("branch-20", "branch"),
    ]
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    table = format_rows_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].startswith("| case |") and "| branch-20 | 20 |" in table[-1]
