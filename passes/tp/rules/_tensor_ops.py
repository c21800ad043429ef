"""Sharding rules of the ops that take parts of lists of tensors or join tensors (as DTensor's
``_tensor_ops.py``): ``getitem`` of a split / chunk keeps the placement of the list, ``cat`` keeps a
split of its inputs outside the joined dimension, or along it as one more group per input."""

from __future__ import annotations

from torch.fx import Node

from autopart.passes.tp.placements import P, R, Strategy, shard
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_arg,
    node_args,
    norm_dim,
    op_name,
    tensor_val,
)
from autopart.passes.tp.rules._view_ops import LIST_OUTPUTS

__all__ = ["RULES"]


def _getitem(ctx: RuleContext) -> list[Strategy]:
    src = node_args(ctx.node)[0]
    if not isinstance(src, Node) or op_name(src) not in LIST_OUTPUTS:
        return []
    return [
        ctx.strategy("partial" if p == P else "shard", p, {0: p})
        for p in ctx.input_cands(src)
        if p != R
    ]


def _cat(ctx: RuleContext) -> list[Strategy]:
    node, out = ctx.node, tensor_val(ctx.node)
    tensors = node_args(node)[0]
    if out is None or not isinstance(tensors, (list, tuple)):
        return []
    if len(set(tensors)) != len(tensors) or not all(isinstance(t, Node) for t in tensors):
        return []
    dim = norm_dim(node_arg(node, 1, "dim", 0), out.ndim)
    vals = [tensor_val(t) for t in tensors]
    if any(v is None or v.ndim != out.ndim for v in vals):
        return []
    found = []
    common = set(ctx.input_cands(tensors[0]))
    for t in tensors[1:]:
        common &= set(ctx.input_cands(t))
    for p in sorted(common - {R}):
        if p == P:
            found.append(ctx.strategy("partial", P, {ctx.slot(t): P for t in tensors}))
        elif p.dim != dim:
            found.append(ctx.strategy("shard", p, {ctx.slot(t): p for t in tensors}))
        elif len({v.shape[dim] for v in vals if v is not None}) == 1:
            q = shard(dim, p.groups * len(tensors))
            found.append(ctx.strategy("shard", q, {ctx.slot(t): p for t in tensors}))
    return found


RULES: dict[str, Rule] = {"getitem": _getitem, "cat": _cat}
