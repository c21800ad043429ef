"""Hypothesis strategies for small random operator graphs."""

from __future__ import annotations

from hypothesis import strategies as st

from autopart.planning.graph import OpGraph, OpNode


@st.composite
def random_dags(
    draw: st.DrawFn, max_nodes: int, *, chain: bool = False, positive: bool = False
) -> OpGraph:
    """Small DAGs in topological order: random compute (some zero unless ``positive``), inputs,
    bytes and outputs; with ``chain``, every node also reads the one before it."""
    n = draw(st.integers(2, max_nodes))
    weight = st.sampled_from([0.0, 1e-5, 2e-5, 5e-5]) | st.floats(1e-6, 1e-4)
    if chain or positive:
        weight = st.sampled_from([1e-5, 2e-5, 5e-5]) | st.floats(1e-6, 1e-4)
    nodes = {}
    for i in range(n):
        earlier = [f"n{j}" for j in range(i)]
        inputs = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
        if chain and i:
            inputs = [f"n{i - 1}", *(x for x in inputs if x != f"n{i - 1}")]
        w = draw(weight)
        nodes[f"n{i}"] = OpNode(
            f"n{i}",
            forward_s=w / 3,
            backward_s=2 * w / 3,
            flops=0,
            output_bytes=draw(st.integers(0, 200_000)),
            inputs=tuple(sorted(inputs)),
            params=(f"w{i}",),
            is_output=draw(st.booleans()) if i < n - 1 else True,
        )
    sizes = {f"w{i}": draw(st.integers(0, 1000)) for i in range(n)}
    return OpGraph(nodes, sizes)
