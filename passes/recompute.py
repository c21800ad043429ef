"""Activation recomputation on a stage graph: each block a plan recomputes (``Plan.recompute``)
becomes a subgraph of its stage that the stage runs under ``torch.utils.checkpoint.checkpoint``
(the non-reentrant form): a ``get_attr`` of the subgraph and a ``call_function`` of ``checkpoint``
on it, as plain graph nodes, so the code autopart.emit writes for the stage does the same. The
stage keeps only the block's inputs and runs its forward again in the backward.

A block is a contiguous run of the traced graph's topological order; on a stage graph it is the
nodes of it the stage still has and every node on a path between two of them (a TP rewrite may
have put collectives inside it, which are recomputed with it). The stage graph may order nodes
otherwise than the trace (a causal mask built beside the first layer), so a block is not the span
from its first to its last node there: that span could reach into the next block. Parameters, buffers and the stage's inputs
(``placeholder`` and ``get_attr`` nodes) stay outside and are passed in, so the stage's parameters
keep their names and owners (DDP, FSDP2, the optimizer and the state dict see the same module).
The submodules are made by torch's own ``fuse_by_partitions``.

A block recomputed selectively (``RecomputedBlock.selective``) calls
:func:`~autopart.codegen.templates.checkpointing.checkpoint_saving_matmuls` instead: torch's
selective activation checkpointing, which keeps the block's weight-matmul and fused-attention
outputs and recomputes the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from autopart.codegen.templates.checkpointing import checkpoint_saving_matmuls
from autopart.errors import AutopartError
from autopart.passes.subgraphs import convex_span

__all__ = ["RECOMPUTE_PREFIX", "RecomputeError", "checkpoint_blocks", "recomputed_blocks"]

RECOMPUTE_PREFIX = "recompute_"
"""The name of each recomputed block's subgraph is this and its number on the stage."""

_COMPUTING = ("call_function", "call_method")


class RecomputeError(AutopartError):
    """A block of the plan cannot be recomputed on its stage graph."""


def checkpoint_blocks(
    gm: GraphModule, blocks: Sequence[Sequence[str]], *, selective: Sequence[bool] = ()
) -> GraphModule:
    """``gm`` (changed in place, and returned) with each of ``blocks`` (node names, a run of the
    topological order) moved into a subgraph that runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its activations are dropped
    after the forward and rebuilt (with the same random numbers) in the backward; where
    ``selective[i]`` is true, block ``i`` keeps its weight matmuls' outputs
    (:func:`checkpoint_saving_matmuls`). Blocks with no node on ``gm`` are skipped."""
    found = [
        (_partition(gm, names), i < len(selective) and selective[i])
        for i, names in enumerate(blocks)
    ]
    found = [(p, sel) for p, sel in found if p]
    if not found:
        return gm
    fuse_by_partitions(gm, [p for p, _ in found], prefix=RECOMPUTE_PREFIX)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(RECOMPUTE_PREFIX):
            continue
        some = found[int(str(node.target).removeprefix(RECOMPUTE_PREFIX))][1]
        body = gm.get_submodule(str(node.target))
        assert isinstance(body, GraphModule) and not any(True for _ in body.parameters()), (
            "a recomputed block reads its parameters as inputs"
        )
        with gm.graph.inserting_before(node):
            sub = gm.graph.get_attr(str(node.target))
            if some:
                call = gm.graph.call_function(checkpoint_saving_matmuls, (sub, *node.args))
            else:
                call = gm.graph.call_function(
                    torch.utils.checkpoint.checkpoint, (sub, *node.args), {"use_reentrant": False}
                )
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def recomputed_blocks(gm: torch.nn.Module) -> int:
    """How many blocks ``gm`` (a stage, or a module wrapping one) runs under checkpointing."""
    return sum(
        1
        for m in gm.modules()
        if isinstance(m, GraphModule)
        for n in m.graph.nodes
        if n.op == "call_function"
        and n.target in (torch.utils.checkpoint.checkpoint, checkpoint_saving_matmuls)
    )


def _partition(gm: GraphModule, names: Sequence[str]) -> dict[Node, int | None]:
    """The computing nodes of ``gm`` among ``names``, and every node on a path between two of
    them (so the partition is convex: fusing it makes no cycle)."""
    wanted = set(names)
    span = convex_span(gm, [n for n in gm.graph.nodes if n.name in wanted])
    modules = [n.name for n in span if n.op == "call_module"]
    if modules:
        raise RecomputeError(
            f"a recomputed block calls submodules ({', '.join(modules[:3])}), whose parameters "
            "would be registered twice; trace the model with torch.export (--trace-method "
            "export) or plan with --recompute none."
        )
    return dict.fromkeys((n for n in span if n.op in _COMPUTING), None)
