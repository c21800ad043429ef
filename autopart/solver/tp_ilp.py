"""TP ILP: choose a sharding strategy for every node of a traced graph on ``d`` tensor-parallel ranks.

Data (from :mod:`autopart.passes.tp.strategies` and the cost models; one step = forward + backward):
  k in K                  decision groups: one node, or the nodes at the same position in identical
                          repeated layers (they share one decision), with multiplicity m_k
  s in S_k                strategies of k: input placements -> output placement out(s), gradient
                          placement of each input, work split d ways or not
  c_{k,s}                 compute seconds of k's nodes under s (roofline; work / d where split)
  M_{k,s}                 bytes per device of k's nodes under s: parameter + gradient + optimizer
                          state (/ d where split), activations saved for backward
  e = (u, v, i) in E      input i of group v reads group u (edges of identical layers grouped, m_e)
  A_e, B_e                placements u can produce, (requirement, gradient) pairs v can ask for
  r_{e,a,b}               seconds of the collectives turning a into b and bringing the gradient
                          back (:func:`~autopart.passes.tp.strategies.resharding`); pairs with no
                          valid resharding (anything -> P) are absent
  g_u                     seconds of the all-reduce of u's partial gradients (Megatron's ``f``)

Variables:
  x[k,s] in {0,1}         group k runs strategy s                        (_add_strategy_choice)
  y[e,a,b] in {0,1}       edge e carries placement a into requirement b  (_add_resharding)
  z[u,sig] in {0,1}       u's gradient is all-reduced (u's nodes with the same out-edges sig)
                                                                         (_add_gradient_reduction)

Constraints:
  one strategy:           sum_s x[k,s] = 1                                (_add_strategy_choice)
  edge consistency:       sum_b y[e,a,b] = sum_{s: out(s)=a} x[u,s]       for every a in A_e
                          sum_a y[e,a,b] = sum_{s: req_i(s)=b} x[v,s]     for every b in B_e
                          (so the two ends agree, through a resharding)   (_add_resharding)
  gradient reduction:     z[u,sig] >= y[e,R,(R,P)] for every e in sig      (_add_gradient_reduction)
  memory per device:      sum_{k,s} M_{k,s} x[k,s] <= limit               (_add_memory)

Objective: minimize sum m_k c_{k,s} x + sum m_e r_{e,a,b} y + sum m_u g_u z (seconds per step),
then, as a tie-breaker weighted so that it never trades against time, the number of collectives
(an all-reduce beats an equally large all-gather + reduce-scatter pair).       (_add_objective)

Identical repeated layers (``model.layers.1`` ... ``model.layers.78``) share their decisions, so a
Llama-70B-shaped graph (80 layers, ~3,300 nodes) is a model of a few hundred groups; the first and
last layer keep their own variables. Layers are grouped with period 1 and with period 2 (alternating
layers, for one-linear layers that pair up column- and row-parallel), and the cheaper plan is kept.

Partial sums resolve to ``R`` by all-reduce: ``P -> S(k)`` reduce-scatters in the forward (sequence
parallelism) are off unless ``reduce_scatter=True``; reduce-scatters still appear in the backward
as the dual of all-gathers.

Repeated layers, Megatron's hand-written assignment (:func:`megatron_sharding`, by module names) and
the explanations of forced replication (``TPPlan.fallbacks``) come from
:mod:`autopart.solver._tp_graph`; the strategies and resharding rules from
:mod:`autopart.passes.tp.strategies`.

The solve is seeded, single-threaded and limited in CP-SAT's deterministic time
(:mod:`autopart.solver.cpsat`: the same plan on any machine, even where it stops at its limit);
its status is checked.
An infeasible memory limit is answered by a second solve that minimizes memory, so the error can
say the minimum a plan needs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from ortools.sat.python import cp_model
from torch.fx import GraphModule, Node

from autopart.cost_models.compute import ComputeModel
from autopart.cost_models.devices import DeviceSpec, get_device
from autopart.cost_models.memory import Optimizer, as_optimizer
from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError
from autopart.passes.tp.placements import NodeStrategies, P, Placement, R, Strategy
from autopart.passes.tp.strategies import (
    Collective,
    collective_bytes,
    collective_time_s,
    resharding,
    tp_strategies,
    weight_matmuls,
)
from autopart.solver._memory_need import MemoryNeed, memory_need
from autopart.solver._tp_graph import Layers, fallbacks, megatron_sharding
from autopart.solver.cpsat import limited_solver
from autopart.units import format_bytes, format_bytes_up, parse_bytes

__all__ = [
    "InfeasibleTPMemoryError",
    "TPCollective",
    "TPPlan",
    "megatron_plan",
    "megatron_sharding",
    "solve_tp",
]

_TIME_UNITS = 10_000_000  # the costliest choice of every group and edge sums to this many units
_KIB = 1024
_SHARDING_LABELS = ("replicate", "col", "row")


class InfeasibleTPMemoryError(AutopartError):
    """No TP plan fits the per-device memory limit."""

    def __init__(self, message: str, minimum_bytes: int, *, need: MemoryNeed | None = None) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        """Proven: every TP plan needs at least this much per device."""
        self.need = need or MemoryNeed(minimum_bytes, minimum_bytes, 0.0)


@dataclass(frozen=True, slots=True)
class TPCollective:
    """One collective of a step (per micro-batch it runs on ``1 / micro_batches`` of the bytes)."""

    kind: str
    """``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"`` or ``"all_to_all"``."""
    direction: str
    """``"forward"`` or ``"backward"``."""
    producer: str
    """The node whose output (or, backward, whose gradient) is communicated."""
    consumer: str
    """The node that reads it; ``""`` for a gradient all-reduce shared by all consumers."""
    nbytes: int
    """Full (unsharded) size of the tensor."""
    sent_bytes: int
    """Bytes each rank sends (ring algorithm)."""


@dataclass(frozen=True, slots=True)
class TPPlan:
    """The tensor-parallel plan of one graph: a strategy per node, its communication and cost."""

    degree: int
    sharding: Mapping[str, str]
    """Every weight matmul (linear, addmm, mm, matmul with a parameter) and embedding ->
    ``"replicate"``, ``"col"`` (output features split) or ``"row"`` (input features split, partial
    output; for an embedding: vocabulary-parallel)."""
    placements: Mapping[str, str]
    """Every node -> the placement of its output (``"R"``, ``"P"``, ``"S(2)"``, ``"S(2,groups=3)"``);
    ``get_attr`` nodes: how the parameter or buffer is stored."""
    input_placements: Mapping[str, Mapping[str, str]]
    """Every node -> {input node: the placement it reads that input in}."""
    forward_all_reduces_per_block: int
    """Forward all-reduces whose consumer lies in a repeated layer, for the layer with the most
    (0 without repeated layers)."""
    forward_all_reduces_by_block: Mapping[str, int]
    comm_bytes_per_step: int
    """Bytes each rank sends per training step (forward and backward collectives)."""
    collectives: tuple[TPCollective, ...]
    compute_s: float
    """Predicted compute seconds per step on one rank (forward + backward)."""
    comm_s: float
    """Predicted collective seconds per step (not overlapped with compute)."""
    memory_bytes: int
    """Predicted bytes per device: parameter, gradient and optimizer state, saved activations."""
    fallbacks: Mapping[str, str]
    """Nodes left unsplit because the degree does not divide a size they need split, and why:
    replicated weight matmuls and attention, and reshapes (hidden -> heads) that run on replicated
    or partial tensors."""
    status: str
    """CP-SAT's status: ``"OPTIMAL"`` or ``"FEASIBLE"`` (time limit reached with a plan)."""
    solve_s: float
    """Seconds spent building and solving the ILP."""

    def __post_init__(self) -> None:
        if self.degree < 1:
            raise ValueError(f"TPPlan.degree must be >= 1, got {self.degree}")
        bad = {n: s for n, s in self.sharding.items() if s not in _SHARDING_LABELS}
        if bad:
            raise ValueError(
                f"TPPlan.sharding has unknown strategies {bad}; use {_SHARDING_LABELS}"
            )
        for name, text in self.placements.items():
            try:
                Placement.parse(text)
            except ValueError as exc:
                raise ValueError(f"TPPlan.placements[{name!r}]: {exc}") from None
        if self.degree == 1 and any(s != "replicate" for s in self.sharding.values()):
            raise ValueError("TPPlan.sharding: a degree-1 plan replicates everything")
        if self.comm_bytes_per_step < 0 or self.forward_all_reduces_per_block < 0:
            raise ValueError("TPPlan.comm_bytes_per_step and all-reduce counts must be >= 0")
        for name in ("sharding", "placements", "input_placements", "fallbacks"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(
            self,
            "forward_all_reduces_by_block",
            MappingProxyType(dict(self.forward_all_reduces_by_block)),
        )

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    def tp_json(self) -> dict[str, Any]:
        """The ``"tp"`` section of a plan file."""
        return {
            "degree": self.degree,
            "sharding": dict(self.sharding),
            "forward_all_reduces_per_block": self.forward_all_reduces_per_block,
            "comm_bytes_per_step": self.comm_bytes_per_step,
        }


def solve_tp(
    gm: GraphModule,
    degree: int,
    *,
    device: str | DeviceSpec = "h100",
    memory: int | str | None = None,
    time_limit_s: float = 10.0,
    micro_batches: int = 1,
    optimizer: Optimizer | str = Optimizer.ADAMW,
    reduce_scatter: bool = False,
    group_layers: bool = True,
    seed: int = 0,
) -> TPPlan:
    """The cheapest TP plan of ``gm`` (traced and annotated) on ``degree`` ranks (module docstring).

    ``memory`` limits the bytes per device (``"80GiB"``); ``micro_batches`` splits the example batch
    (each collective runs once per micro-batch on its share, and activations are those of one
    micro-batch); ``group_layers=False`` gives every node of every layer its own variables.
    """
    return _solve(
        gm,
        degree,
        device=device,
        memory=memory,
        time_limit_s=time_limit_s,
        micro_batches=micro_batches,
        optimizer=optimizer,
        reduce_scatter=reduce_scatter,
        group_layers=group_layers,
        seed=seed,
        pinned={},
    )


def megatron_plan(
    gm: GraphModule,
    degree: int,
    *,
    device: str | DeviceSpec = "h100",
    memory: int | str | None = None,
    time_limit_s: float = 10.0,
    micro_batches: int = 1,
    optimizer: Optimizer | str = Optimizer.ADAMW,
    seed: int = 0,
) -> TPPlan:
    """Megatron-LM's hand-written plan (Shoeybi et al. 2019, section 3): in every repeated layer the
    :func:`megatron_sharding` of its matmuls, everything else (placements in between, embedding and
    head) left to the same ILP, so its cost compares directly with :func:`solve_tp`'s."""
    return _solve(
        gm,
        degree,
        device=device,
        memory=memory,
        time_limit_s=time_limit_s,
        micro_batches=micro_batches,
        optimizer=optimizer,
        reduce_scatter=False,
        group_layers=True,
        seed=seed,
        pinned=megatron_sharding(gm),
    )


# ---------------------------------------------------------------------------------------------
# data


class _PinConflict(Exception):
    """Pinned strategies differ among nodes that this grouping of layers makes share a decision."""


@dataclass(slots=True)
class _Group:
    """Nodes sharing one decision, with their strategies and per-strategy costs (all members)."""

    name: str
    members: list[Node]
    strategies: tuple[Strategy, ...] = ()
    cost_s: list[float] = field(default_factory=list)
    """Seconds of all members, per strategy."""
    cost: list[int] = field(default_factory=list)
    """The same in time units."""
    memory_kib: list[int] = field(default_factory=list)
    requires_grad: bool = False
    out_bytes: int = 0
    is_tensor: bool = True
    """False for list outputs (split, chunk): their parts are resharded after getitem, not here."""


@dataclass(slots=True)
class _Pair:
    cost: int
    """Time units of the collectives of all member edges."""
    collectives: int
    """Number of collectives of all member edges (the tie-breaker)."""
    reduces_gradient: bool


@dataclass(slots=True)
class _Edge:
    u: int
    v: int
    slot: int
    count: int
    pairs: dict[tuple[Placement, tuple[Placement, Placement]], _Pair] = field(default_factory=dict)


@dataclass(slots=True)
class _Data:
    degree: int
    groups: list[_Group]
    group_of: dict[Node, int]
    edges: list[_Edge]
    reductions: list[tuple[int, tuple[int, ...], int, int]]
    """(group u, out-edge ids, member count, time units of one gradient all-reduce)."""
    unit_s: float
    reasons: dict[str, tuple[str, ...]]
    """Why sharded strategies were not offered, by node (see NodeStrategies.reasons)."""

    def outputs(self, k: int) -> list[Placement]:
        return list(dict.fromkeys(s.output for s in self.groups[k].strategies))

    def requirements(self, e: _Edge) -> list[tuple[Placement, Placement]]:
        return list(
            dict.fromkeys((s.inputs[e.slot], s.grads[e.slot]) for s in self.groups[e.v].strategies)
        )


@dataclass(frozen=True, slots=True)
class _Setup:
    degree: int
    device: DeviceSpec
    compute: ComputeModel
    micro_batches: int
    state_factor: int
    """Bytes of parameter + gradient + optimizer state per byte of a trainable parameter."""
    reduce_scatter: bool


def _build_data(
    gm: GraphModule,
    setup: _Setup,
    strategies: Mapping[str, NodeStrategies],
    keys: Mapping[Node, Any],
    pinned: Mapping[str, str],
) -> _Data:
    """The data of the ILP; nodes with equal ``keys`` share one decision (others: their own)."""
    nodes = list(gm.graph.nodes)
    groups: list[_Group] = []
    group_of: dict[Node, int] = {}
    by_key: dict[Any, int] = {}
    for node in nodes:
        key = keys.get(node, node.name)
        if key not in by_key:
            by_key[key] = len(groups)
            groups.append(_Group(node.name, []))
        group_of[node] = by_key[key]
        groups[by_key[key]].members.append(node)

    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    saved = _saved_names(nodes)
    for g in groups:
        union = list(dict.fromkeys(s for m in g.members for s in strategies[m.name].strategies))
        labels = {pinned.get(m.name) for m in g.members}
        if len(labels) > 1:
            raise _PinConflict(g.name)
        label = labels.pop()
        if label is not None:
            chosen = [s for s in union if s.label == label]
            union = chosen or [s for s in union if s.label == "replicate"]
        g.strategies = tuple(union)
        rep = g.members[0]
        g.requires_grad = _requires_grad(rep, params)
        g.out_bytes = _output_bytes(rep)
        g.is_tensor = isinstance(rep.meta.get("val"), torch.Tensor) or rep.op == "get_attr"
        # members are the same op on the same shapes: one costs what every other does
        g.cost_s = [_compute_s(rep, s, setup) * len(g.members) for s in g.strategies]
        g.memory_kib = [
            math.ceil(
                sum(_memory_bytes(m, s, setup, params, buffers, saved) for m in g.members) / _KIB
            )
            for s in g.strategies
        ]

    raw_edges: dict[tuple[int, int, int], list[tuple[Node, Node]]] = {}
    out_edges: dict[Node, list[tuple[int, int, int]]] = {}
    for v in nodes:
        for slot, u in enumerate(v.all_input_nodes):
            key = (group_of[u], group_of[v], slot)
            raw_edges.setdefault(key, []).append((u, v))
            out_edges.setdefault(u, []).append(key)
    edge_index = {key: i for i, key in enumerate(raw_edges)}

    # time units: the costliest choice of everything sums to _TIME_UNITS
    worst_s = sum(max(g.cost_s, default=0.0) for g in groups)
    edge_s: dict[tuple[int, int, int], dict[Any, tuple[float, int, bool]]] = {}
    for key, members in raw_edges.items():
        u, v, slot = key
        edge_s[key] = _edge_costs(groups[u], groups[v], slot, len(members), setup)
        worst_s += max((c for c, _, _ in edge_s[key].values()), default=0.0)
    ar_s = {
        k: collective_time_s(
            Collective.ALL_REDUCE,
            g.out_bytes,
            setup.degree,
            setup.device,
            micro_batches=setup.micro_batches,
        )
        for k, g in enumerate(groups)
    }
    worst_s += sum(ar_s[k] * len(g.members) for k, g in enumerate(groups))
    unit_s = max(worst_s, 1e-12) / _TIME_UNITS

    def units(seconds: float) -> int:
        return round(seconds / unit_s)

    for g in groups:
        g.cost = [units(c) for c in g.cost_s]
    edges = []
    for key, members in raw_edges.items():
        u, v, slot = key
        e = _Edge(u, v, slot, len(members))
        for pair, (seconds, count, reduces) in edge_s[key].items():
            e.pairs[pair] = _Pair(units(seconds), count, reduces)
        edges.append(e)

    signatures: Counter[tuple[int, tuple[int, ...]]] = Counter()
    for node in nodes:
        k = group_of[node]
        sig = tuple(sorted({edge_index[key] for key in out_edges.get(node, [])}))
        if any(p.reduces_gradient for i in sig for p in edges[i].pairs.values()):
            signatures[(k, sig)] += 1
    reductions = [(k, sig, count, units(ar_s[k] * count)) for (k, sig), count in signatures.items()]
    reasons = {name: ns.reasons for name, ns in strategies.items() if ns.reasons}
    return _Data(setup.degree, groups, group_of, edges, reductions, unit_s, reasons)


def _edge_costs(
    u: _Group, v: _Group, slot: int, count: int, setup: _Setup
) -> dict[tuple[Placement, tuple[Placement, Placement]], tuple[float, int, bool]]:
    """Seconds and number of collectives of every valid (producer placement, requirement) pair
    of an edge, for all ``count`` member edges."""
    outs = list(dict.fromkeys(s.output for s in u.strategies))
    reqs = list(dict.fromkeys((s.inputs[slot], s.grads[slot]) for s in v.strategies))
    pairs = {}
    for a in outs:
        for b in reqs:
            if not u.is_tensor and a != b[0]:
                continue
            how = resharding(
                a, b[0], b[1], requires_grad=u.requires_grad, reduce_scatter=setup.reduce_scatter
            )
            if how is None:
                continue
            seconds, n = 0.0, 0
            for kind in (how.forward, how.backward):
                if kind is not None:
                    seconds += collective_time_s(
                        kind,
                        u.out_bytes,
                        setup.degree,
                        setup.device,
                        micro_batches=setup.micro_batches,
                    )
                    n += 1
            pairs[(a, b)] = (seconds * count, n * count, how.reduces_gradient)
    return pairs


def _compute_s(node: Node, s: Strategy, setup: _Setup) -> float:
    cost = node.meta.get("autopart")
    if node.op not in ("call_function", "call_method", "call_module") or not isinstance(
        cost, NodeCost
    ):
        return 0.0
    share = setup.micro_batches * (setup.degree if s.sharded else 1)
    part = dataclasses.replace(
        cost,
        flops=cost.flops // share,
        backward_flops=cost.backward_flops // share,
        bytes_read=cost.bytes_read // share,
        bytes_written=cost.bytes_written // share,
    )
    m = setup.micro_batches
    return m * (
        setup.compute.forward_s(node.name, part) + setup.compute.backward_s(node.name, part)
    )


def _memory_bytes(
    node: Node,
    s: Strategy,
    setup: _Setup,
    params: Mapping[str, Any],
    buffers: Mapping[str, Any],
    saved: set[str],
) -> float:
    split = setup.degree if s.output.is_shard else 1
    if node.op == "get_attr":
        target = str(node.target)
        if target in params:
            p = params[target]
            nbytes = p.numel() * p.element_size()
            return nbytes * (setup.state_factor if p.requires_grad else 1) / split
        if target in buffers:
            b = buffers[target]
            return b.numel() * b.element_size() / split
        return 0.0
    cost = node.meta.get("autopart")
    if not isinstance(cost, NodeCost):
        return 0.0
    act = cost.output_bytes / split if node.name in saved else 0.0
    act += cost.private_saved_bytes / (setup.degree if s.sharded else 1)
    return act / setup.micro_batches


def _saved_names(nodes: Sequence[Node]) -> set[str]:
    saved: set[str] = set()
    for n in nodes:
        cost = n.meta.get("autopart")
        if isinstance(cost, NodeCost):
            saved.update(cost.saved_from)
    return saved


def _requires_grad(node: Node, params: Mapping[str, Any]) -> bool:
    if node.op == "get_attr":
        p = params.get(str(node.target))
        return bool(p is not None and p.requires_grad)
    cost = node.meta.get("autopart")
    return bool(isinstance(cost, NodeCost) and cost.requires_grad)


def _output_bytes(node: Node) -> int:
    cost = node.meta.get("autopart")
    return cost.output_bytes if isinstance(cost, NodeCost) else 0


# ---------------------------------------------------------------------------------------------
# variables and constraints, one function per family


def _add_strategy_choice(model: cp_model.CpModel, d: _Data) -> dict[tuple[int, int], Any]:
    x = {}
    for k, g in enumerate(d.groups):
        for s in range(len(g.strategies)):
            x[k, s] = model.new_bool_var(f"x[{g.name},{s}]")
        model.add_exactly_one(x[k, s] for s in range(len(g.strategies))).with_name(
            f"one_strategy[{g.name}]"
        )
    return x


def _add_resharding(
    model: cp_model.CpModel, d: _Data, x: Mapping[tuple[int, int], Any]
) -> dict[tuple[int, Placement, tuple[Placement, Placement]], Any]:
    y: dict[tuple[int, Placement, tuple[Placement, Placement]], Any] = {}
    for i, e in enumerate(d.edges):
        u, v = d.groups[e.u], d.groups[e.v]
        where = f"{u.name}->{v.name}[{e.slot}]"
        for a, b in e.pairs:
            y[i, a, b] = model.new_bool_var(f"y[{where},{a},{b[0]}/{b[1]}]")
        for a in d.outputs(e.u):
            produce = [x[e.u, s] for s, st in enumerate(u.strategies) if st.output == a]
            model.add(
                sum(y[i, a, b] for b in d.requirements(e) if (a, b) in e.pairs) == sum(produce)
            ).with_name(f"produce[{where},{a}]")
        for b in d.requirements(e):
            consume = [
                x[e.v, s]
                for s, st in enumerate(v.strategies)
                if (st.inputs[e.slot], st.grads[e.slot]) == b
            ]
            model.add(
                sum(y[i, a, b] for a in d.outputs(e.u) if (a, b) in e.pairs) == sum(consume)
            ).with_name(f"consume[{where},{b[0]}/{b[1]}]")
    return y


def _add_gradient_reduction(
    model: cp_model.CpModel,
    d: _Data,
    y: Mapping[tuple[int, Placement, tuple[Placement, Placement]], Any],
) -> list[Any]:
    z = []
    for r, (k, sig, _, _) in enumerate(d.reductions):
        var = model.new_bool_var(f"z[{d.groups[k].name},{r}]")
        for i in sig:
            for (a, b), pair in d.edges[i].pairs.items():
                if pair.reduces_gradient:
                    model.add(var >= y[i, a, b]).with_name(
                        f"grad_reduce[{d.groups[k].name},{d.groups[d.edges[i].v].name}]"
                    )
        z.append(var)
    return z


def _add_memory(
    model: cp_model.CpModel, d: _Data, x: Mapping[tuple[int, int], Any], limit_kib: int
) -> None:
    model.add(_memory_expr(d, x) <= limit_kib).with_name("memory_per_device")


def _memory_expr(d: _Data, x: Mapping[tuple[int, int], Any]) -> Any:
    return sum(
        g.memory_kib[s] * x[k, s]
        for k, g in enumerate(d.groups)
        for s in range(len(g.strategies))
        if g.memory_kib[s]
    )


def _add_objective(
    model: cp_model.CpModel,
    d: _Data,
    x: Mapping[tuple[int, int], Any],
    y: Mapping[tuple[int, Placement, tuple[Placement, Placement]], Any],
    z: Sequence[Any],
) -> None:
    time_units = _time_expr(d, x, y, z)
    collectives = sum(
        p.collectives * y[i, a, b]
        for i, e in enumerate(d.edges)
        for (a, b), p in e.pairs.items()
        if p.collectives
    ) + sum(count * var for (_, _, count, _), var in zip(d.reductions, z))
    model.minimize(_tie_weight(d) * time_units + collectives)


def _time_expr(
    d: _Data,
    x: Mapping[tuple[int, int], Any],
    y: Mapping[tuple[int, Placement, tuple[Placement, Placement]], Any],
    z: Sequence[Any],
) -> Any:
    compute = sum(
        g.cost[s] * x[k, s]
        for k, g in enumerate(d.groups)
        for s in range(len(g.strategies))
        if g.cost[s]
    )
    comm = sum(
        p.cost * y[i, a, b]
        for i, e in enumerate(d.edges)
        for (a, b), p in e.pairs.items()
        if p.cost
    )
    reduce = sum(units * var for (_, _, _, units), var in zip(d.reductions, z) if units)
    return compute + comm + reduce


def _tie_weight(d: _Data) -> int:
    most = sum(max((p.collectives for p in e.pairs.values()), default=0) for e in d.edges)
    return most + sum(count for _, _, count, _ in d.reductions) + 1


# ---------------------------------------------------------------------------------------------
# solve


def _solve(
    gm: GraphModule,
    degree: int,
    *,
    device: str | DeviceSpec,
    memory: int | str | None,
    time_limit_s: float,
    micro_batches: int,
    optimizer: Optimizer | str,
    reduce_scatter: bool,
    group_layers: bool,
    seed: int,
    pinned: Mapping[str, str],
) -> TPPlan:
    start = time.perf_counter()
    if not isinstance(degree, int) or degree < 1:
        raise AutopartError(f"the TP degree must be a positive integer, got {degree!r}")
    if micro_batches < 1:
        raise AutopartError(f"micro_batches must be >= 1, got {micro_batches}")
    if not any(isinstance(n.meta.get("autopart"), NodeCost) for n in gm.graph.nodes):
        raise AutopartError(
            "the graph has no costs; run autopart.passes.annotate.annotate(gm) before solve_tp"
        )
    spec = get_device(device)
    opt = as_optimizer(optimizer)
    setup = _Setup(
        degree=degree,
        device=spec,
        compute=ComputeModel(spec),
        micro_batches=micro_batches,
        state_factor=opt.state_bytes_per_param_byte,
        reduce_scatter=reduce_scatter,
    )
    limit = parse_bytes(memory) if memory is not None else None
    layers = Layers.of(gm)
    groupings = [layers.decision_keys(1), layers.decision_keys(2)] if group_layers else []
    if not layers.has_middle():
        groupings = groupings[:1]
    strategies = tp_strategies(gm, degree)
    best: tuple[int, _Data, list[int], str] | None = None
    for keys in groupings:
        try:
            data = _build_data(gm, setup, strategies, keys, pinned)
        except _PinConflict:
            continue
        found = _solve_data(data, limit, time_limit_s, seed)
        if best is None or found[0] < best[0]:
            best = (found[0], data, found[1], found[2])
    if best is None:  # no grouping asked for, or pins that vary with a period of more than 2
        data = _build_data(gm, setup, strategies, {}, pinned)
        found = _solve_data(data, limit, time_limit_s, seed)
        best = (found[0], data, found[1], found[2])
    _, data, choice, status = best
    return _plan(gm, data, choice, status, setup, layers, time.perf_counter() - start)


def _solve_data(
    data: _Data, limit: int | None, time_limit_s: float, seed: int
) -> tuple[int, list[int], str]:
    """(objective, strategy index per group, status name)."""
    model = cp_model.CpModel()
    x = _add_strategy_choice(model, data)
    y = _add_resharding(model, data, x)
    z = _add_gradient_reduction(model, data, y)
    if limit is not None:
        _add_memory(model, data, x, limit // _KIB)
    _add_objective(model, data, x, y, z)
    solver = _solver(time_limit_s, seed)
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE and limit is not None:
        need = _minimum_memory(data, limit // _KIB, time_limit_s, seed)
        raise InfeasibleTPMemoryError(
            f"no TP plan of degree {data.degree} fits {format_bytes(limit)} per device: a plan "
            f"{need.needs(format_bytes_up)} (parameters, gradients, optimizer state and saved "
            f"activations). {need.raise_to(format_bytes_up)}, or use a larger TP degree, more "
            "pipeline stages or more micro-batches.",
            need.least_bytes,
            need=need,
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise AutopartError(
            f"the TP solver found no plan within {time_limit_s:g} deterministic s (status "
            f"{solver.status_name(status)}); raise time_limit_s."
        )
    choice = [
        next(s for s in range(len(g.strategies)) if solver.value(x[k, s]))
        for k, g in enumerate(data.groups)
    ]
    return round(solver.objective_value), choice, solver.status_name(status)


def _solver(time_limit_s: float, seed: int) -> cp_model.CpSolver:
    solver = limited_solver(time_limit_s, seed)
    # Full LP relaxation of the edge-consistency constraints: it proves optimality in a fraction of
    # a second where the default level searches for many seconds.
    solver.parameters.linearization_level = 2
    return solver


def _minimum_memory(data: _Data, limit_kib: int, time_limit_s: float, seed: int) -> MemoryNeed:
    """The least memory per device a TP plan needs, given that none fits ``limit_kib``: exact when
    the solve proves it optimal, else a proven lower bound and the leanest plan found."""
    model = cp_model.CpModel()
    x = _add_strategy_choice(model, data)
    _add_resharding(model, data, x)
    model.minimize(_memory_expr(data, x))
    solver = _solver(time_limit_s, seed)
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        raise AutopartError(
            f"no TP plan of degree {data.degree} exists at any memory limit: some tensor cannot be "
            "resharded between the strategies of its producer and consumer; use another TP degree."
        )
    assert status != cp_model.MODEL_INVALID, solver.status_name(status)
    return memory_need(
        status,
        solver,
        unit_bytes=_KIB,
        floor_units=limit_kib + 1,
        fallback_units=None,
        time_limit_s=time_limit_s,
    )


def _evaluate(data: _Data, choice: Sequence[int]) -> int | None:
    """The objective of a choice of strategies (one index per group), without the ILP; ``None``
    if some edge cannot be resharded. The reference the brute-force tests compare the ILP with."""
    time_units = sum(g.cost[s] for g, s in zip(data.groups, choice))
    collectives = 0
    reduces: set[int] = set()
    for i, e in enumerate(data.edges):
        a = data.groups[e.u].strategies[choice[e.u]].output
        st = data.groups[e.v].strategies[choice[e.v]]
        pair = e.pairs.get((a, (st.inputs[e.slot], st.grads[e.slot])))
        if pair is None:
            return None
        time_units += pair.cost
        collectives += pair.collectives
        if pair.reduces_gradient:
            reduces.add(i)
    for _, sig, count, units in data.reductions:
        if reduces.intersection(sig):
            time_units += units
            collectives += count
    return _tie_weight(data) * time_units + collectives


# ---------------------------------------------------------------------------------------------
# the plan


def _plan(
    gm: GraphModule,
    data: _Data,
    choice: Sequence[int],
    status: str,
    setup: _Setup,
    layers: Layers,
    solve_s: float,
) -> TPPlan:
    nodes = list(gm.graph.nodes)
    chosen = {n: data.groups[data.group_of[n]].strategies[choice[data.group_of[n]]] for n in nodes}
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    saved = _saved_names(nodes)
    layer_of = layers.layer_of
    d, m = setup.degree, setup.micro_batches

    collectives: list[TPCollective] = []
    comm_s = 0.0
    for v in nodes:
        for slot, u in enumerate(v.all_input_nodes):
            st = chosen[v]
            how = resharding(
                chosen[u].output,
                st.inputs[slot],
                st.grads[slot],
                requires_grad=_requires_grad(u, params),
                reduce_scatter=setup.reduce_scatter,
            )
            assert how is not None, (u.name, v.name)
            for direction, kind in (("forward", how.forward), ("backward", how.backward)):
                if kind is not None:
                    nbytes = _output_bytes(u)
                    collectives.append(
                        TPCollective(
                            str(kind),
                            direction,
                            u.name,
                            v.name,
                            nbytes,
                            collective_bytes(kind, nbytes, d),
                        )
                    )
                    comm_s += collective_time_s(kind, nbytes, d, setup.device, micro_batches=m)
    for u in nodes:
        if chosen[u].output != R or not _requires_grad(u, params):
            continue
        if any(
            chosen[v].inputs[v.all_input_nodes.index(u)] == R
            and chosen[v].grads[v.all_input_nodes.index(u)] == P
            for v in u.users
        ):
            nbytes = _output_bytes(u)
            kind = Collective.ALL_REDUCE
            collectives.append(
                TPCollective(
                    str(kind), "backward", u.name, "", nbytes, collective_bytes(kind, nbytes, d)
                )
            )
            comm_s += collective_time_s(kind, nbytes, d, setup.device, micro_batches=m)

    by_block: dict[str, int] = {}
    for path in dict.fromkeys(layer_of.values()):
        by_block[path] = 0
    node_by_name = {n.name: n for n in nodes}
    for c in collectives:
        if c.kind == Collective.ALL_REDUCE and c.direction == "forward":
            layer = layer_of.get(node_by_name[c.consumer])
            if layer is not None:
                by_block[layer] += 1

    sharding = {name: chosen[node_by_name[name]].label for name in weight_matmuls(gm)}
    unsplit = fallbacks(gm, chosen, data.reasons)
    memory = sum(_memory_bytes(n, chosen[n], setup, params, buffers, saved) for n in nodes)
    return TPPlan(
        degree=d,
        sharding=sharding,
        placements={n.name: str(chosen[n].output) for n in nodes},
        input_placements={
            n.name: {u.name: str(p) for u, p in zip(n.all_input_nodes, chosen[n].inputs)}
            for n in nodes
            if n.all_input_nodes
        },
        forward_all_reduces_per_block=max(by_block.values(), default=0),
        forward_all_reduces_by_block=by_block,
        comm_bytes_per_step=sum(c.sent_bytes for c in collectives),
        collectives=tuple(collectives),
        compute_s=sum(_compute_s(n, chosen[n], setup) for n in nodes),
        comm_s=comm_s,
        memory_bytes=math.ceil(memory),
        fallbacks=unsplit,
        status=status,
        solve_s=solve_s,
    )
