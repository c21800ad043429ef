"""Selective recomputation of a recompute unit (a layer, :meth:`BlockGraph.by_layers`): the unit
runs under torch's selective activation checkpointing with the policy of
:mod:`autopart.codegen.templates.checkpointing`, which keeps the outputs of its weight matmuls and
fused attention and recomputes everything else in the backward (attention scores of unfused
attention, softmax, norms, activation functions, dropout), as torchtitan's op-level selective
recompute does and in the spirit of Megatron's selective recompute. Those ops are cheap to run
again and hold a large share of a transformer layer's saved bytes; no weight matmul runs twice.

What a unit keeps is counted on the node graph (``OpNode.kept_selectively`` marks the nodes whose
outputs the policy saves):

  kept   = |inputs(unit) + outputs(kept nodes, but the model's outputs)| + private(kept nodes)
  freed  = activation_bytes(unit) - kept        (offered where > 0)

(``inputs``: the values the checkpoint keeps, those it reads from outside and the model inputs
its nodes save.) The backward first runs the other nodes' forward again and rebuilds what they
saved (``freed``).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from autopart.planning.blocks import Block, BlockGraph, Selective
from autopart.planning.graph import OpGraph

__all__ = ["layer_units", "recompute_layers", "with_selective"]


@functools.lru_cache(maxsize=32)
def layer_units(bg: BlockGraph) -> BlockGraph:
    """``bg``'s blocks merged into whole layers (:meth:`BlockGraph.by_layers`), the units that
    recompute, each with its selective recomputation. Memoized by the graph's identity (block
    graphs are immutable), as :func:`recompute_layers` is: the planner asks again per layout."""
    return with_selective(bg.by_layers())


@functools.lru_cache(maxsize=32)
def recompute_layers(bg: BlockGraph, how: str) -> BlockGraph:
    """``bg``'s whole layers (:func:`layer_units`), each recomputed ``how`` (``"full"`` or
    ``"selective"``) where that keeps fewer bytes."""
    layers = layer_units(bg)
    if how == "full":
        return layers.with_recompute([b.index for b in layers.blocks if b.can_recompute])
    return layers.with_recompute(
        (), [b.index for b in layers.blocks if b.can_recompute_selectively]
    )


def with_selective(bg: BlockGraph) -> BlockGraph:
    """``bg`` with each block's :class:`Selective` recomputation set where it keeps fewer bytes,
    from ``bg.op_graph`` (the node graph the blocks group, at the blocks' scale); ``bg`` as it is
    without one (its blocks keep what they were given)."""
    og = bg.op_graph
    if og is None:
        return bg
    blocks = tuple(_offer(og, b) for b in bg.blocks)
    return replace(bg, blocks=blocks)


def _offer(og: OpGraph, block: Block) -> Block:
    names = set(block.nodes)
    nodes = [og.nodes[n] for n in block.nodes]
    kept_nodes = [n for n in nodes if n.kept_selectively]
    read = {s for n in nodes for s in n.inputs if s not in names}
    model_inputs = {s for n in nodes for s in n.saved_from if s in og.value_bytes}
    # a model output is held anyway (the pipeline keeps it for the loss: stage_memory.stage_memory)
    kept = sum(og.value_bytes_of(v) for v in read | model_inputs) + sum(
        (0 if n.is_output else n.output_bytes) + n.private_saved_bytes for n in kept_nodes
    )
    freed = block.activation_bytes - kept
    if freed <= 0 or block.recomputed:
        return block
    again = [n for n in nodes if not n.kept_selectively]
    sel = Selective(
        freed_bytes=freed,
        forward_s=sum(n.forward_s for n in again),
        fixed_forward_s=sum(n.fixed_forward_s for n in again),
    )
    return replace(block, selective=sel)
