"""Blocks: contiguous runs of a model's topological order, the units the stage solvers place, and
the tensors between them (built by :func:`autopart.planning.graph.coarsen`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx

from autopart.errors import AutopartError
from autopart.planning.cuts import crossing_bytes

__all__ = [
    "Block",
    "BlockGraph",
    "CrossTensor",
    "PartitionError",
    "Selective",
    "check_fixed_s",
    "scaled_time_s",
    "scaled_weight_s",
]


class PartitionError(AutopartError):
    """A stage assignment or a partitioning request is not valid."""


def scaled_time_s(time_s: float, fixed_s: float, factor: float) -> float:
    """``time_s`` of a pass at ``factor`` times the samples it was costed at: its fixed part once,
    the rest in proportion. The one rule by which nodes and blocks are costed at a micro-batch."""
    return fixed_s + (time_s - fixed_s) * factor


def scaled_weight_s(weight_s: float, backward_s: float, scaled_backward_s: float) -> float:
    """A backward's weight-gradient part after scaling: the same share of the scaled backward
    (``B + W`` stays the backward)."""
    return weight_s * scaled_backward_s / backward_s if backward_s > 0 else 0.0


def check_fixed_s(owner: str, fixed_s: float, whole_s: float) -> None:
    """Raise unless ``fixed_s`` is a part of ``whole_s``."""
    if not 0 <= fixed_s <= whole_s * (1 + 1e-9) + 1e-15:
        raise AutopartError(
            f"{owner}: a fixed part ({fixed_s!r} s) must lie in [0, the time it is part of = "
            f"{whole_s!r} s]"
        )


@dataclass(frozen=True, slots=True)
class Selective:
    """A block's selective recomputation: it runs under checkpointing that keeps its weight
    matmuls' and fused attention's outputs and recomputes its other ops (attention scores,
    softmax, norms, activation functions) in the backward (:mod:`autopart.planning.selective`)."""

    freed_bytes: int
    """Activation bytes the block no longer keeps per step: what it rebuilds in its backward."""
    forward_s: float
    """The forward of the ops it runs again in the backward."""
    fixed_forward_s: float
    """Its fixed part (:attr:`Block.fixed_forward_s`)."""

    def __post_init__(self) -> None:
        if self.freed_bytes < 0 or not self.forward_s >= 0:
            raise AutopartError("a selective recomputation's bytes and time must be >= 0")
        check_fixed_s("a selective recomputation", self.fixed_forward_s, self.forward_s)

    @staticmethod
    def merged(parts: Sequence[Selective | None]) -> Selective | None:
        """The selective recomputation of consecutive blocks merged into one, ``None`` unless
        every part has one (the merged block runs under one checkpoint)."""
        if not parts or any(p is None for p in parts):
            return None
        some = [p for p in parts if p is not None]
        return Selective(
            freed_bytes=sum(p.freed_bytes for p in some),
            forward_s=sum(p.forward_s for p in some),
            fixed_forward_s=sum(p.fixed_forward_s for p in some),
        )

    def scaled(self, factor: float) -> Selective:
        """Per-sample bytes and time times ``factor`` (:func:`scaled_time_s`)."""
        return dataclasses.replace(
            self,
            freed_bytes=round(self.freed_bytes * factor),
            forward_s=scaled_time_s(self.forward_s, self.fixed_forward_s, factor),
        )


@dataclass(frozen=True, slots=True)
class Block:
    """A contiguous run of the topological order that the stage solver places as one unit."""

    index: int
    name: str
    """The longest common module path of its nodes, or ``first..last``."""
    nodes: tuple[str, ...]
    modules: tuple[str, ...]
    """Distinct module paths of its nodes, in order."""
    forward_s: float
    backward_s: float
    flops: int
    backward_flops: int
    param_bytes: int
    """Bytes of the parameters this block uses and no other block uses."""
    params: tuple[str, ...]
    """Every parameter this block uses (shared ones included)."""
    activation_bytes: int
    """Bytes saved for backward per step by this block's nodes: each saved value once, by the
    first block that saves it (:attr:`BlockGraph.saved_across` lists values several blocks save)."""
    layer: str | None
    """The repeated layer holding most of this block's compute; ``None`` outside layers."""
    backward_weight_s: float = 0.0
    """The part of ``backward_s`` that computes parameter gradients (``W``)."""
    weight_grad_bytes: int = 0
    """Output gradients a deferred weight gradient keeps until it runs: the outputs of the nodes
    that have one (torch's split backward holds them between ``I`` and ``W``)."""
    fixed_forward_s: float = 0.0
    """The part of ``forward_s`` every micro-batch pays whatever its size (its nodes' fixed
    parts: launches, weight reads); :meth:`BlockGraph.scaled` keeps it."""
    fixed_backward_s: float = 0.0
    """The same for ``backward_s``."""
    input_bytes: int = 0
    """Bytes of the values it reads from outside (other blocks' outputs, model inputs it saves):
    all it keeps per micro-batch when recomputed."""
    recomputed: bool = False
    """Its forward runs again in its backward (``torch.utils.checkpoint``): see
    :meth:`recompute`."""
    rematerialized_bytes: int = 0
    """What a recomputed block rebuilds for the one micro-batch it runs backward on (its
    activations): held during that backward only, on top of what the device keeps."""
    selective: Selective | None = None
    """How it recomputes selectively, where that keeps fewer bytes (``None``: not offered)."""
    selectively: bool = False
    """It recomputes selectively (:attr:`selective`; ``recomputed`` is then true too)."""
    graph_output_bytes: int = 0
    """Bytes of the model's outputs its nodes compute (the loss reads them)."""
    saved_values: tuple[str, ...] = ()
    """The values its nodes save for backward, by name (each once)."""
    backward_working_bytes: int = 0
    """The most gradient bytes one of its nodes' backward holds at once: the gradient of its
    output and those of its inputs (on top of what the stage keeps while its backward runs)."""
    param_grad_bytes: int = 0
    """The most parameter-gradient bytes one of its nodes' backward creates: a new tensor the size
    of its weights, held until autograd adds it into ``.grad`` (from a step's second micro-batch
    on, when ``.grad`` exists); the embedding's is table-sized. Not scaled by the batch."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise AutopartError(f"Block {self.index} has no nodes")
        for name in (
            "forward_s",
            "backward_s",
            "backward_weight_s",
            "flops",
            "param_bytes",
            "activation_bytes",
            "weight_grad_bytes",
            "input_bytes",
            "rematerialized_bytes",
            "graph_output_bytes",
            "backward_working_bytes",
            "param_grad_bytes",
        ):
            if not getattr(self, name) >= 0:
                raise AutopartError(f"Block {self.index}: {name} must be >= 0")
        check_fixed_s(f"Block {self.index}", self.fixed_forward_s, self.forward_s)
        check_fixed_s(f"Block {self.index}", self.fixed_backward_s, self.backward_s)

    @property
    def backward_input_s(self) -> float:
        """The part of ``backward_s`` that computes input gradients (``B``)."""
        return self.backward_s - self.backward_weight_s

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def can_recompute(self) -> bool:
        """Whether recomputing keeps fewer bytes than its activations (else it only costs time)."""
        return not self.recomputed and self.input_bytes < self.activation_bytes

    @property
    def can_recompute_selectively(self) -> bool:
        """Whether recomputing selectively (:attr:`selective`) keeps fewer bytes."""
        return not self.recomputed and self.selective is not None and self.selective.freed_bytes > 0

    @property
    def recompute_s(self) -> float:
        """The forward it runs again in its backward (0 unless recomputed)."""
        if not self.recomputed:
            return 0.0
        return self.selective.forward_s if self.selectively and self.selective else self.forward_s

    def recompute(self, *, selectively: bool = False) -> Block:
        """This block under recomputation, the one rule every memory and time view reads. In
        full it keeps only its inputs (``activation_bytes = input_bytes``), its backward runs its
        forward again first, and its activations are rebuilt (``rematerialized_bytes``) for the
        backward of one micro-batch; ``selectively`` (:attr:`selective`), it also keeps its
        weight matmuls' outputs and runs only its other ops again."""
        if self.recomputed:
            return self
        if not selectively:
            return dataclasses.replace(
                self,
                activation_bytes=self.input_bytes,
                backward_s=self.backward_s + self.forward_s,
                fixed_backward_s=self.fixed_backward_s + self.fixed_forward_s,
                recomputed=True,
                rematerialized_bytes=self.activation_bytes,
            )
        sel = self.selective
        if sel is None:
            raise AutopartError(f"block {self.name!r} has no selective recomputation to apply")
        return dataclasses.replace(
            self,
            activation_bytes=max(0, self.activation_bytes - sel.freed_bytes),
            backward_s=self.backward_s + sel.forward_s,
            fixed_backward_s=self.fixed_backward_s + sel.fixed_forward_s,
            recomputed=True,
            selectively=True,
            rematerialized_bytes=sel.freed_bytes,
        )


@dataclass(frozen=True, slots=True)
class CrossTensor:
    """A node's output read by later blocks (a graph output counts as read by the last block)."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    """Distinct reading blocks, ascending, all after ``producer``."""
    nbytes: int

    def __post_init__(self) -> None:
        if not self.consumers or any(c <= self.producer for c in self.consumers):
            raise AutopartError(
                f"tensor {self.name!r}: consumers {self.consumers} must be blocks after its producer {self.producer}"
            )
        if list(self.consumers) != sorted(set(self.consumers)) or self.nbytes < 0:
            raise AutopartError(
                f"tensor {self.name!r}: consumers must be distinct, ascending; nbytes >= 0"
            )


@dataclass(frozen=True, slots=True, eq=False)
class BlockGraph:
    """Blocks in topological order and the tensors between them (see :mod:`autopart.planning.graph`)."""

    blocks: tuple[Block, ...]
    tensors: tuple[CrossTensor, ...]
    param_bytes_by_name: Mapping[str, int]
    op_graph: Any = None
    """The :class:`~autopart.planning.graph.OpGraph` these blocks coarsen (for the lower bound);
    ``None`` if built by hand. Typed ``Any``: graph.py builds blocks, so this module cannot import
    it back without a cycle."""
    saved_across: tuple[CrossTensor, ...] = ()
    """Values saved for backward by more than one block: ``producer`` is the first block saving
    it (whose :attr:`Block.activation_bytes` counts it), ``consumers`` the others. A stage keeps
    each once, so a value counts again only on another stage (the normalised input that a
    layer's query, key and value projections all save, split over blocks, is one tensor)."""
    shared_params: Mapping[str, tuple[int, ...]] = field(init=False)
    """Parameters used by more than one block -> those blocks (e.g. tied embeddings)."""
    _graph: nx.DiGraph | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if any(b.index != i for i, b in enumerate(self.blocks)):
            raise AutopartError("BlockGraph.blocks must be listed by index 0, 1, 2, ...")
        users: dict[str, list[int]] = {}
        for b in self.blocks:
            for p in b.params:
                if p not in self.param_bytes_by_name:
                    raise AutopartError(f"block {b.index} uses parameter {p!r}, which has no size")
                users.setdefault(p, []).append(b.index)
        for t in self.tensors:
            if t.consumers[-1] >= n:
                raise AutopartError(
                    f"tensor {t.name!r} is read by block {t.consumers[-1]}; there are {n}"
                )
        object.__setattr__(
            self, "param_bytes_by_name", MappingProxyType(dict(self.param_bytes_by_name))
        )
        shared = {p: tuple(u) for p, u in users.items() if len(u) > 1}
        object.__setattr__(self, "shared_params", MappingProxyType(shared))

    @property
    def nx(self) -> nx.DiGraph:
        """Block indices; edge attribute ``nbytes`` sums the tensors from one block to the other.
        Built on first use (the planner scales and regroups block graphs hundreds of times and
        reads this from none of them)."""
        if self._graph is None:
            graph = nx.DiGraph()
            graph.add_nodes_from(range(len(self.blocks)))
            for t in self.tensors:
                for c in t.consumers:
                    had = (
                        graph.edges[t.producer, c]["nbytes"] if graph.has_edge(t.producer, c) else 0
                    )
                    graph.add_edge(t.producer, c, nbytes=had + t.nbytes)
            object.__setattr__(self, "_graph", graph)
        return self._graph

    def validate(self, stage_of: Sequence[int], num_stages: int) -> None:
        """Raise :class:`PartitionError` unless ``stage_of`` (one stage per block) is a pipeline:
        stages in range and all used, and no tensor flowing to an earlier stage."""
        if num_stages < 1:
            raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
        if len(stage_of) != len(self.blocks):
            raise PartitionError(
                f"stage_of has {len(stage_of)} entries but there are {len(self.blocks)} blocks; give one stage per block"
            )
        bad = [(b, s) for b, s in enumerate(stage_of) if not 0 <= s < num_stages]
        if bad:
            raise PartitionError(
                f"blocks {bad[:5]} (block, stage) have stages outside [0, {num_stages})"
            )
        empty = sorted(set(range(num_stages)) - set(stage_of))
        if empty:
            raise PartitionError(
                f"stages {empty} have no block; every stage needs work: use fewer stages or reassign blocks"
            )
        for t in self.tensors:
            back = [c for c in t.consumers if stage_of[c] < stage_of[t.producer]]
            if back:
                raise PartitionError(
                    f"tensor {t.name!r} flows from block {t.producer} (stage {stage_of[t.producer]}) back to "
                    f"block {back[0]} (stage {stage_of[back[0]]}); a reader must be on the same or a later stage"
                )

    def boundary_bytes(self, stage_of: Sequence[int], num_stages: int) -> list[int]:
        """Bytes crossing each boundary k (between stage k and k + 1): every tensor with
        producer stage <= k < last reader stage; a skip tensor is forwarded through, and counted at,
        every boundary it passes."""
        self.validate(stage_of, num_stages)
        out = [0] * max(0, num_stages - 1)
        for t in self.tensors:
            for k in range(stage_of[t.producer], max(stage_of[c] for c in t.consumers)):
                out[k] += t.nbytes
        return out

    def stage_activation_bytes(self, stage_of: Sequence[int], num_stages: int) -> list[int]:
        """Bytes each stage saves for backward per step (each value once per stage that saves
        it, :attr:`saved_across`; a recomputed block keeps what :meth:`Block.recompute` says)."""
        act = [0] * num_stages
        for b, s in zip(self.blocks, stage_of):
            act[s] += b.activation_bytes
        for t in self.saved_across:
            counted = set() if self.blocks[t.producer].recomputed else {stage_of[t.producer]}
            for c in t.consumers:
                if not self.blocks[c].recomputed and stage_of[c] not in counted:
                    counted.add(stage_of[c])
                    act[stage_of[c]] += t.nbytes
        return act

    def stage_params(self, stage_of: Sequence[int], num_stages: int) -> list[tuple[str, ...]]:
        """Distinct parameters each stage uses (a shared parameter appears on every stage using it)."""
        self.validate(stage_of, num_stages)
        names: list[dict[str, None]] = [{} for _ in range(num_stages)]
        for b, s in zip(self.blocks, stage_of):
            names[s].update(dict.fromkeys(b.params))
        return [tuple(d) for d in names]

    def stage_param_bytes(self, stage_of: Sequence[int], num_stages: int) -> list[int]:
        """Parameter bytes per stage; a shared parameter is counted once on each stage using it."""
        return [
            sum(self.param_bytes_by_name[p] for p in ps)
            for ps in self.stage_params(stage_of, num_stages)
        ]

    def cut_bytes(self) -> list[int]:
        """``cut_bytes()[c]``: bytes crossing a cut between blocks ``c - 1`` and ``c`` of a
        contiguous split (index 0 and ``len(blocks)`` are 0)."""
        last = [t.consumers[-1] for t in self.tensors]
        return crossing_bytes(
            [t.producer for t in self.tensors],
            last,
            [t.nbytes for t in self.tensors],
            len(self.blocks),
        )

    @property
    def total_compute_s(self) -> float:
        return sum(b.compute_s for b in self.blocks)

    @property
    def recomputed(self) -> tuple[int, ...]:
        """The blocks that recompute their forward in backward."""
        return tuple(b.index for b in self.blocks if b.recomputed)

    def with_recompute(self, blocks: Sequence[int], selectively: Sequence[int] = ()) -> BlockGraph:
        """These blocks, with ``blocks`` recomputed in full and ``selectively`` their selective
        recomputation (:meth:`Block.recompute`)."""
        full, some = set(blocks), set(selectively)
        if full & some:
            raise AutopartError(f"blocks {sorted(full & some)} cannot recompute both ways")
        out = tuple(
            b.recompute(selectively=b.index in some) if b.index in full | some else b
            for b in self.blocks
        )
        return dataclasses.replace(self, blocks=out)

    def by_layers(self) -> BlockGraph:
        """These blocks merged into recompute units: each repeated layer from its first block up
        to the next layer's (what follows a layer outside any layer, such as an MLP's
        activation function or a final norm, goes with it; what precedes the first layer is one
        unit). Merged, a layer is one block the stage ILP can recompute as a whole, as Megatron's
        full recompute does, and stages are cut only between layers."""
        groups: list[list[Block]] = []
        for b in self.blocks:
            starts = b.layer is not None and (not groups or groups[-1][-1].layer != b.layer)
            if starts or not groups:
                groups.append([b])
            else:
                groups[-1].append(b)
        return _merged(self, groups)

    def rematerialized_bytes(self, stage_of: Sequence[int], ranks: Sequence[int]) -> list[int]:
        """Per device, the most a recomputed block of its stages rebuilds at once (one block's
        backward runs at a time)."""
        most = [0] * (max(ranks) + 1)
        for b, s in zip(self.blocks, stage_of):
            most[ranks[s]] = max(most[ranks[s]], b.rematerialized_bytes)
        return most

    def scaled(self, factor: float) -> BlockGraph:
        """Per-sample costs (times, activations, tensor bytes) times ``factor``, e.g. ``1 /
        micro_batches``; parameters and the fixed part of each time unchanged
        (:func:`scaled_time_s`)."""
        blocks = tuple(_scale_block(b, factor) for b in self.blocks)
        tensors = tuple(
            dataclasses.replace(t, nbytes=round(t.nbytes * factor)) for t in self.tensors
        )
        og = self.op_graph.scaled(factor) if self.op_graph is not None else None
        saved = tuple(
            dataclasses.replace(t, nbytes=round(t.nbytes * factor)) for t in self.saved_across
        )
        return BlockGraph(blocks, tensors, self.param_bytes_by_name, og, saved)


def _merged(bg: BlockGraph, groups: Sequence[Sequence[Block]]) -> BlockGraph:
    """``bg`` with each of ``groups`` (consecutive blocks covering it) as one block; a value
    saved by several blocks stays counted by its first saver, and across groups where the savers
    fall in several."""
    group_of = {b.index: g for g, blocks in enumerate(groups) for b in blocks}
    users: dict[str, set[int]] = {}
    for g, blocks in enumerate(groups):
        for b in blocks:
            for q in b.params:
                users.setdefault(q, set()).add(g)
    tensors = []
    into: dict[int, int] = {}  # bytes each group reads from other groups
    for t in bg.tensors:
        src, readers = group_of[t.producer], sorted({group_of[c] for c in t.consumers})
        later = tuple(g for g in readers if g != src)
        if later:
            tensors.append(CrossTensor(t.name, src, later, t.nbytes))
            for g in later:
                into[g] = into.get(g, 0) + t.nbytes
    read_from = {b.index: 0 for b in bg.blocks}
    for t in bg.tensors:
        for c in t.consumers:
            read_from[c] += t.nbytes
    blocks = []
    for g, members in enumerate(groups):
        params = tuple(dict.fromkeys(q for b in members for q in b.params))
        # model inputs a block saves: its input bytes beyond the tensors other blocks send it
        saved_inputs = sum(max(0, b.input_bytes - read_from[b.index]) for b in members)
        blocks.append(
            Block(
                index=g,
                name=_unit_name(members),
                nodes=tuple(n for b in members for n in b.nodes),
                modules=tuple(dict.fromkeys(m for b in members for m in b.modules)),
                forward_s=sum(b.forward_s for b in members),
                backward_s=sum(b.backward_s for b in members),
                flops=sum(b.flops for b in members),
                backward_flops=sum(b.backward_flops for b in members),
                param_bytes=sum(bg.param_bytes_by_name[q] for q in params if len(users[q]) == 1),
                params=params,
                activation_bytes=sum(b.activation_bytes for b in members),
                layer=members[0].layer,
                backward_weight_s=sum(b.backward_weight_s for b in members),
                weight_grad_bytes=sum(b.weight_grad_bytes for b in members),
                fixed_forward_s=sum(b.fixed_forward_s for b in members),
                fixed_backward_s=sum(b.fixed_backward_s for b in members),
                input_bytes=into.get(g, 0) + saved_inputs,
                selective=Selective.merged([b.selective for b in members]),
                graph_output_bytes=sum(b.graph_output_bytes for b in members),
                saved_values=tuple(dict.fromkeys(v for b in members for v in b.saved_values)),
                backward_working_bytes=max(b.backward_working_bytes for b in members),
                param_grad_bytes=max(b.param_grad_bytes for b in members),
            )
        )
    saved = []
    for t in bg.saved_across:
        first, others = group_of[t.producer], sorted({group_of[c] for c in t.consumers})
        later = tuple(g for g in others if g != first)
        if later:
            saved.append(CrossTensor(t.name, first, later, t.nbytes))
    return BlockGraph(
        tuple(blocks), tuple(tensors), bg.param_bytes_by_name, bg.op_graph, tuple(saved)
    )


def _unit_name(members: Sequence[Block]) -> str:
    """The layers a merged block spans, e.g. ``model.layers.3`` or ``model.layers.3-4`` (blocks
    of a coarse graph may hold the end of one layer and the start of the next)."""
    first = members[0]
    if first.layer is None:
        return first.name
    prefix = first.layer.rpartition(".")[0] + "."
    heads = (m.removeprefix(prefix).split(".")[0] for b in members for m in b.modules)
    indices = [i for i in dict.fromkeys(heads) if i.isdigit()]
    return first.layer if len(indices) <= 1 else f"{prefix}{indices[0]}-{indices[-1]}"


def _scale_block(b: Block, factor: float) -> Block:
    backward_s = scaled_time_s(b.backward_s, b.fixed_backward_s, factor)
    return dataclasses.replace(
        b,
        forward_s=scaled_time_s(b.forward_s, b.fixed_forward_s, factor),
        backward_s=backward_s,
        backward_weight_s=scaled_weight_s(b.backward_weight_s, b.backward_s, backward_s),
        flops=round(b.flops * factor),
        backward_flops=round(b.backward_flops * factor),
        activation_bytes=round(b.activation_bytes * factor),
        weight_grad_bytes=round(b.weight_grad_bytes * factor),
        input_bytes=round(b.input_bytes * factor),
        rematerialized_bytes=round(b.rematerialized_bytes * factor),
        graph_output_bytes=round(b.graph_output_bytes * factor),
        backward_working_bytes=round(b.backward_working_bytes * factor),
        selective=b.selective.scaled(factor) if b.selective is not None else None,
    )
