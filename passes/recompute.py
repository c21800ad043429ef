"""Activation recomputation on a stage graph: each block a plan recomputes (``Plan.recompute``)
becomes a submodule of its stage that runs under ``torch.utils.checkpoint.checkpoint`` (the
non-reentrant form), so the stage keeps only the block's inputs and runs its forward again in the
backward.

A block is a contiguous run of the traced graph's topological order; on a stage graph it is the
span from its first to its last node that the stage still has (a TP rewrite may have put
collectives inside it, which are recomputed with it). Parameters, buffers and the stage's inputs
(``placeholder`` and ``get_attr`` nodes) stay outside and are passed in, so the stage's parameters
keep their names and owners (DDP, FSDP2, the optimizer and the state dict see the same module).
The submodules are made by torch's own ``fuse_by_partitions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from autopart.errors import AutopartError

__all__ = ["RECOMPUTE_PREFIX", "RecomputeError", "Recomputed", "checkpoint_blocks"]

RECOMPUTE_PREFIX = "recompute_"
"""The name of each recomputed block's submodule is this and its number on the stage."""

_COMPUTING = ("call_function", "call_method")


class RecomputeError(AutopartError):
    """A block of the plan cannot be recomputed on its stage graph."""


class Recomputed(nn.Module):
    """Runs ``body`` under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its
    activations are dropped after the forward and rebuilt (with the same random numbers) in the
    backward."""

    def __init__(self, body: GraphModule) -> None:
        super().__init__()
        self.body = body

    def forward(self, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(self.body, *args, use_reentrant=False)


def checkpoint_blocks(gm: GraphModule, blocks: Sequence[Sequence[str]]) -> GraphModule:
    """``gm`` (changed in place, and returned) with each of ``blocks`` (node names, a run of the
    topological order) moved into a :class:`Recomputed` submodule; blocks with no node on ``gm``
    are skipped."""
    partitions = [p for p in (_partition(gm, names) for names in blocks) if p]
    if not partitions:
        return gm
    fuse_by_partitions(gm, partitions, prefix=RECOMPUTE_PREFIX)
    for i in range(len(partitions)):
        name = f"{RECOMPUTE_PREFIX}{i}"
        body = gm.get_submodule(name)
        assert isinstance(body, GraphModule) and not any(True for _ in body.parameters()), (
            "a recomputed block reads its parameters as inputs"
        )
        setattr(gm, name, Recomputed(body))
    gm.graph.lint()
    gm.recompile()
    return gm


def _partition(gm: GraphModule, names: Sequence[str]) -> dict[Node, int | None]:
    """The computing nodes of ``gm`` from the first to the last of ``names`` it has."""
    order = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(order)}
    here = [position[name] for name in names if name in position]
    if not here:
        return {}
    span = order[min(here) : max(here) + 1]
    modules = [n.name for n in span if n.op == "call_module"]
    if modules:
        raise RecomputeError(
            f"a recomputed block calls submodules ({', '.join(modules[:3])}), whose parameters "
            "would be registered twice; trace the model with torch.export (--trace-method "
            "export) or plan with --recompute none."
        )
    return dict.fromkeys((n for n in span if n.op in _COMPUTING), None)
