"""TP-adjusted costs: the :class:`~autopart.planning.graph.OpGraph` that one rank of a tensor-parallel group
sees under a :class:`~autopart.solver.tp_ilp.TPPlan`, so the stage solver, the baselines, the lower
bound and the schedule simulation plan a ``pp x tp`` mesh unchanged.

For every computing node, under the strategy the TP plan chose (read back from its placements: a
node runs sharded, doing ``1 / degree`` of the work, exactly when its output or one of its inputs is
placed other than ``R``, as in :mod:`autopart.passes.tp.strategies`):

- forward and backward seconds: the roofline of the node's FLOPs and bytes divided by the degree
  (:func:`autopart.solver.tp_ilp.solve_tp` costs a sharded node the same way), plus the seconds of
  the collectives attributed to it (below); an unsharded node keeps its time;
- output bytes (what a stage boundary after it carries and what a consumer saves for backward):
  divided by the degree when the output is split (``S(k)``); a replicated or partial output is whole
  on every rank; private saved bytes: divided by the degree when the node runs sharded;
- parameter bytes: divided by the degree when the parameter is stored split (``S(k)``), so the
  planner's parameter, gradient and optimizer-state accounting is that of one rank's shard.

Each collective of the plan (:attr:`TPPlan.collectives`) is charged to the node that waits for it:
a forward resharding to the consumer's forward, a backward one (the gradient going back along an
edge) to the consumer's backward, a gradient all-reduce (Megatron's ``f``) to the producer's
backward. Where that node does not compute (a parameter, a model input, the graph output), the
charge goes to the other end, or for a parameter to its first computing user. Collective seconds are
those of :func:`autopart.passes.tp.strategies.collective_time_s` at ``micro_batches`` (the alpha
term once per micro-batch), so they are exact at that micro-batch count and scale linearly with the
rest of the node's costs otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch.fx import GraphModule

from autopart.cost_models.compute import ComputeModel
from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError
from autopart.passes.tp.strategies import Collective, collective_time_s
from autopart.planning.graph import OpGraph, OpNode
from autopart.solver.tp_ilp import TPPlan

__all__ = ["TPCosts", "tp_costs"]


@dataclass(frozen=True, slots=True, eq=False)
class TPCosts:
    """What one rank of a TP group computes, holds and sends."""

    op_graph: OpGraph
    """The TP-adjusted graph (times for one step with the example inputs, on one rank)."""
    comm_s_by_node: Mapping[str, tuple[float, float]]
    """Collective seconds (forward, backward) charged to each computing node, per step."""
    comm_bytes_by_node: Mapping[str, int]
    """Bytes each rank sends in the collectives charged to each computing node, per step."""
    sharded: frozenset[str]
    """Computing nodes whose work is split over the TP ranks."""
    micro_batches: int
    """The micro-batch count the collective seconds are exact for."""


def tp_costs(
    og: OpGraph,
    gm: GraphModule,
    tp: TPPlan,
    *,
    micro_batches: int = 1,
    compute: ComputeModel | None = None,
) -> TPCosts:
    """The TP-adjusted costs of ``og`` (built from ``gm`` by ``OpGraph.from_graph_module``) under
    ``tp`` (solved on ``gm``); see the module docstring. ``compute`` times the sharded nodes
    (default: the roofline of ``og.device``; a measured time is divided by the degree)."""
    if og.device is None:
        raise AutopartError("tp_costs needs an OpGraph built for a device (OpGraph.device is None)")
    if micro_batches < 1:
        raise AutopartError(f"micro_batches must be >= 1, got {micro_batches}")
    compute = compute or ComputeModel(og.device)
    d = tp.degree
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in og.nodes if name not in tp.placements]
    if missing:
        raise AutopartError(
            f"the TP plan has no placement for node(s) {missing[:3]}: solve it on the graph the "
            "OpGraph was built from"
        )

    def split_output(name: str) -> bool:
        return tp.placements.get(name, "R").startswith("S")

    def runs_sharded(name: str) -> bool:
        ins = tp.input_placements.get(name, {})
        return tp.placements[name] != "R" or any(p != "R" for p in ins.values())

    sharded = frozenset(name for name in og.nodes if d > 1 and runs_sharded(name))
    forward_comm: dict[str, float] = {}
    backward_comm: dict[str, float] = {}
    sent: dict[str, int] = {}
    for c in tp.collectives:
        if c.direction == "forward":
            owner, table = _owner(c.consumer, c.producer, og, nodes), forward_comm
        else:
            owner, table = _owner(c.consumer or c.producer, c.producer, og, nodes), backward_comm
        seconds = collective_time_s(
            Collective(c.kind), c.nbytes, d, og.device, micro_batches=micro_batches
        )
        table[owner] = table.get(owner, 0.0) + seconds
        sent[owner] = sent.get(owner, 0) + c.sent_bytes

    adjusted: dict[str, OpNode] = {}
    for name, n in og.nodes.items():
        forward_s, backward_s = n.forward_s, n.backward_s
        flops, backward_flops, private = n.flops, n.backward_flops, n.private_saved_bytes
        if name in sharded:
            cost = nodes[name].meta.get("autopart")
            if isinstance(cost, NodeCost):
                part = _share(cost, d)
                own_forward_s = n.forward_s - n.loss_forward_s
                own_backward_s = n.backward_s - n.loss_backward_s
                forward_s = _time(compute, name, part, own_forward_s, d, backward=False)
                backward_s = _time(compute, name, part, own_backward_s, d, backward=True)
            else:
                forward_s = (forward_s - n.loss_forward_s) / d
                backward_s = (backward_s - n.loss_backward_s) / d
            # the loss runs on the whole outputs on every TP rank
            forward_s, backward_s = forward_s + n.loss_forward_s, backward_s + n.loss_backward_s
            flops, backward_flops, private = flops // d, backward_flops // d, private // d
        # The weight gradient keeps its share of the compute; backward collectives (Megatron's f)
        # carry input gradients.
        weight_share = n.backward_weight_s / n.backward_s if n.backward_s > 0 else 0.0
        adjusted[name] = dataclasses.replace(
            n,
            forward_s=forward_s + forward_comm.get(name, 0.0),
            backward_s=backward_s + backward_comm.get(name, 0.0),
            backward_weight_s=min(backward_s * weight_share, backward_s),
            # a sharded node's fixed part is at most its share's time (collectives scale with m)
            fixed_forward_s=min(n.fixed_forward_s, forward_s),
            fixed_backward_s=min(n.fixed_backward_s, backward_s),
            flops=flops,
            backward_flops=backward_flops,
            output_bytes=n.output_bytes // d if split_output(name) else n.output_bytes,
            private_saved_bytes=private,
        )
    values = {
        name: nbytes // d if split_output(name) else nbytes
        for name, nbytes in og.value_bytes.items()
    }
    graph = OpGraph(adjusted, _param_bytes(og, gm, tp), values, og.device)
    comm = {
        name: (forward_comm.get(name, 0.0), backward_comm.get(name, 0.0))
        for name in og.nodes
        if name in forward_comm or name in backward_comm
    }
    return TPCosts(
        op_graph=graph,
        comm_s_by_node=MappingProxyType(comm),
        comm_bytes_by_node=MappingProxyType({n: sent[n] for n in og.nodes if n in sent}),
        sharded=sharded,
        micro_batches=micro_batches,
    )


def _share(cost: NodeCost, degree: int) -> NodeCost:
    """One rank's part of a sharded node (as ``tp_ilp`` divides it)."""
    return dataclasses.replace(
        cost,
        flops=cost.flops // degree,
        backward_flops=cost.backward_flops // degree,
        bytes_read=cost.bytes_read // degree,
        bytes_written=cost.bytes_written // degree,
    )


def _time(
    compute: ComputeModel,
    name: str,
    part: NodeCost,
    whole_s: float,
    degree: int,
    *,
    backward: bool,
) -> float:
    measured = compute.measured_backward_s if backward else compute.measured_forward_s
    if name in measured:
        return whole_s / degree
    return compute.backward_s(name, part) if backward else compute.forward_s(name, part)


def _owner(name: str, other: str, og: OpGraph, nodes: Mapping[str, object]) -> str:
    """The computing node charged with a collective between ``name`` and ``other``."""
    for candidate in (name, other):
        if candidate in og.nodes:
            return candidate
    for candidate in (name, other):
        node = nodes.get(candidate)
        users = getattr(node, "users", {})
        first = next((u.name for u in users if u.name in og.nodes), None)
        if first is not None:
            return first
    raise AssertionError(f"no computing node near collective {other!r} -> {name!r}")


def _param_bytes(og: OpGraph, gm: GraphModule, tp: TPPlan) -> dict[str, int]:
    """Bytes of every parameter on one rank: split ones (stored ``S(k)``) divided by the degree.
    Tied parameters go by their first name, as in the annotation pass."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(p), name)
    split = {
        aliases[str(n.target)]
        for n in gm.graph.nodes
        if n.op == "get_attr"
        and str(n.target) in aliases
        and tp.placements.get(n.name, "R").startswith("S")
    }
    return {
        name: math.ceil(nbytes / tp.degree) if name in split else nbytes
        for name, nbytes in og.param_bytes_by_name.items()
    }
