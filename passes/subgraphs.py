"""Sets of a graph's nodes that can become a subgraph: a set is convex when no path leaves it and
comes back, so fusing it into one call makes no cycle (what torch's ``fuse_by_partitions``
requires of a partition)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from torch.fx import GraphModule, Node

__all__ = ["convex_span"]


def convex_span(gm: GraphModule, wanted: Collection[Node]) -> list[Node]:
    """``wanted`` and every node of ``gm`` on a path between two of them, in graph order."""
    order = list(gm.graph.nodes)
    here = [i for i, n in enumerate(order) if n in wanted]
    if not here:
        return []
    # a path between two wanted nodes stays between the first and the last of them
    between = set(order[here[0] : here[-1] + 1])
    named = [order[i] for i in here]
    after = _reached(named, lambda n: n.users, between)
    before = _reached(named, lambda n: n.all_input_nodes, between)
    span = order[here[0] : here[-1] + 1]
    return [n for n in span if n in wanted or (n in after and n in before)]


def _reached(
    start: Sequence[Node], step: Callable[[Node], Iterable[Node]], within: set[Node]
) -> set[Node]:
    """The nodes of ``within`` reached from ``start`` by ``step`` (users: descendants; inputs:
    ancestors) without leaving it."""
    seen: set[Node] = set()
    todo = list(start)
    while todo:
        for nxt in step(todo.pop()):
            if nxt in within and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
