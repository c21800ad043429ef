"""Per-layer FSDP units on a stage graph: each repeated layer of a stage (``model.layers.3``)
becomes a submodule of the stage at the layer's own path, a GraphModule that runs the layer's
nodes and owns its parameters under their own names, and the stage calls it. torch's FSDP2 can
then shard every layer as its own unit (``fully_shard`` per transformer block, as torchtitan
does): a unit's parameters are gathered by its own forward hook, one layer after another, so on
a GPU the gathers of one layer run behind the computation of the one before.

A stage graph reads its parameters with ``get_attr`` and never calls its layers' modules, which
is why the layers need to become called modules first. Only the nodes change place: every
parameter and buffer keeps its name and its object (the optimizer, checkpoints, DDP and the
tied-weight sync see the same module), and the stage computes what it computed. A layer stays in
the stage (its parameters in the stage's own unit) where its nodes are not a subgraph of their own:
a node of another layer on a path between two of its nodes, a parameter of it that a node outside
it reads, a submodule call (an fx trace's leaf module) inside it or one of its modules called
outside it, an in-place write that ties a node of it to one outside it (FSDP2 hooks a unit's
backward on its outputs' autograd nodes, which a write in place replaces), or a name the unit
uses itself.

Recomputed blocks (:mod:`autopart.passes.recompute`) are taken into the unit of their layer whole:
the ``checkpoint`` call, its subgraph and the parameters it is passed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.utils.checkpoint
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from autopart.codegen.templates.checkpointing import checkpoint_saving_matmuls
from autopart.codegen.templates.run import FSDP_UNIT
from autopart.passes.mutations import mutation_groups
from autopart.passes.recompute import RECOMPUTE_PREFIX
from autopart.passes.subgraphs import convex_span
from autopart.planning.graph import node_layers

__all__ = ["layer_units", "model_layers", "split_layer_units"]

_PREFIX = "layer_unit_"
_COMPUTING = ("call_function", "call_method")
_CHECKPOINTS = (torch.utils.checkpoint.checkpoint, checkpoint_saving_matmuls)


def split_layer_units(gm: GraphModule, layers: Collection[str]) -> tuple[str, ...]:
    """``gm`` (changed in place) with each of its ``layers`` (the model's repeated layers, e.g.
    ``model_layers(whole_graph)``) that can be one moved into a GraphModule installed at the
    layer's path and marked :data:`FSDP_UNIT`; returns those paths, in graph order."""
    writes = mutation_groups(gm)
    found = [
        (path, part)
        for path, part in _layer_partitions(gm, layers)
        if _can_own(gm, path, part) and not _written_across(part, writes)
    ]
    if not found:
        return ()
    fuse_by_partitions(gm, [dict.fromkeys(part) for _, part in found], prefix=_PREFIX)
    calls = {
        str(n.target): n
        for n in gm.graph.nodes
        if n.op == "call_module" and str(n.target).startswith(_PREFIX)
    }
    for i, (path, _) in enumerate(found):
        _install(gm, calls[f"{_PREFIX}{i}"], path)
    gm.graph.lint()
    gm.recompile()
    return tuple(path for path, _ in found)


def model_layers(*graphs: GraphModule) -> frozenset[str]:
    """The paths of the repeated layers of a model, from its whole graph or all its stages."""
    return frozenset(node_layers(n for gm in graphs for n in gm.graph.nodes).values())


def layer_units(gm: GraphModule) -> dict[str, GraphModule]:
    """The layer units :func:`split_layer_units` installed in ``gm``: path -> unit, in call
    order."""
    found: dict[str, GraphModule] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            module = gm.get_submodule(str(n.target))
            if isinstance(module, GraphModule) and getattr(module, FSDP_UNIT, False):
                found.setdefault(str(n.target), module)
    return found


def _layer_partitions(gm: GraphModule, layers: Collection[str]) -> list[tuple[str, list[Node]]]:
    """Each repeated layer of ``gm`` and its computing nodes (with every node on a path between
    two of them), in graph order."""
    subgraphs = {n: _checkpointed(gm, n) for n in gm.graph.nodes if _is_checkpoint(n)}
    inner = [m for sub in subgraphs.values() if sub is not None for m in sub.graph.nodes]
    layer_of = node_layers([*gm.graph.nodes, *inner], layers)
    members: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op not in _COMPUTING:
            continue
        sub = subgraphs.get(n)
        inside = [
            layer_of[m]
            for m in (sub.graph.nodes if sub else ())
            if m.op in _COMPUTING and m in layer_of
        ]
        layer = inside[0] if inside else layer_of.get(n)
        if layer is not None:
            members.setdefault(layer, []).append(n)
    out = []
    for path, nodes in members.items():
        span = convex_span(gm, set(nodes))
        if any(layer_of.get(n, path) != path for n in span):
            continue  # another layer's node on a path between two of its nodes
        out.append((path, [n for n in span if n.op in (*_COMPUTING, "call_module")]))
    return out


def _written_across(part: Sequence[Node], writes: Sequence[Sequence[Node]]) -> bool:
    """Whether an in-place write ties nodes of ``part`` to nodes outside it (a
    :func:`~autopart.passes.mutations.mutation_groups` group on both sides): FSDP2 hooks a unit's
    backward through the autograd node of each output, and a write in place on an output (or on
    what it views) outside the unit replaces that node, so the layer would run its backward
    ungathered (torch warns of it: "returned a view tensor"); nor may the unit write a tensor
    from outside in place."""
    inside = set(part)
    return any(inside.intersection(g) and not inside.issuperset(g) for g in writes)


def _can_own(gm: GraphModule, path: str, part: Sequence[Node]) -> bool:
    """Whether the nodes ``part`` of layer ``path`` can become a module at ``path`` owning the
    layer's parameters and buffers: it calls no submodule, nothing outside it reads them or
    calls a module of the layer, and no attribute of the layer has a name the unit uses
    itself."""
    if any(n.op == "call_module" for n in part):
        return False
    inside = set(part)
    for n in gm.graph.nodes:
        target = str(n.target)
        mine = target == path or target.startswith(f"{path}.")
        if n.op == "call_module" and mine:  # its own module, called outside its nodes
            return False
        if n.op == "get_attr" and mine and set(n.users) - inside:
            return False
    try:
        layer = gm.get_submodule(path)
    except AttributeError:
        return False
    reserved = {*dir(GraphModule), "device", FSDP_UNIT}  # the unit's own (emit's: ``device``)
    names = (*layer._modules, *layer._parameters, *layer._buffers)
    return not any(name in reserved or name.startswith(RECOMPUTE_PREFIX) for name in names)


def _install(gm: GraphModule, call: Node, path: str) -> None:
    """Make the fused call ``call`` the layer ``path``'s own module: the layer's tensors and
    submodules move into it (read with ``get_attr`` inside instead of being passed in), as do
    the subgraphs of its recomputed blocks, and it takes the layer's place in ``gm``."""
    unit = gm.get_submodule(str(call.target))
    assert isinstance(unit, GraphModule), "torch's fuse_by_partitions makes GraphModules"
    _adopt(unit, gm.get_submodule(path))
    args = list(call.args)
    placeholders = [n for n in unit.graph.nodes if n.op == "placeholder"]
    kept = []
    for arg, ph in zip(args, placeholders):
        inner = _moved_in(gm, arg, path, call)
        if inner is None:
            kept.append(arg)
            continue
        if inner.startswith(RECOMPUTE_PREFIX):
            unit.add_module(inner, gm.get_submodule(inner))
            delattr(gm, inner)
        with unit.graph.inserting_before(ph):
            got = unit.graph.get_attr(inner)
        ph.replace_all_uses_with(got)
        unit.graph.erase_node(ph)
    call.args = tuple(kept)
    for arg in dict.fromkeys(a for a in args if isinstance(a, Node)):
        if arg.op == "get_attr" and not arg.users:
            gm.graph.erase_node(arg)
    unit.graph.lint()
    unit.recompile()
    setattr(unit, FSDP_UNIT, True)
    delattr(gm, str(call.target))
    parent, _, leaf = path.rpartition(".")
    gm.get_submodule(parent).add_module(leaf, unit)
    call.target = path


def _adopt(unit: torch.nn.Module, layer: torch.nn.Module) -> None:
    """``layer``'s submodules, parameters and buffers, under their names, into ``unit``."""
    for name, child in layer._modules.items():
        unit.add_module(name, child)
    for name, param in layer._parameters.items():
        unit.register_parameter(name, param)
    for name, buffer in layer._buffers.items():
        persistent = name not in layer._non_persistent_buffers_set
        unit.register_buffer(name, buffer, persistent=persistent)


def _moved_in(gm: GraphModule, arg: object, path: str, call: Node) -> str | None:
    """The name inside the unit of an argument ``call`` passes that the unit should own: a
    tensor of the layer ``path`` (relative to it), or the subgraph of a recomputed block (its
    own name); None for anything else, or what another node reads too."""
    if not isinstance(arg, Node) or arg.op != "get_attr" or set(arg.users) != {call}:
        return None
    target = str(arg.target)
    if target.startswith(f"{path}."):
        return target.removeprefix(f"{path}.")
    if target.startswith(RECOMPUTE_PREFIX) and isinstance(gm.get_submodule(target), GraphModule):
        return target
    return None


def _is_checkpoint(node: Node) -> bool:
    return node.op == "call_function" and node.target in _CHECKPOINTS


def _checkpointed(gm: GraphModule, node: Node) -> GraphModule | None:
    """The subgraph a ``checkpoint`` call ``node`` runs (its first argument)."""
    first = node.args[0] if node.args else None
    if not isinstance(first, Node) or first.op != "get_attr":
        return None
    sub = gm.get_submodule(str(first.target))
    return sub if isinstance(sub, GraphModule) else None
