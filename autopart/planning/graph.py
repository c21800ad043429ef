"""The solver's view of a traced model: a weighted DAG of computing nodes (:class:`OpGraph`) and its
coarsening into blocks (:class:`BlockGraph`) that the stage solvers assign to pipeline stages.

- Solver nodes are the fx nodes that compute (``call_function``, ``call_method``, ``call_module``).
  Placeholders are free (every stage can read the model's inputs); ``get_attr`` parameters are part
  of the cost of the nodes that use them; buffers are read where they are needed.
- A tensor read by the graph's ``output`` is treated as consumed by the last node in topological
  order: a pipeline returns its outputs from the last stage, so such a tensor travels there.
- Blocks are contiguous intervals of the fx topological order, so each block is convex and any
  assignment of blocks to stages that never decreases along a tensor is a valid pipeline.
- Nodes that touch a tensor written in place (:func:`autopart.passes.mutations.mutation_groups`)
  must share a stage: every node from the first to the last of such a group is marked
  ``keep_with_previous`` but the first, and :func:`coarsen` never cuts before a marked node. So
  are the nodes of a mixture-of-experts layer (:func:`autopart.passes.routing.moe_layers`).
- Repeated layers are module paths ``<prefix>.<int>`` whose siblings (at least two) share the
  prefix and the module type, e.g. ``transformer.h.3`` or ``model.layers.3``; the outermost one
  containing a node is that node's layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.compute import ComputeModel
from autopart.cost_models.devices import DeviceSpec
from autopart.cost_models.memory import param_table
from autopart.errors import AutopartError
from autopart.passes.annotate import node_cost
from autopart.passes.mutations import mutation_groups
from autopart.passes.routing import moe_layers
from autopart.planning.blocks import (
    Block,
    BlockGraph,
    CrossTensor,
    PartitionError,
    check_fixed_s,
    scaled_time_s,
    scaled_weight_s,
)
from autopart.planning.cuts import best_split_cuts, choose_cuts, crossing_bytes, merge_cuts

__all__ = [
    "Block",
    "BlockGraph",
    "CrossTensor",
    "OpGraph",
    "OpNode",
    "PartitionError",
    "coarsen",
    "detect_layers",
    "group_blocks",
    "node_layers",
]

_NON_SOLVER_OPS = ("placeholder", "get_attr", "output")
_LAYER_PATH = re.compile(r"^(.*)\.(\d+)$")


@dataclass(frozen=True, slots=True)
class OpNode:
    """One computing fx node, as the solver sees it (times for one step with the example inputs)."""

    name: str
    forward_s: float
    backward_s: float
    flops: int
    """Forward FLOPs."""
    output_bytes: int
    """Bytes of the node's output: what a stage boundary after it would carry."""
    inputs: tuple[str, ...] = ()
    """Computing nodes whose outputs this node reads (inputs and parameters are not listed)."""
    params: tuple[str, ...] = ()
    backward_flops: int = 0
    saved_from: tuple[str, ...] = ()
    """Values (nodes or inputs) whose outputs this node's backward keeps alive."""
    private_saved_bytes: int = 0
    module: str = ""
    module_type: str = ""
    layer: str | None = None
    """The repeated layer (e.g. ``"transformer.h.3"``) this node belongs to, if any."""
    is_output: bool = False
    """Whether the graph's output reads this node's value."""
    backward_weight_s: float = 0.0
    """The part of ``backward_s`` that computes parameter gradients (``W`` in a zero-bubble
    schedule); the rest, :attr:`backward_input_s`, computes input gradients (``B``)."""
    keep_with_previous: bool = False
    """No stage boundary may fall right before this node: it lies inside a run of nodes that
    touch one tensor written in place, which must run on one stage (see the module docstring)."""
    fixed_forward_s: float = 0.0
    """The part of ``forward_s`` paid by every micro-batch whatever its size (kernel launch,
    weight reads: :func:`~autopart.cost_models.compute.fixed_time_s`); :meth:`OpGraph.scaled`
    keeps it and scales the rest."""
    fixed_backward_s: float = 0.0
    """The same for ``backward_s`` (launch, weight gradient and its accumulation)."""
    kept_selectively: bool = False
    """Selective recomputation keeps its output (a weight matmul or fused attention, the ops of
    :data:`~autopart.codegen.templates.checkpointing.SAVED_OPS`): :mod:`autopart.planning.selective`."""
    measured_working_bytes: int | None = None
    """What its backward holds at once, as profiling measured it (``None``: modelled,
    :meth:`OpGraph.backward_working_bytes`)."""
    loss_forward_s: float = 0.0
    """The part of ``forward_s`` that is the loss on its output (:mod:`autopart.planning.loss`),
    which a tensor-parallel share of the node keeps whole (the loss runs on whole outputs)."""
    loss_backward_s: float = 0.0
    """The same for ``backward_s``."""

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s", "flops", "output_bytes", "backward_flops"):
            if not getattr(self, name) >= 0 or self.private_saved_bytes < 0:
                raise AutopartError(
                    f"OpNode {self.name!r}: {name} and private_saved_bytes must be >= 0, got "
                    f"{getattr(self, name)!r} and {self.private_saved_bytes!r}"
                )
        if not 0 <= self.backward_weight_s <= self.backward_s * (1 + 1e-9):
            raise AutopartError(
                f"OpNode {self.name!r}: backward_weight_s ({self.backward_weight_s!r}) must lie in "
                f"[0, backward_s = {self.backward_s!r}]: it is the weight-gradient part of it"
            )
        check_fixed_s(f"OpNode {self.name!r}", self.fixed_forward_s, self.forward_s)
        check_fixed_s(f"OpNode {self.name!r}", self.fixed_backward_s, self.backward_s)

    @property
    def backward_input_s(self) -> float:
        """The part of ``backward_s`` that computes input gradients."""
        return self.backward_s - self.backward_weight_s

    @property
    def compute_s(self) -> float:
        """Forward plus backward seconds."""
        return self.forward_s + self.backward_s


@dataclass(frozen=True, slots=True, eq=False)
class OpGraph:
    """Computing nodes in fx topological order, with data-dependency edges (``nx``: a
    ``networkx.DiGraph`` over node names; node attributes are :class:`OpNode` fields, edge attribute
    ``nbytes`` is the producer's ``output_bytes``)."""

    nodes: Mapping[str, OpNode]
    """By name, in fx topological order."""
    param_bytes_by_name: Mapping[str, int]
    value_bytes: Mapping[str, int] = field(default_factory=dict)
    """Output bytes of non-computing values that nodes save for backward (model inputs)."""
    device: DeviceSpec | None = None
    """The device the times are for (``None`` for a hand-built graph)."""
    order: tuple[str, ...] = field(init=False)
    nx: nx.DiGraph = field(init=False, repr=False)

    def __post_init__(self) -> None:
        nodes = MappingProxyType(dict(self.nodes))
        params = MappingProxyType(dict(self.param_bytes_by_name))
        values = MappingProxyType(dict(self.value_bytes))
        graph = nx.DiGraph()
        for name, node in nodes.items():
            if name != node.name:
                raise AutopartError(f"OpGraph.nodes maps {name!r} to a node named {node.name!r}")
            for src in node.inputs:
                if src not in graph:
                    raise AutopartError(
                        f"node {name!r} reads {src!r}, which is not an earlier computing node; "
                        "list nodes in topological order and inputs by node name"
                    )
            for p in node.params:
                if p not in params:
                    raise AutopartError(f"node {name!r} uses parameter {p!r}, which has no size")
            for src in node.saved_from:
                if src not in nodes and src not in values:
                    raise AutopartError(f"node {name!r} saves {src!r}, whose size is unknown")
            graph.add_node(
                name, **{f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
            )
            for src in node.inputs:
                graph.add_edge(src, name, nbytes=nodes[src].output_bytes)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "param_bytes_by_name", params)
        object.__setattr__(self, "value_bytes", values)
        object.__setattr__(self, "order", tuple(nodes))
        object.__setattr__(self, "nx", graph)

    @classmethod
    def from_graph_module(
        cls, gm: GraphModule, device: DeviceSpec, *, compute: ComputeModel | None = None
    ) -> OpGraph:
        """The solver's view of an annotated graph (``autopart.annotate``), timed on ``device``
        (or by ``compute``, whose measurements win over the roofline)."""
        if compute is None:
            compute = ComputeModel(device)
        elif compute.device.name != device.name:
            raise AutopartError(
                f"the compute model times {compute.device.name!r} but the graph is for "
                f"{device.name!r}; build ComputeModel({device.name!r} spec) or pass that device"
            )
        table = {name: nbytes for name, (_, nbytes, _) in param_table(gm).items()}
        layer_of = _node_layers(gm)
        solver = [n for n in gm.graph.nodes if n.op not in _NON_SOLVER_OPS]
        kept = _kept_with_previous(gm, [n.name for n in solver])
        outputs = {a.name for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}
        nodes: dict[str, OpNode] = {}
        values: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                values[n.name] = node_cost(n).output_bytes
        for n in solver:
            cost = node_cost(n)
            nodes[n.name] = OpNode(
                name=n.name,
                forward_s=compute.forward_s(n.name, cost),
                backward_s=compute.backward_s(n.name, cost),
                flops=cost.flops,
                output_bytes=cost.output_bytes,
                inputs=tuple(
                    dict.fromkeys(a.name for a in n.all_input_nodes if a.op not in _NON_SOLVER_OPS)
                ),
                params=cost.params,
                backward_flops=cost.backward_flops,
                saved_from=cost.saved_from,
                private_saved_bytes=cost.private_saved_bytes,
                module=cost.module,
                module_type=cost.module_type,
                layer=layer_of.get(n.name),
                is_output=n.name in outputs,
                backward_weight_s=compute.backward_weight_s(n.name, cost),
                keep_with_previous=n.name in kept,
                fixed_forward_s=compute.fixed_s(n.name, cost),
                fixed_backward_s=compute.fixed_s(n.name, cost, backward=True),
                kept_selectively=_kept_selectively(n, cost.params),
                measured_working_bytes=compute.backward_working_bytes(n.name),
            )
        return cls(
            nodes, table, {k: v for k, v in values.items() if k not in table}, compute.device
        )

    def backward_working_bytes(self, n: OpNode) -> int:
        """What node ``n``'s backward holds at once: as profiling measured it, else its output's
        gradient and its inputs' (a kernel's own temporaries are not modelled)."""
        if n.measured_working_bytes is not None:
            return n.measured_working_bytes
        return n.output_bytes + sum(self.nodes[src].output_bytes for src in n.inputs)

    def value_bytes_of(self, name: str) -> int:
        """Output bytes of any value a node may save: a computing node or a model input."""
        node = self.nodes.get(name)
        return node.output_bytes if node is not None else self.value_bytes[name]

    def consumers(self) -> dict[str, list[str]]:
        """Readers of each node's output, in order; the last node reads every graph output."""
        readers: dict[str, list[str]] = {name: [] for name in self.order}
        for node in self.nodes.values():
            for src in node.inputs:
                readers[src].append(node.name)
        last = self.order[-1] if self.order else ""
        for node in self.nodes.values():
            if node.is_output and node.name != last and last not in readers[node.name]:
                readers[node.name].append(last)
        return readers

    def with_added_time(self, extra: Mapping[str, tuple[float, float]]) -> OpGraph:
        """This graph with ``extra[name]`` (forward, backward seconds) added to those nodes' times,
        per sample (the loss the runtime runs on the graph's outputs:
        :mod:`autopart.planning.loss`)."""
        nodes = dict(self.nodes)
        for name, (forward_s, backward_s) in extra.items():
            n = nodes[name]
            nodes[name] = dataclasses.replace(
                n,
                forward_s=n.forward_s + forward_s,
                backward_s=n.backward_s + backward_s,
                loss_forward_s=n.loss_forward_s + forward_s,
                loss_backward_s=n.loss_backward_s + backward_s,
            )
        return OpGraph(nodes, self.param_bytes_by_name, self.value_bytes, self.device)

    def scaled(self, factor: float) -> OpGraph:
        """Per-sample costs times ``factor`` (e.g. ``1 / micro_batches``); parameters and the
        fixed part of each time unchanged (:func:`scaled_time_s`)."""
        nodes = {name: _scale_node(n, factor) for name, n in self.nodes.items()}
        values = {k: round(v * factor) for k, v in self.value_bytes.items()}
        return OpGraph(nodes, self.param_bytes_by_name, values, self.device)


_WEIGHT_MATMULS = frozenset(
    {"linear", "mm", "addmm", "matmul", "conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
)
_FUSED_ATTENTION = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)


def _kept_selectively(node: Node, params: Sequence[str]) -> bool:
    """Whether the selective checkpointing policy keeps ``node``'s output: a matmul or
    convolution with a weight (it runs as ``mm``/``addmm``/``convolution``; a matmul of two
    activations runs as a batched matmul, which is recomputed) or fused attention."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::", 1)[-1]
    return name in _FUSED_ATTENTION or (name in _WEIGHT_MATMULS and bool(params))


def _kept_with_previous(gm: GraphModule, order: Sequence[str]) -> set[str]:
    """Nodes inside (not first in) the run of ``order`` spanned by a mutation group or an MoE
    layer."""
    pos = {name: i for i, name in enumerate(order)}
    kept: set[str] = set()
    for group in [*mutation_groups(gm), *moe_layers(gm)]:
        span = [pos[n.name] for n in group if n.name in pos]
        kept.update(order[min(span) + 1 : max(span) + 1])
    return kept


def detect_layers(module_types: Mapping[str, str]) -> set[str]:
    """Repeated layers among module paths (``{path: type name}``, ``""`` for an unknown type):
    paths ``<prefix>.<int>`` with at least two such siblings, all of one type."""
    groups: dict[str, list[str]] = {}
    for path in module_types:
        match = _LAYER_PATH.match(path)
        if match:
            groups.setdefault(match.group(1), []).append(path)
    layers: set[str] = set()
    for members in groups.values():
        types = {module_types[m] for m in members} - {""}
        if len(members) >= 2 and len(types) <= 1:
            layers.update(members)
    return layers


def _layer_of_module(path: str, layers: set[str] | frozenset[str]) -> str | None:
    """The outermost repeated layer containing module ``path``."""
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def node_layers(nodes: Iterable[Node], layers: Collection[str] | None = None) -> dict[Node, str]:
    """The repeated layer (``model.layers.3``) that created each of ``nodes`` inside it (by its
    ``autopart_module``), among ``layers``: by default the modules that repeat among ``nodes``
    (a stage with one layer of a list shows none repeating: pass the whole graph's)."""
    nodes = list(nodes)
    if layers is not None:
        found = frozenset(layers)
        return {
            n: layer
            for n in nodes
            if (ref := n.meta.get("autopart_module")) is not None
            and (layer := _layer_of_module(ref.path, found)) is not None
        }
    module_types: dict[str, str] = {}
    for n in nodes:
        for path, type_name in (n.meta.get("nn_module_stack") or {}).values():
            name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
            module_types.setdefault(str(path), name.rsplit(".", 1)[-1])
        ref = n.meta.get("autopart_module")
        if ref is not None:
            module_types.setdefault(ref.path, ref.type_name)
    for path in list(module_types):  # ancestors a stack may skip
        parts = path.split(".")
        for i in range(1, len(parts)):
            module_types.setdefault(".".join(parts[:i]), "")
    layers = detect_layers(module_types)
    out: dict[Node, str] = {}
    for n in nodes:
        ref = n.meta.get("autopart_module")
        layer = _layer_of_module(ref.path, layers) if ref is not None else None
        if layer is not None:
            out[n] = layer
    return out


def _node_layers(gm: GraphModule) -> dict[str, str]:
    return {n.name: layer for n, layer in node_layers(gm.graph.nodes).items()}


def _scale_node(n: OpNode, factor: float) -> OpNode:
    backward_s = scaled_time_s(n.backward_s, n.fixed_backward_s, factor)
    return dataclasses.replace(
        n,
        forward_s=scaled_time_s(n.forward_s, n.fixed_forward_s, factor),
        backward_s=backward_s,
        backward_weight_s=scaled_weight_s(n.backward_weight_s, n.backward_s, backward_s),
        flops=round(n.flops * factor),
        backward_flops=round(n.backward_flops * factor),
        output_bytes=round(n.output_bytes * factor),
        private_saved_bytes=round(n.private_saved_bytes * factor),
        measured_working_bytes=None
        if n.measured_working_bytes is None
        else round(n.measured_working_bytes * factor),
        loss_forward_s=n.loss_forward_s * factor,
        loss_backward_s=n.loss_backward_s * factor,
    )


def coarsen(op_graph: OpGraph, *, max_blocks: int, num_stages: int | None = None) -> BlockGraph:
    """Group the nodes into at most ``max_blocks`` contiguous runs of the topological order.

    Cuts keep each block's compute below a target (the smallest one that needs no more than
    ``max_blocks`` blocks), and among the positions that do, prefer the one with the fewest bytes
    crossing it, then layer and sub-module boundaries; blocks left over split the heaviest blocks.
    Every block holds some compute, so a view or ``getitem`` is never a block of its own.

    With ``num_stages``, the cuts of the best contiguous split of the *nodes* into that many stages
    (the objective of :mod:`autopart.solver.cost`, by a chain DP) are kept as block boundaries too,
    so the block-level chain DP matches the node-level one: coarsening then costs nothing where
    memory does not bind.
    """
    if max_blocks < 1:
        raise PartitionError(f"max_blocks must be >= 1, got {max_blocks}")
    order = op_graph.order
    if not order:
        raise PartitionError("the graph has no computing nodes, so there is nothing to partition")
    pos = {name: i for i, name in enumerate(order)}
    readers = op_graph.consumers()
    last = [max((pos[c] for c in readers[name]), default=i) for i, name in enumerate(order)]
    nbytes = [op_graph.nodes[name].output_bytes for name in order]
    crossing = crossing_bytes(list(range(len(order))), last, nbytes, len(order))
    weights = [op_graph.nodes[name].compute_s for name in order]
    kept = {k for k, name in enumerate(order) if op_graph.nodes[name].keep_with_previous}
    forced: list[int] = []
    if num_stages is not None and num_stages > 1:
        if num_stages > max_blocks:
            raise PartitionError(
                f"{num_stages} stages need at least as many blocks; raise max_blocks to {num_stages} or more"
            )
        if num_stages > len(order):
            raise PartitionError(
                f"the graph has {len(order)} computing nodes, too few for {num_stages} stages; "
                "use fewer stages"
            )
        device = op_graph.device
        comm_s = [p2p_time_s(x, device) if device else 0.0 for x in crossing]
        forced = best_split_cuts(
            weights, [math.inf if k in kept else c for k, c in enumerate(comm_s)], num_stages
        )
    cuts = choose_cuts(weights, crossing, _boundary_rank(op_graph), max_blocks - len(forced))
    merged = [k for k in merge_cuts(weights, cuts, forced) if k not in kept]
    bounds = [0, *merged, len(order)]
    return group_blocks(op_graph, [order[a:b] for a, b in itertools.pairwise(bounds)])


def _boundary_rank(og: OpGraph) -> list[int]:
    """How good a cut before each position is, by module structure: 2 between layers (or a
    layer and the rest), 1 between sub-modules (attention vs MLP), else 0."""
    nodes = [og.nodes[name] for name in og.order]
    rank = [0] * (len(nodes) + 1)
    for k in range(1, len(nodes)):
        a, b = nodes[k - 1], nodes[k]
        if a.layer != b.layer:
            rank[k] = 2
        elif _sub_module(a) != _sub_module(b):
            rank[k] = 1
    return rank


def _sub_module(n: OpNode) -> str:
    rest = n.module[len(n.layer) + 1 :] if n.layer else n.module
    return rest.split(".", 1)[0]


def group_blocks(og: OpGraph, groups: Sequence[Sequence[str]]) -> BlockGraph:
    """The block graph whose blocks are ``groups``: consecutive runs of ``og.order`` covering it
    (``[[name] for name in og.order]`` gives one block per node)."""
    if [name for g in groups for name in g] != list(og.order) or not all(groups):
        raise PartitionError(
            "groups must be non-empty consecutive runs of the topological order that cover every "
            "node once; split op_graph.order into slices"
        )
    readers = og.consumers()
    block_of = {name: i for i, g in enumerate(groups) for name in g}
    users: dict[str, set[int]] = {}
    for i, g in enumerate(groups):
        for name in g:
            for p in og.nodes[name].params:
                users.setdefault(p, set()).add(i)
    savers: dict[str, list[int]] = {}  # blocks saving each value, ascending
    for i, g in enumerate(groups):
        for name in g:
            for value in og.nodes[name].saved_from:
                found = savers.setdefault(value, [])
                if not found or found[-1] != i:
                    found.append(i)
    owner = {value: found[0] for value, found in savers.items()}
    blocks = tuple(_make_block(og, i, g, users, owner) for i, g in enumerate(groups))
    tensors = []
    for name in og.order:
        b = block_of[name]
        later = sorted({block_of[c] for c in readers[name]} - {b})
        if later:
            tensors.append(CrossTensor(name, b, tuple(later), og.nodes[name].output_bytes))
    saved_across = tuple(
        CrossTensor(value, found[0], tuple(found[1:]), og.value_bytes_of(value))
        for value, found in savers.items()
        if len(found) > 1
    )
    return BlockGraph(blocks, tuple(tensors), og.param_bytes_by_name, og, saved_across)


def _make_block(
    og: OpGraph,
    index: int,
    names: Sequence[str],
    users: Mapping[str, set[int]],
    owner: Mapping[str, int],
) -> Block:
    """The block of ``names``; it counts the saved values it is the first block to save
    (``owner``), the others once per further stage (:meth:`BlockGraph.stage_activation_bytes`)."""
    nodes = [og.nodes[n] for n in names]
    params = tuple(dict.fromkeys(p for n in nodes for p in n.params))
    saved = dict.fromkeys(s for n in nodes for s in n.saved_from)
    by_layer: dict[str, float] = {}
    for n in nodes:
        if n.layer is not None:
            by_layer[n.layer] = by_layer.get(n.layer, 0.0) + n.compute_s
    layer = max(by_layer, key=lambda k: by_layer[k]) if by_layer else None
    inside = set(names)
    read = dict.fromkeys(src for n in nodes for src in n.inputs if src not in inside)
    return Block(
        index=index,
        name=_block_name(nodes),
        nodes=tuple(names),
        modules=tuple(dict.fromkeys(n.module for n in nodes)),
        forward_s=sum(n.forward_s for n in nodes),
        backward_s=sum(n.backward_s for n in nodes),
        flops=sum(n.flops for n in nodes),
        backward_flops=sum(n.backward_flops for n in nodes),
        param_bytes=sum(og.param_bytes_by_name[p] for p in params if len(users[p]) == 1),
        params=params,
        activation_bytes=sum(og.value_bytes_of(s) for s in saved if owner[s] == index)
        + sum(n.private_saved_bytes for n in nodes),
        layer=layer,
        backward_weight_s=sum(n.backward_weight_s for n in nodes),
        weight_grad_bytes=sum(n.output_bytes for n in nodes if n.backward_weight_s > 0),
        fixed_forward_s=sum(n.fixed_forward_s for n in nodes),
        fixed_backward_s=sum(n.fixed_backward_s for n in nodes),
        input_bytes=sum(og.nodes[src].output_bytes for src in read)
        + sum(og.value_bytes[s] for s in saved if s in og.value_bytes),
        graph_output_bytes=sum(n.output_bytes for n in nodes if n.is_output),
        saved_values=tuple(saved),
        backward_working_bytes=max(
            (og.backward_working_bytes(n) for n in nodes if n.backward_s > 0), default=0
        ),
        param_grad_bytes=max(
            (sum(og.param_bytes_by_name[q] for q in n.params) for n in nodes if n.backward_s > 0),
            default=0,
        ),
    )


def _block_name(nodes: Sequence[OpNode]) -> str:
    labels = [n.module or n.name for n in nodes]
    split = [label.split(".") for label in labels]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if common and len({n.layer for n in nodes}) == 1:
        return ".".join(common)
    return labels[0] if labels[0] == labels[-1] else f"{labels[0]}..{labels[-1]}"
