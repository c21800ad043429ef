"""Is a TP plan sound for the graph that will run it?

A plan's ``tp`` section names, for every node, the placement of its output and the placement in
which it reads each input. It was solved on one graph (the full batch's) and is applied to another
(one micro-batch's, or the same model traced by another release of its library), and its names
alone say nothing about whether the placements still hold there: a reshape that merged batch and
heads at one batch size may group other rows at another. :func:`check_tp_plan` derives the
strategies the proven rules (:mod:`autopart.passes.tp.strategies`) offer at *this* graph's shapes
and accepts the plan only if every node's placement is one of them, so a plan is either applied
where its rules are exact or rejected with the first node that breaks it, never silently.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from autopart.errors import ShardError
from autopart.passes.tp.placements import Placement
from autopart.passes.tp.strategies import tp_strategies
from autopart.planning.plans import TPSection

__all__ = ["check_tp_plan"]

_REPLAN = (
    "The plan was made for another graph (another model, batch size or library version): plan "
    "this graph again (autopart.plan / autopart.compile plan it for you)."
)


def check_tp_plan(gm: GraphModule, tp: TPSection) -> None:
    """Raise :class:`ShardError` naming the first node of ``gm`` whose placement in ``tp`` no proven
    rule offers at ``gm``'s shapes (or that ``tp`` does not place at all)."""
    if tp.degree == 1:
        return
    offered = tp_strategies(gm, tp.degree)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        chosen = _chosen(node, tp)
        found = {(s.output, s.inputs) for s in offered[node.name].strategies}
        if chosen not in found:
            out, ins = chosen
            reads = ", ".join(f"{u.name} as {p}" for u, p in zip(node.all_input_nodes, ins))
            raise ShardError(
                f"the TP plan places node {node.name!r} ({node.op} {node.target}) as {out}"
                + (f" reading {reads}" if reads else "")
                + f", which no sharding rule allows at this graph's shapes. {_REPLAN}"
            )


def _chosen(node: Node, tp: TPSection) -> tuple[Placement, tuple[Placement, ...]]:
    out = tp.placements.get(node.name)
    reads = tp.input_placements.get(node.name, {})
    missing = [u.name for u in node.all_input_nodes if u.name not in reads]
    if out is None or missing:
        what = "no placement" if out is None else f"no placement for its input {missing[0]!r}"
        raise ShardError(f"the TP plan has {what} for node {node.name!r}. {_REPLAN}")
    ins = tuple(Placement.parse(reads[u.name]) for u in node.all_input_nodes)
    return Placement.parse(out), ins
