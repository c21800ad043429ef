"""Tensor-parallel code generation: one pipeline stage rewritten for one rank of the ``tp`` group.

:func:`shard_tp` takes a stage from :func:`~autopart.passes.split_stages.split_stages` and the plan's
:class:`~autopart.planning.plans.TPSection` and returns the stage as TP rank ``rank`` runs it:

- every parameter or buffer the plan stores split (``placements[get_attr node]`` is ``S(k)`` or
  ``S(k,groups=g)``) is replaced by this rank's shard, a new ``nn.Parameter`` registered under the
  model's own name; replicated ones are kept as they are;
- shape arguments are rewritten to local sizes (:func:`~autopart.passes.tp.local.local_call`, the
  call each rank makes for a node): ``view`` / ``reshape`` / ``expand`` / ``unflatten``
  to the local shape of their output, ``split`` sizes and ``narrow`` lengths along a split dimension
  divided by the degree, ``repeat_interleave``'s ``output_size`` likewise;
- a vocabulary-parallel embedding (weight ``S(0)``) becomes a masked lookup of this rank's range of
  token ids, and a row-parallel ``linear`` / ``addmm`` adds its (replicated) bias on rank 0 only;
- wherever a node reads an input in another placement than the input has
  (``input_placements[node][input] != placements[input]``) a collective (or a local slice) is
  inserted; one per (input, placement read, gradient kind), shared by all readers.

Collectives are small ``torch.autograd.Function``s over torch's functional collectives
(``torch.ops._c10d_functional``) on the ``tp`` process group, with Megatron-LM's autograd semantics:
one logical loss, every replicated (``R``) value carries the full gradient on every rank, a split
value its own slice of it, and a partial (``P``) value the full gradient of the sum:

==========  ==========  ============================  ==============================================
from        read as     forward                       backward
==========  ==========  ============================  ==============================================
``P``       ``R``       all-reduce (Megatron's ``g``)  identity (all-reduce if the reader's gradient
                                                       is partial)
``S(k)``    ``R``       all-gather along ``k``        local slice (reduce-scatter if the reader's
                                                       gradient is partial)
``R``       ``S(k)``    local slice                   all-gather
``P``       ``S(k)``    reduce-scatter                all-gather
``S(a)``    ``S(b)``    all-gather, local slice       all-gather, local slice
``R``       ``R``       identity (Megatron's ``f``)    all-reduce, when the reader's gradient is
                                                       partial
==========  ==========  ============================  ==============================================

A reader's gradient for an input it reads replicated is partial exactly when the reader's own output
is not replicated (a column-parallel linear reading ``R``, a norm weight broadcast over a split
activation, a factor multiplying a partial sum): each rank's local backward then holds one term of
the sum. The one exception is the bias of a row-parallel linear, whose helper
(:func:`tp_partial_bias`) returns the full bias gradient on every rank.

Stage boundaries keep the plan's placements: a value crossing to the next stage is sent as this
rank's local tensor (a shard, a partial sum or the whole), so boundary tensors have local shapes
(:func:`~autopart.passes.tp.local.local_shape`), and the next stage's readers convert it as any other input. Only the last
stage's outputs are made replicated, so the model's output is whole on every rank.

``node.meta["val"]`` keeps the unsharded (global) value; ``node.meta["autopart_tp"]`` is the
node's placement (its local shape is ``local_shape(val.shape, placement, degree)``), and the
stage's ``meta["autopart_tp"]`` a :class:`TPStageInfo`. The collectives' call targets are the
``tp_*`` functions of :mod:`autopart.codegen.templates.collectives` (re-exported here), with the
group given by name, so the rewritten stage prints as ordinary Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from autopart.codegen.templates.collectives import (
    tp_all_gather,
    tp_all_reduce,
    tp_copy,
    tp_partial_bias,
    tp_reduce_scatter,
    tp_slice,
    tp_vocab_embedding,
)
from autopart.errors import ShardError
from autopart.passes.tp.local import bias_of_row_linear, local_call, shard_tensor
from autopart.passes.tp.placements import P, Placement, R, dual
from autopart.planning.plans import TPSection

__all__ = [
    "TP_META_KEY",
    "TPStageInfo",
    "grad_placement",
    "param_placements",
    "shard_tp",
    "tp_all_gather",
    "tp_all_reduce",
    "tp_copy",
    "tp_partial_bias",
    "tp_reduce_scatter",
    "tp_slice",
    "tp_vocab_embedding",
]

TP_META_KEY = "autopart_tp"


@dataclass(frozen=True, slots=True)
class TPStageInfo:
    """What :func:`shard_tp` made of a stage; stored in ``stage.meta["autopart_tp"]``."""

    rank: int
    degree: int
    group_name: str
    param_placements: Mapping[str, str]
    """Every parameter and buffer of the stage, by the model's name -> how it is stored here
    (``"R"``: whole; ``"S(k)"`` / ``"S(k,groups=g)"``: this rank's shard)."""


# ---------------------------------------------------------------------------------------------
# the pass


def param_placements(stages: Sequence[GraphModule], tp: TPSection) -> dict[str, Placement]:
    """How every parameter and buffer read by ``stages`` is stored, by its name: the placement its
    ``get_attr`` nodes have in the plan, or ``R`` where two of them disagree (a tied weight read in
    two layouts; each reader then slices its own). Give the same mapping to every stage's
    :func:`shard_tp` so that a tied weight's copies on different stages are the same shard."""
    seen: dict[str, set[Placement]] = {}
    for stage in stages:
        for node in stage.graph.nodes:
            if node.op == "get_attr":
                seen.setdefault(str(node.target), set()).add(_placement(tp, node))
    return {name: next(iter(ps)) if len(ps) == 1 else R for name, ps in seen.items()}


def shard_tp(
    stage: GraphModule,
    tp: TPSection,
    rank: int,
    group_or_mesh: Any,
    *,
    storage: Mapping[str, Placement] | None = None,
) -> GraphModule:
    """Stage ``stage`` as rank ``rank`` of a ``tp.degree``-way TP group runs it (module docstring).

    ``group_or_mesh`` is the ``tp`` process group, a DeviceMesh (its ``"tp"`` dimension, or the
    mesh itself when one-dimensional) or a process group's name; ``storage`` is
    :func:`param_placements` of all stages (default: of this stage). Returns a new GraphModule;
    ``stage`` is left as it is.
    """
    degree = tp.degree
    if not 0 <= rank < degree:
        raise ShardError(f"TP rank {rank} is outside a group of {degree} ranks.")
    group_name = _group_name(group_or_mesh)
    storage = dict(storage) if storage is not None else param_placements([stage], tp)
    is_last = _is_last(stage)
    graph = Graph()
    graph._codegen = stage.graph._codegen  # a traced model's pytree inputs and outputs
    rewriter = _Rewriter(stage, tp, rank, group_name, storage, graph)
    for node in stage.graph.nodes:
        rewriter.copy(node, is_last)
    graph.lint()
    root = _sharded_root(stage, graph, storage, rank, degree)
    module = GraphModule(root, graph, class_name=type(stage).__name__)
    module.meta.update(stage.meta)
    module.meta[TP_META_KEY] = TPStageInfo(
        rank=rank,
        degree=degree,
        group_name=group_name,
        param_placements={
            name: str(storage.get(name, R))
            for name, _ in [*module.named_parameters(), *module.named_buffers()]
        },
    )
    module.graph.lint()
    module.recompile()
    return module


def grad_placement(node: Node, u: Node, read_as: Placement, out_p: Placement) -> Placement:
    """The placement of the gradient that ``node``'s backward gives its input ``u``, read as
    ``read_as`` by a node whose output is placed ``out_p`` (module docstring): the dual of the
    placement read, but partial for an input read ``R`` by a node whose output is not ``R``, except
    the bias of a row-parallel linear."""
    if read_as != R or out_p == R:
        return dual(read_as)
    if out_p.kind == "P" and bias_of_row_linear(node) is u:
        return R  # tp_partial_bias gives the whole gradient on every rank
    return P


def _group_name(group_or_mesh: Any) -> str:
    if isinstance(group_or_mesh, str):
        return group_or_mesh
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group_or_mesh, DeviceMesh):
        names = group_or_mesh.mesh_dim_names or ()
        mesh = group_or_mesh["tp"] if "tp" in names and len(names) > 1 else group_or_mesh
        return str(mesh.get_group().group_name)
    return str(group_or_mesh.group_name)


def _is_last(stage: GraphModule) -> bool:
    from autopart.passes.split_stages import STAGE_META_KEY

    info = stage.meta.get(STAGE_META_KEY)
    return info is None or bool(info.is_last)


def _placement(tp: TPSection, node: Node) -> Placement:
    text = tp.placements.get(node.name)
    if text is None:
        raise ShardError(
            f"the TP plan has no placement for node {node.name!r}: it was made for another graph. "
            "Plan this graph again (autopart.planning.planner.plan_graph with a tp mesh) and shard with that."
        )
    return Placement.parse(text)


class _Rewriter:
    """Copies one stage's nodes into ``graph`` with local shapes and the collectives they need."""

    def __init__(
        self,
        stage: GraphModule,
        tp: TPSection,
        rank: int,
        group_name: str,
        storage: Mapping[str, Placement],
        graph: Graph,
    ) -> None:
        self.stage, self.tp, self.rank, self.group = stage, tp, rank, group_name
        self.degree = tp.degree
        self.storage = storage
        self.graph = graph
        self.env: dict[Node, Node] = {}
        self.placed: dict[Node, Placement] = {}
        """The placement each copied node's value really has here."""
        self.converted: dict[tuple[Node, Placement, Placement], Node] = {}

    # -- nodes -----------------------------------------------------------------------------------

    def copy(self, node: Node, is_last: bool) -> None:
        if node.op == "output":
            self._output(node, is_last)
            return
        if node.op == "placeholder":
            new = self.graph.node_copy(node)
            self.placed[node] = _placement(self.tp, node)
        elif node.op == "get_attr":
            new = self.graph.node_copy(node)
            self.placed[node] = self.storage.get(str(node.target), _placement(self.tp, node))
        else:
            self.placed[node] = _placement(self.tp, node)
            new = self._compute(node)
        new.meta = dict(node.meta)
        new.meta[TP_META_KEY] = str(self.placed[node])
        self.env[node] = new

    def _output(self, node: Node, is_last: bool) -> None:
        def read(u: Node) -> Node:
            # the model's outputs are whole on every rank; other stages send what they hold
            return self._read(u, node, R, R) if is_last else self.env[u]

        self.graph.output(map_arg(node.args[0], read))

    def _compute(self, node: Node) -> Node:
        wanted = self.tp.input_placements.get(node.name, {})
        out_p = self.placed[node]

        def read(u: Node) -> Node:
            text = wanted.get(u.name)
            if text is None:
                raise ShardError(
                    f"the TP plan does not say how node {node.name!r} reads {u.name!r}: it was "
                    "made for another graph; plan this graph again."
                )
            dst = Placement.parse(text)
            return self._read(u, node, dst, grad_placement(node, u, dst, out_p))

        args = map_arg(node.args, read)
        kwargs = dict(map_arg(node.kwargs, read))
        return self._emit(node, args, kwargs, out_p)

    # -- conversions -----------------------------------------------------------------------------

    def _read(self, u: Node, reader: Node, dst: Placement, grad: Placement) -> Node:
        src = self.placed[u]
        value = self.env[u]
        if src == dst and not (dst == R and grad == P and _is_float(u)):
            return value
        key = (u, dst, grad)
        if key not in self.converted:
            self.converted[key] = self._convert(value, src, dst, grad, u, reader)
        return self.converted[key]

    def _convert(
        self, value: Node, src: Placement, dst: Placement, grad: Placement, u: Node, reader: Node
    ) -> Node:
        if dst.kind == "P" or not _is_tensor(u):
            raise ShardError(
                f"node {reader.name!r} reads {u.name!r} ({src}) as {dst}: no collective makes that "
                "(a value cannot be made partial, and a list is never resharded); the plan is "
                "invalid. Plan the graph again."
            )
        return _insert_conversion(
            self.graph, value, src, dst, grad, self.degree, self.rank, self.group, u.name
        )

    def _call(self, target: Any, args: tuple[Any, ...], name: str) -> Node:
        return self.graph.create_node("call_function", target, args, {}, name=name)

    # -- ops with sizes or ranks in their arguments ---------------------------------------------------

    def _emit(self, node: Node, args: Any, kwargs: dict[str, Any], out_p: Placement) -> Node:
        call = local_call(
            node, args, kwargs, out_p, lambda u: self._read_as(node, u), self.degree, self.rank
        )
        if call.row_bias is None:
            return self.graph.create_node(
                call.op, call.target, call.args, call.kwargs, name=node.name
            )
        product = self._call(call.target, call.args, f"{node.name}_product")
        bias, add = call.row_bias
        return self.graph.create_node(
            "call_function", tp_partial_bias, (product, bias, add), name=node.name
        )

    def _read_as(self, node: Node, u: Any) -> Placement | None:
        if not isinstance(u, Node):
            return None
        text = self.tp.input_placements.get(node.name, {}).get(u.name)
        return Placement.parse(text) if text is not None else None


def _insert_conversion(
    graph: Graph,
    value: Node,
    src: Placement,
    dst: Placement,
    grad: Placement,
    degree: int,
    rank: int,
    group_name: str,
    name: str,
) -> Node:
    """Append to ``graph`` the nodes that turn ``value`` (placed ``src``) into ``dst`` for a reader
    whose backward gives a gradient placed ``grad`` (the module docstring's table)."""
    d, r, g = degree, rank, group_name
    partial = grad == P

    def call(target: Any, args: tuple[Any, ...], kind: str) -> Node:
        return graph.create_node("call_function", target, args, {}, name=f"{name}_{kind}")

    if src == dst:  # R read by a split computation: Megatron's f
        return call(tp_copy, (value, g), "copy")
    if src.kind == "P" and dst == R:
        return call(tp_all_reduce, (value, g, partial), "all_reduce")
    if src.kind == "P":
        return call(tp_reduce_scatter, (value, dst.dim, dst.groups, d, g), "reduce_scatter")
    if src.is_shard:
        gathered = (value, src.dim, src.groups, d, r, g, partial and dst == R)
        value = call(tp_all_gather, gathered, "all_gather")
        if dst == R:
            return value
    return call(tp_slice, (value, dst.dim, dst.groups, d, r, g), "slice")


def _is_tensor(node: Node) -> bool:
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    return val is None or (isinstance(val, torch.Tensor) and val.is_floating_point())


def _sharded_root(
    stage: GraphModule, graph: Graph, storage: Mapping[str, Placement], rank: int, degree: int
) -> nn.Module:
    """A module owning, under the model's names, the stage's parameters and buffers: this rank's
    shard of the split ones (new Parameters), the replicated ones as they are."""
    from autopart.passes.split_stages import attr_at, set_attr_at

    root = nn.Module()
    done: set[str] = set()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or str(node.target) in done:
            continue
        target = str(node.target)
        done.add(target)
        value = attr_at(stage, target)
        p = storage.get(target, R)
        if isinstance(value, torch.Tensor) and p.is_shard:
            piece = shard_tensor(value.detach(), p, rank, degree)
            if isinstance(value, nn.Parameter):
                value = nn.Parameter(piece, requires_grad=value.requires_grad)
            else:
                value = piece
        set_attr_at(root, target, value)
    return root
