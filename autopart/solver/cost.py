"""The one definition of what a stage assignment costs, used by the stage ILP, the baselines and the
chain DP alike.

Time of one micro-batch on stage ``s`` of ``p`` (``B_k``: bytes crossing boundary ``k``, see
:meth:`~autopart.planning.graph.BlockGraph.boundary_bytes`; ``p2p``: :func:`~autopart.cost_models.comm.p2p_time_s`,
``alpha + bytes / beta``, and 0 for 0 bytes)::

    T_s = sum of forward_s + backward_s of its blocks
          + [s > 0]     p2p(B_{s-1})    receive activations from the previous stage
          + [s < p - 1] p2p(B_s)        receive gradients from the next stage

and the bottleneck is ``max_s T_s``. Memory of stage ``s``: parameters (a shared parameter on every
stage that uses it), one gradient per parameter, ``Optimizer.states_per_param`` states per parameter
in its dtype (the conventions of :mod:`autopart.cost_models.memory` without mixed precision), and
``in_flight[s]`` times the activation bytes of its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.devices import DeviceSpec
from autopart.cost_models.memory import MemoryBreakdown, Optimizer, as_optimizer
from autopart.errors import AutopartError
from autopart.planning.graph import BlockGraph, OpGraph, PartitionError
from autopart.solver._bound import chain_relaxation_s

__all__ = [
    "bottleneck_s",
    "check_num_stages",
    "lower_bound_s",
    "stage_memory",
    "stage_times_s",
]


def check_num_stages(bg: BlockGraph, num_stages: int) -> None:
    """Raise :class:`PartitionError` unless ``num_stages`` stages can each get a block."""
    if num_stages < 1:
        raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > len(bg.blocks):
        raise PartitionError(
            f"cannot split {len(bg.blocks)} blocks into {num_stages} pipeline stages: every stage needs "
            f"at least one block. Use at most {len(bg.blocks)} stages, or coarsen with a larger "
            "max_blocks if the graph has more nodes."
        )


def stage_times_s(
    bg: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    device: DeviceSpec,
    *,
    ranks: Sequence[int] | None = None,
) -> list[float]:
    """Seconds of one micro-batch (forward + backward + receives) on each stage. With ``ranks``
    (the device of each stage), a boundary between two stages of one device is free: torch hands
    the tensor over locally (the turn of a V-shaped schedule)."""
    boundary = bg.boundary_bytes(stage_of, num_stages)  # validates stage_of
    times = [0.0] * num_stages
    for b, s in zip(bg.blocks, stage_of):
        times[s] += b.forward_s + b.backward_s
    for k, nbytes in enumerate(boundary):
        if ranks is not None and ranks[k] == ranks[k + 1]:
            continue
        comm_s = p2p_time_s(nbytes, device)
        times[k] += comm_s  # stage k receives gradients across boundary k
        times[k + 1] += comm_s  # stage k + 1 receives activations across it
    return times


def bottleneck_s(
    bg: BlockGraph, stage_of: Sequence[int], num_stages: int, device: DeviceSpec
) -> float:
    """The slowest stage's time per micro-batch: what the pipeline's throughput follows."""
    return max(stage_times_s(bg, stage_of, num_stages, device))


def lower_bound_s(
    bg: BlockGraph, num_stages: int, device: DeviceSpec, op_graph: OpGraph | None = None
) -> float:
    """A bottleneck no valid partition into ``num_stages`` non-empty stages can beat, over
    partitions of the *node* graph (``op_graph``, by default the one ``bg`` coarsens), not only of
    the blocks. Without a node graph, the blocks are taken as indivisible.

    Let ``c = p2p(m)`` with ``m`` the fewest bytes a boundary can carry, ``W`` the largest node's
    forward + backward time and ``total`` the sum over all nodes. Then, for ``p >= 2``:

    1. Every boundary costs at least ``c`` on each side. The nodes on stages ``<= k`` form a
       down-set ``I`` (no tensor flows back), non-empty and proper (stages ``0`` and ``k + 1`` have
       work). If the graph (edges: tensors, and graph outputs to the last node) is weakly connected,
       some edge joins ``I`` to the rest and must leave ``I``: that tensor crosses boundary ``k``.
       So ``m`` = the smallest tensor (0 for a disconnected graph), and ``p2p`` grows with bytes.
       (The minimum over cut positions of one topological order would be larger, but it holds only
       for partitions contiguous in that order, so it is not used.)
    2. ``T >= W + c``: the stage holding the largest node also touches a boundary.
    3. ``T >= (total + 2 (p - 1) c) / p``: summing stage times counts all compute once and every
       boundary twice (activations one way, gradients the other).
    4. Indivisibility, and what each boundary must carry. Stage ``k``'s compute is
       ``w(I_k) - w(I_{k-1})`` for the nested down-sets ``I_1 ⊂ ... ⊂ I_{p-1}`` of its boundaries,
       so the cumulative weights ``w(I_k)`` are *breakpoints*: weights of down-sets. A *separator*
       (a node comparable with every node) splits the topological order: a down-set holding it
       holds every node before it, one without it holds no node after it. So every down-set lies in
       a region between consecutive separators ``s_i``, ``s_{i+1}``: it is all nodes up to ``s_i``
       plus a subset of the nodes in between, and its weight is among (weight up to ``s_i``) +
       (subset sums of the nodes in between), a superset of the true breakpoints. Its boundary
       carries every tensor made up to ``s_i`` and read at or after ``s_{i+1}`` (the tensor is
       inside, a reader outside), so it costs at least ``c_i = p2p(max(those bytes, m))`` on each
       side. The smallest ``T`` for which some breakpoints ``0 <= x_1 <= ... <= x_{p-1} <= total``
       from the superset give every stage ``x_k - x_{k-1} + c(x_{k-1}) + c(x_k) <= T`` (no ``c``
       before the first stage or after the last) is a bound; a dynamic program over breakpoints
       sorted by weight decides a given ``T`` exactly and a bisection finds the smallest. Where a
       region has too many subset sums, it is made fluid (see ``_bound.chain_relaxation_s``: a grid,
       with its step subtracted). On a chain every node is a separator, and this is the exact
       optimum over contiguous splits.

    The result is the largest of 2, 3 and 4. With one stage it is the total compute,
    which is exact.
    """
    check_num_stages(bg, num_stages)
    graph = op_graph if op_graph is not None else bg.op_graph
    if graph is not None:
        pos = {name: i for i, name in enumerate(graph.order)}
        weights = [n.compute_s for n in graph.nodes.values()]
        readers = {pos[u]: [pos[v] for v in vs] for u, vs in graph.consumers().items() if vs}
        tensors = [
            (u, max(vs), graph.nodes[graph.order[u]].output_bytes) for u, vs in readers.items()
        ]
    else:
        weights = [b.compute_s for b in bg.blocks]
        readers = {t.producer: list(t.consumers) for t in bg.tensors}
        tensors = [(t.producer, t.consumers[-1], t.nbytes) for t in bg.tensors]
    total = sum(weights)
    if num_stages == 1:
        return total
    edges = [(u, v) for u, vs in readers.items() for v in vs]
    connected = _weakly_connected(range(len(weights)), edges)
    min_bytes = min((nbytes for _, _, nbytes in tensors), default=0) if connected else 0
    comm_s = p2p_time_s(min_bytes, device)
    floor_s = max(max(weights) + comm_s, (total + 2 * (num_stages - 1) * comm_s) / num_stages)
    return chain_relaxation_s(
        weights,
        edges,
        tensors,
        num_stages,
        lambda nbytes: p2p_time_s(max(nbytes, min_bytes), device),
        floor_s,
    )


def stage_memory(
    bg: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    *,
    in_flight: Sequence[int],
    optimizer: Optimizer | str = Optimizer.ADAMW,
) -> list[MemoryBreakdown]:
    """Training memory of each stage; ``in_flight[s]`` micro-batches' activations on stage ``s``."""
    opt = as_optimizer(optimizer)
    if len(in_flight) != num_stages or any(f < 0 for f in in_flight):
        raise AutopartError(
            f"in_flight must give a count >= 0 for each of the {num_stages} stages, got {list(in_flight)}; "
            "pass the micro-batches each stage's schedule keeps in flight (1F1B: min(p - s, m))"
        )
    param_bytes = bg.stage_param_bytes(stage_of, num_stages)
    activations = bg.stage_activation_bytes(stage_of, num_stages)
    return [
        MemoryBreakdown(
            param_bytes=param_bytes[s],
            grad_bytes=param_bytes[s],
            optimizer_bytes=opt.states_per_param * param_bytes[s],
            activation_bytes=in_flight[s] * activations[s],
        )
        for s in range(num_stages)
    ]


def _weakly_connected(items: Sequence[int], edges: Sequence[tuple[int, int]]) -> bool:
    parent = {x: x for x in items}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        parent[root(u)] = root(v)
    return len({root(x) for x in items}) <= 1
