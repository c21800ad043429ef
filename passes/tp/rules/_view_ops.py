"""Sharding rules of the layout ops of one tensor input (as DTensor's ``_view_ops.py``): view /
reshape / flatten / unflatten / squeeze / unsqueeze move a split with its dimension when sizes
divide (hidden -> (heads, head_dim) keeps the split on the heads only if the degree divides the
heads); expand / transpose / t / permute / slice / narrow / select / roll / repeat_interleave move
or keep it; split / chunk hand it to every part. ``P`` passes through all of them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.fx import Node

from autopart.passes.tp.placements import P, Placement, R, Strategy, shard
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_arg,
    node_args,
    norm_dim,
    op_label,
    op_name,
    tensor_val,
)

__all__ = ["LIST_OUTPUTS", "RESHAPES", "RULES", "split_parts"]

RESHAPES = frozenset(
    {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"}
)

LIST_OUTPUTS = frozenset({"split", "split_with_sizes", "chunk", "unbind"})
"""Ops whose output is a list of tensors (read by ``getitem``)."""


def _single_input(
    mapper: Callable[[RuleContext, Placement, torch.Tensor, torch.Tensor], Placement | None],
) -> Rule:
    """A rule for a layout op of one tensor input: each candidate placement of the input maps to
    an output placement (or to nothing: not supported); ``P`` maps to ``P``."""

    def rule(ctx: RuleContext) -> list[Strategy]:
        node = ctx.node
        src = node_args(node)[0]
        sv, out = tensor_val(src), tensor_val(node)
        if not isinstance(src, Node) or sv is None or len(ctx.inputs) != 1:
            return []
        if out is None and op_name(node) not in LIST_OUTPUTS:
            return []
        found = []
        for p in ctx.input_cands(src):
            if p == R:
                continue
            if p == P:
                if sv.is_floating_point():
                    found.append(ctx.strategy("partial", P, {0: P}))
                continue
            q = mapper(ctx, p, sv, out if out is not None else sv)
            if q is not None:
                found.append(ctx.strategy("shard", q, {0: p}))
        return found

    return rule


def _reshape_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    return _reshape_placement(list(sv.shape), list(out.shape), p, ctx)


def _reshape_placement(
    in_shape: list[int], out_shape: list[int], p: Placement, ctx: RuleContext
) -> Placement | None:
    """Where the split of ``p`` lands when ``in_shape`` is viewed as ``out_shape``.

    Dimensions of size 1 are ignored; the others form groups whose products match. Inside the group
    holding the split dimension, the split must be the outermost (first) input dim of the group
    (``(heads, head_dim) -> hidden`` with heads split gives ``S(hidden)``; ``(batch, heads) ->
    batch * heads`` gives nothing: its groups would be the batch size, which micro-batches change),
    then the merged size is cut into the output dims: the split lands on the first output dim whose size is a multiple of
    the groups and whose share is a multiple of the degree, or on a later one when the first is a
    factor of the groups (``3 * hidden`` with groups 3 -> ``(3, hidden)`` lands on ``hidden``).
    """
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [j for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins):
        gi, go = [ins[i]], list[int]()
        prod_in, prod_out = in_shape[ins[i]], 1
        i += 1
        while prod_out != prod_in or not go:
            if prod_out < prod_in and j < len(outs):
                go.append(outs[j])
                prod_out *= out_shape[outs[j]]
                j += 1
            elif prod_in < prod_out and i < len(ins):
                gi.append(ins[i])
                prod_in *= in_shape[ins[i]]
                i += 1
            else:
                return None
        if p.dim in gi:
            before = math.prod(in_shape[k] for k in gi[: gi.index(p.dim)])
            if before > 1:
                # (B, H, S, D) -> (B*H, S, D) with H split would be S(0,groups=B): exact at this
                # batch size only, and plans run on micro-batches of other sizes (as DTensor: a
                # merged dimension stays split only when the split one is its outermost factor)
                ctx.reasons.append(
                    f"{op_label(ctx.node)} merges a split dimension into the dimensions before it "
                    f"(size {before}, e.g. batch x heads): only the outermost factor of a merge "
                    "can stay split"
                )
                return None
            return _split_group([out_shape[k] for k in go], go, p.groups, ctx)
    return None


def _split_group(
    sizes: list[int], dims: list[int], groups: int, ctx: RuleContext
) -> Placement | None:
    size, dim = sizes[0], dims[0]
    if size % groups == 0 and (size // groups) % ctx.degree == 0:
        return shard(dim, groups)
    if groups % size == 0 and len(sizes) > 1:  # (3 * hidden, groups 3) -> (3, hidden): on hidden
        return _split_group(sizes[1:], dims[1:], groups // size, ctx)
    parts = f"{groups} x {size // groups}" if groups > 1 and size % groups == 0 else str(size)
    ctx.reasons.append(
        f"{op_label(ctx.node)} of a split dimension into a dimension of size {parts} (e.g. attention "
        f"heads) not divisible by the TP degree {ctx.degree}"
    )
    return None


def _expand_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    off = out.ndim - sv.ndim
    return shard(p.dim + off, p.groups) if out.shape[p.dim + off] == sv.shape[p.dim] else None


def _transpose_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    node, op = ctx.node, op_name(ctx.node)
    if op == "t":
        perm = list(range(sv.ndim))[::-1]
    elif op == "permute":
        perm = [norm_dim(d, sv.ndim) for d in node_args(node)[1]]
    else:
        a, b = norm_dim(node_args(node)[1], sv.ndim), norm_dim(node_args(node)[2], sv.ndim)
        perm = list(range(sv.ndim))
        perm[a], perm[b] = perm[b], perm[a]
    return shard(perm.index(p.dim), p.groups)


def _slice_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    """slice / narrow / select / roll: fine along other dimensions (or a full slice)."""
    node, op = ctx.node, op_name(ctx.node)
    if op == "roll":
        raw = node_arg(node, 2, "dims", [])
        dims: list[int] = [raw] if isinstance(raw, int) else list(raw)
        if not dims or p.dim in [norm_dim(d, sv.ndim) for d in dims]:
            return None
        return p
    dim = norm_dim(node_arg(node, 1, "dim", 0), sv.ndim)
    if op == "select":
        return None if dim == p.dim else shard(p.dim - (dim < p.dim), p.groups)
    if dim == p.dim and out.shape[dim] != sv.shape[dim]:
        return None
    return p


def _repeat_interleave_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    """``repeat_interleave(x, r, dim)``: each rank repeats its own slices (the GQA key/value heads:
    rank r's kv heads become exactly the q heads of rank r)."""
    dim = node_arg(ctx.node, 2, "dim")
    if dim is None or not isinstance(node_arg(ctx.node, 1, "repeats"), int):
        return None
    return p if out.ndim == sv.ndim else None


def _split_map(
    ctx: RuleContext, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    """split / chunk: the placement of every part. Along the split dimension only equal parts
    whose count divides the groups (a fused QKV cut into q, k, v)."""
    node = ctx.node
    dim = norm_dim(node_arg(node, 2, "dim", 0), sv.ndim)
    if dim != p.dim:
        return p
    parts = split_parts(node, sv)
    if not parts or p.groups % len(parts) != 0:
        # Only a reason when no grouped layout can exist: otherwise the producer offers one
        # (``fused_groups``) and this ungrouped split is merely not the way to cut it.
        if parts and p.groups == 1 and parts[0] % ctx.degree:
            ctx.reasons.append(
                f"{op_label(node)} of a split dimension into {len(parts)} parts needs the "
                f"interleaved layout of a fused projection, which needs each part ({parts[0]}) "
                f"divisible by the TP degree {ctx.degree}"
            )
        return None
    return shard(dim, p.groups // len(parts))


def split_parts(node: Node, sv: torch.Tensor) -> list[int] | None:
    """Sizes of the equal parts a split/chunk cuts its dimension into (``None``: unequal)."""
    op = op_name(node)
    dim = norm_dim(node_arg(node, 2, "dim", 0), sv.ndim)
    size = sv.shape[dim]
    if op == "chunk":
        chunks = node_args(node)[1]
        each = -(-size // chunks)
        parts = [each] * (size // each) + ([size % each] if size % each else [])
    elif op == "split":
        each = node_args(node)[1]
        if not isinstance(each, int):
            return None
        parts = [each] * (size // each) + ([size % each] if size % each else [])
    elif op == "split_with_sizes":
        parts = list(node_args(node)[1])
    else:
        return None
    return parts if len(set(parts)) == 1 else None


RULES: dict[str, Rule] = {
    **dict.fromkeys(sorted(RESHAPES), _single_input(_reshape_map)),
    "expand": _single_input(_expand_map),
    "transpose": _single_input(_transpose_map),
    "t": _single_input(_transpose_map),
    "permute": _single_input(_transpose_map),
    "slice": _single_input(_slice_map),
    "narrow": _single_input(_slice_map),
    "select": _single_input(_slice_map),
    "roll": _single_input(_slice_map),
    "repeat_interleave": _single_input(_repeat_interleave_map),
    "split": _single_input(_split_map),
    "split_with_sizes": _single_input(_split_map),
    "chunk": _single_input(_split_map),
}
