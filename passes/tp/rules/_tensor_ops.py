"""Sharding rules of the ops that take parts of lists of tensors or join tensors (as DTensor's
``_tensor_ops.py``): ``getitem`` of a split / chunk keeps the placement of the list, ``cat`` keeps a
split of its inputs outside the joined dimension, or along it as one more group per input;
``index_add`` (how an MoE layer scatters each expert's rows back to their tokens) keeps a split of
its destination and source outside the indexed dimension, or ``P`` of both (it is linear in them)."""

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


def _index_add(ctx: RuleContext) -> list[Strategy]:
    """``index_add(self, dim, index, source)``: ``self`` and ``source`` split alike outside
    ``dim`` (their sizes there equal), or both ``P``; the index ``R``."""
    node, out = ctx.node, tensor_val(ctx.node)
    dest, index, source = (
        node_arg(node, 0, "self"),
        node_arg(node, 2, "index"),
        node_arg(node, 3, "source"),
    )
    if out is None or not all(isinstance(a, Node) for a in (dest, index, source)):
        return []
    if node_arg(node, 4, "alpha", 1) != 1 or index in (dest, source) or dest is source:
        return []
    src = tensor_val(source)
    if src is None or src.ndim != out.ndim:
        return []
    dim = norm_dim(node_arg(node, 1, "dim"), out.ndim)
    found = []
    for p in sorted((set(ctx.input_cands(dest)) & set(ctx.input_cands(source))) - {R}):
        slots = {ctx.slot(dest): p, ctx.slot(source): p}
        if p == P and out.is_floating_point():
            found.append(ctx.strategy("partial", P, slots))
        elif (
            p.is_shard
            and p.dim != dim
            and src.shape[p.dim] == out.shape[p.dim]
            and ctx.divides(out.shape[p.dim], p.groups, f"index_add dimension {p.dim}")
        ):
            found.append(ctx.strategy("shard", p, slots))
    return found


RULES: dict[str, Rule] = {"getitem": _getitem, "cat": _cat, "index_add": _index_add}
