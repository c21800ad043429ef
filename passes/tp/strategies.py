"""Tensor-parallel sharding strategies: for every node of a traced graph, the ways it can run on ``d``
ranks, and what it costs to move a tensor between two placements.

Placements (``R``, ``S(k)``, ``S(k,groups=g)``, ``P``) and strategies are the values of
:mod:`autopart.passes.tp.placements`. Every node can run replicated (all ``R``), which is always
correct; sharded strategies are offered only by the rules of :mod:`autopart.passes.tp.rules` (one
module per family of ops: weight matmuls and attention, pointwise, views, lists and joins,
reductions and norms), which :func:`tp_strategies` asks node by node.

Parameters and buffers (``get_attr``) are stored in ``R`` or in any split a consumer asks for, so a
weight is split once however many nodes read it (a tied embedding and LM head). A split / chunk
hands its parts on as they are: its list output is never resharded, its parts (``getitem``) are.

Any other op (and ``call_module`` / ``call_method`` nodes) gets the replicated strategy only. Split
candidates are propagated forward from the weight matmuls and embeddings, so activations are split
only on dimensions that come from a weight (features, heads), never on the batch or sequence
dimensions. When a split is impossible because ``d`` does not divide a size, the node records why
(:attr:`NodeStrategies.reasons`), so a plan can explain each forced replication.

Moving a tensor from one placement to another (:func:`resharding`), forward and backward:

==========  ===========  ================================  =====================================
from        to           forward                           backward (gradient)
==========  ===========  ================================  =====================================
``R``       ``S(k)``     local slice, free                 all-gather
``S(k)``    ``R``        all-gather                        free slice; reduce-scatter if partial
``P``       ``R``        all-reduce                        free; all-reduce if partial
``P``       ``S(k)``     reduce-scatter (optional)         all-gather
``S(a)``    ``S(b)``     all-to-all                        all-to-all
``R``       ``R``        free                              all-reduce if the consumer's gradient is
                                                           partial (shared by all consumers)
anything    ``P``        not allowed (except ``P`` -> ``P``)
==========  ===========  ================================  =====================================

Costs use the ring collectives of :mod:`autopart.cost_models.comm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

from autopart._compat import StrEnum
from autopart.cost_models.comm import (
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    reduce_scatter_time_s,
)
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.passes.mutations import mutation_groups, written_inputs
from autopart.passes.routing import defines_sizes, routed
from autopart.passes.tp.placements import (
    NodeStrategies,
    Placement,
    R,
    Strategy,
    dual,
    replicated,
    shard,
)
from autopart.passes.tp.rules import (
    GROUPED_MATMULS,
    cache_key,
    fused_groups,
    node_args,
    node_strategies,
    op_name,
)

__all__ = [
    "Collective",
    "Resharding",
    "collective_bytes",
    "collective_time_s",
    "resharding",
    "tp_strategies",
    "weight_matmuls",
]


# ---------------------------------------------------------------------------------------------
# resharding between placements


class Collective(StrEnum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"


@dataclass(frozen=True, slots=True)
class Resharding:
    """What an edge costs when its producer's placement and its consumer's requirement are given."""

    forward: Collective | None
    backward: Collective | None
    reduces_gradient: bool = False
    """The consumer returns a partial gradient to a replicated producer, which all-reduces the sum
    of its partial gradients once, however many consumers return one (Megatron's ``f``)."""


def resharding(
    src: Placement,
    dst: Placement,
    grad: Placement,
    *,
    requires_grad: bool = True,
    reduce_scatter: bool = False,
) -> Resharding | None:
    """The collectives that turn a tensor placed ``src`` into ``dst`` (forward) and bring back its
    gradient, which the consumer produces placed ``grad`` (backward); ``None`` if not allowed.

    ``P -> S(k)`` (a reduce-scatter in the forward, as in sequence parallelism) is allowed only with
    ``reduce_scatter=True``; otherwise partial sums resolve to ``R`` by all-reduce.
    """
    if dst.kind == "P" and src != dst:
        return None
    if src.kind == "P" and dst.kind == "S" and not reduce_scatter:
        return None
    forward: Collective | None = None
    if src != dst:
        if src.kind == "P":
            forward = Collective.ALL_REDUCE if dst.kind == "R" else Collective.REDUCE_SCATTER
        elif src.kind == "S":
            forward = Collective.ALL_GATHER if dst.kind == "R" else Collective.ALL_TO_ALL
    if not requires_grad:
        return Resharding(forward, None)
    want = dual(src)  # what the producer's backward needs
    if src == dst:
        if grad == want:
            return Resharding(forward, None)
        assert grad.kind == "P" and want.kind == "R", (src, dst, grad)
        return Resharding(forward, None, reduces_gradient=True)
    backward: Collective | None
    if grad == want:
        backward = None
    elif grad.kind == "P":
        backward = Collective.ALL_REDUCE if want.kind == "R" else Collective.REDUCE_SCATTER
    elif grad.kind == "S":
        backward = Collective.ALL_GATHER if want.kind == "R" else Collective.ALL_TO_ALL
    else:  # grad R, producer wants a split: a local slice
        backward = None
    return Resharding(forward, backward)


def collective_time_s(
    kind: Collective, nbytes: int, degree: int, device: DeviceSpec, *, micro_batches: int = 1
) -> float:
    """Seconds of ``kind`` on a tensor of ``nbytes`` (full size) over ``degree`` ranks, once per
    micro-batch on ``1 / micro_batches`` of the bytes."""
    per = math.ceil(nbytes / micro_batches)
    if kind is Collective.ALL_REDUCE:
        t = all_reduce_time_s(per, degree, device)
    elif kind is Collective.ALL_GATHER:
        t = all_gather_time_s(per, degree, device)
    elif kind is Collective.REDUCE_SCATTER:
        t = reduce_scatter_time_s(per, degree, device)
    else:
        t = all_to_all_time_s(math.ceil(per / degree), degree, device)
    return micro_batches * t


def collective_bytes(kind: Collective, nbytes: int, degree: int) -> int:
    """Bytes each rank sends in a ring ``kind`` on a tensor of ``nbytes`` (full size): ``2(d-1)/d n``
    for an all-reduce, ``(d-1)/d n`` for an all-gather or reduce-scatter, ``(d-1)/d n/d`` for an
    all-to-all (each rank holds ``n/d``)."""
    if kind is Collective.ALL_REDUCE:
        return 2 * (degree - 1) * nbytes // degree
    if kind is Collective.ALL_TO_ALL:
        return (degree - 1) * nbytes // (degree * degree)
    return (degree - 1) * nbytes // degree


# ---------------------------------------------------------------------------------------------
# the analysis


def tp_strategies(gm: GraphModule, degree: int) -> dict[str, NodeStrategies]:
    """The strategies of every node of ``gm`` (a graph from :func:`autopart.trace`) on ``degree``
    TP ranks, by node name in graph order. Parameters and buffers (``get_attr``) get one strategy per
    placement their consumers ask for, plus ``R``."""
    if not isinstance(degree, int) or degree < 1:
        raise AutopartError(f"the TP degree must be a positive integer, got {degree!r}")
    cands: dict[Node, list[Placement]] = {}
    result: dict[str, NodeStrategies] = {}
    attrs: list[Node] = []
    cache: dict[Any, NodeStrategies] = {}  # the 80 layers of a Llama-70B derive one layer's worth
    writing = _touch_written(gm)
    stacked = _stacked_expert_weights(gm, degree)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attrs.append(node)
            cands[node] = [R, *stacked.get(node, ())]
            continue
        if node in writing or defines_sizes(node):
            reason = _WRITES if node in writing else _ROUTED
            result[node.name] = NodeStrategies((replicated(node),), (reason,))
            cands[node] = [R]
            continue
        if routed(node):
            ns = _routed_strategies(node, degree, cands)
        else:
            ns = _cached_strategies(node, degree, cands, cache)
        result[node.name] = ns
        cands[node] = list(dict.fromkeys(s.output for s in ns.strategies))
    for node in attrs:
        asked = [R]
        for user in node.users:
            slot = user.all_input_nodes.index(node)
            asked += [s.inputs[slot] for s in result[user.name].strategies]
        placements = [p for p in dict.fromkeys(asked) if p.kind != "P"]
        result[node.name] = NodeStrategies(
            tuple(
                Strategy("replicate" if p == R else "shard", p, (), (), sharded=p != R)
                for p in placements
            )
        )
    return {n.name: result[n.name] for n in gm.graph.nodes}


def _stacked_expert_weights(gm: GraphModule, degree: int) -> dict[Node, list[Placement]]:
    """Parameters a grouped expert matmul reads through views (a transpose of ``[E, N, K]``), with
    the splits they may take: every dimension, whole or in the groups the matmul's output is cut
    into later (a fused gate / up). Any other parameter is split only as its direct consumer asks
    (module docstring); these reach their matmul through a view, which needs the split first."""
    found: dict[Node, list[Placement]] = {}
    for node in gm.graph.nodes:
        op = op_name(node)
        weight = _weight_param(node, _WEIGHT_SLOT[op]) if op in GROUPED_MATMULS else None
        val = weight.meta.get("val") if weight is not None else None
        if weight is None or val is None:
            continue
        out = node.meta.get("val")
        groups = fused_groups(node, out.shape[-1]) if out is not None and out.ndim else [1]
        found[weight] = [
            shard(k, g) for k in range(val.ndim) for g in groups if val.shape[k] % (g * degree) == 0
        ]
    return found


def _cached_strategies(
    node: Node, degree: int, cands: dict[Node, list[Placement]], cache: dict[Any, NodeStrategies]
) -> NodeStrategies:
    """:func:`node_strategies`, derived once per distinct op, arguments and shapes."""
    try:
        key = cache_key(node, cands)
        ns = cache.get(key) if key is not None else None
        if ns is None:
            ns = node_strategies(node, degree, cands)
            if key is not None:
                cache[key] = ns
    except Exception as exc:
        raise AutopartError(
            f"could not derive TP strategies of node {node.name!r} ({node.op} {node.target}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return ns


def _routed_strategies(
    node: Node, degree: int, cands: dict[Node, list[Placement]]
) -> NodeStrategies:
    """The strategies of a node whose values have a size known only at run time (an expert's
    tokens): the rules' strategies that split only sizes known now (an expert's features, never
    its tokens), so an expert's matmuls split as a dense MLP's do; replicated where a rule cannot
    decide on a run-time size. Not cached: run-time sizes do not hash."""
    try:
        ns = node_strategies(node, degree, cands)
    except Exception:  # a rule that must compare a run-time size: replicated is always right
        return NodeStrategies((replicated(node),), (_ROUTED,))
    kept = tuple(s for s in ns.strategies if _splits_known_sizes(node, s))
    if len(kept) == len(ns.strategies):
        return ns
    return NodeStrategies(kept, (*ns.reasons, _ROUTED))


def _splits_known_sizes(node: Node, strategy: Strategy) -> bool:
    """Whether every dimension ``strategy`` splits (of its output and inputs) has a size known
    at trace time."""
    placed = [(node, strategy.output), *zip(node.all_input_nodes, strategy.inputs)]
    for value, p in placed:
        if not p.is_shard:
            continue
        vals = value.meta.get("val")
        for val in vals if isinstance(vals, (list, tuple)) else [vals]:
            shape = getattr(val, "shape", None)
            if shape is not None and p.dim < len(shape) and not isinstance(shape[p.dim], int):
                return False
    return True


_WRITES = (
    "it writes a tensor in place or touches one before the write, so it runs replicated: a "
    "collective would make a copy, and the write would miss the tensor other nodes read"
)


_ROUTED = (
    "a size of it is known only at run time (the tokens routed to one expert): that size is "
    "never split, every rank routes all tokens"
)


def _touch_written(gm: GraphModule) -> set[Node]:
    """Nodes that write a tensor in place or belong to a mutation group
    (:func:`autopart.passes.mutations.mutation_groups`): they run replicated on their inputs'
    whole values, so every rank writes its whole copy as the model does."""
    nodes = {n for group in mutation_groups(gm) for n in group}
    return nodes | {n for n in gm.graph.nodes if written_inputs(n)}


def weight_matmuls(gm: GraphModule) -> dict[str, str]:
    """The nodes that multiply by a parameter (linear, addmm, mm, matmul, a grouped expert
    matmul) or look one up (embedding), by name in graph order, with their op name: the nodes a
    plan labels ``replicate`` / ``col`` / ``row``."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        op = op_name(node)
        if op in _WEIGHT_SLOT and _weight_param(node, _WEIGHT_SLOT[op]) is not None:
            found[node.name] = op
    return found


_WEIGHT_SLOT = {
    "linear": 1,
    "addmm": 2,
    "mm": 1,
    "matmul": 1,
    "embedding": 0,
    **dict.fromkeys(GROUPED_MATMULS, 1),
}
"""Argument position of the weight of each weight-matmul op."""


def _weight_param(node: Node, slot: int) -> Node | None:
    """The ``get_attr`` parameter that argument ``slot`` of ``node`` is, or is a view of."""
    arg = node_args(node)[slot] if slot < len(node_args(node)) else None
    while isinstance(arg, Node) and arg.op == "call_function" and op_name(arg) in _WEIGHT_VIEWS:
        arg = node_args(arg)[0]
    if isinstance(arg, Node) and arg.op == "get_attr":
        owner = arg.graph.owning_module
        if owner is not None and _is_parameter(owner, str(arg.target)):
            return arg
    return None


_WEIGHT_VIEWS = frozenset({"t", "transpose", "permute", "alias", "view", "reshape"})


def _is_parameter(gm: GraphModule, target: str) -> bool:
    prefix, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(prefix) if prefix else gm
    except AttributeError:
        return False
    return name in owner._parameters
