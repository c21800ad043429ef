"""Sharding rules of the ops that multiply or look up a weight, and of attention: ``linear`` /
``addmm`` (HF ``Conv1D``), ``mm`` / ``matmul`` / ``bmm``, ``embedding``, the grouped expert
matmuls of MoE layers, ``scaled_dot_product_attention`` (as DTensor's ``_matrix_ops.py`` and
``_embedding_ops.py``)."""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from autopart.passes.tp.placements import P, Placement, R, Strategy, shard
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_arg,
    node_args,
    norm_dim,
    op_name,
    tensor_val,
)
from autopart.passes.tp.rules._view_ops import RESHAPES, split_parts

__all__ = ["GROUPED_MATMULS", "RULES", "fused_groups"]


# -- weight matmuls ---------------------------------------------------------------------------


def _linear(ctx: RuleContext) -> list[Strategy]:
    """``linear(x, W[N, K], b[N])`` and ``addmm(b[N], x, W[K, N])`` (HF Conv1D)."""
    node, op = ctx.node, op_name(ctx.node)
    if op == "linear":
        x, w, b = node_args(node)[0], node_args(node)[1], node_arg(node, 2, "bias")
        out_dim, in_dim = 0, 1
    else:
        b, x, w = node_args(node)[0], node_args(node)[1], node_args(node)[2]
        if node_arg(node, 3, "beta", 1) != 1 or node_arg(node, 4, "alpha", 1) != 1:
            return []
        out_dim, in_dim = 1, 0
    out, wv, xv = tensor_val(node), tensor_val(w), tensor_val(x)
    if out is None or wv is None or xv is None or wv.ndim != 2:
        return []
    bias = b if isinstance(b, Node) else None
    bv = tensor_val(bias)
    if bias is not None and (bv is None or bv.ndim != 1):
        return []
    found: list[Strategy] = []
    n_out, n_in = wv.shape[out_dim], wv.shape[in_dim]
    last = out.ndim - 1
    for g in fused_groups(node, n_out):
        if not ctx.divides(n_out, g, "output features"):
            continue
        req = {ctx.slot(x): R, ctx.slot(w): shard(out_dim, g)}
        if bias is not None:
            req[ctx.slot(bias)] = shard(0, g)
        found.append(ctx.strategy("col", shard(last, g), req, {ctx.slot(x): P}))
    if ctx.divides(n_in, 1, "input features"):
        req = {ctx.slot(x): shard(xv.ndim - 1), ctx.slot(w): shard(in_dim)}
        # the bias (R) is added by one rank only, so the partial sums add up to the exact result
        found.append(ctx.strategy("row", P, req))
    return found


def _matmul(ctx: RuleContext) -> list[Strategy]:
    """``mm`` / ``matmul`` / ``bmm``: A[..., M, K] @ B[..., K, N]."""
    node = ctx.node
    a, b = node_args(node)[0], node_args(node)[1]
    av, bv, out = tensor_val(a), tensor_val(b), tensor_val(node)
    if av is None or bv is None or out is None or av.ndim < 2 or bv.ndim < 2:
        return []
    found: list[Strategy] = []
    n, k, last = bv.shape[-1], bv.shape[-2], out.ndim - 1
    if a is b:
        return []
    if ctx.divides(n, 1, "output features"):
        found.append(
            ctx.strategy("col", shard(last), {ctx.slot(b): shard(bv.ndim - 1)}, {ctx.slot(a): P})
        )
    if ctx.divides(k, 1, "contraction dimension"):
        found.append(
            ctx.strategy(
                "row", P, {ctx.slot(a): shard(av.ndim - 1), ctx.slot(b): shard(bv.ndim - 2)}
            )
        )
    # batch dimensions (heads of a hand-written attention), when both operands have them in full
    if av.ndim == bv.ndim == out.ndim >= 3:
        for dim in range(out.ndim - 2):
            if av.shape[dim] == bv.shape[dim] == out.shape[dim] > 1:
                p = shard(dim)
                if any(p in ctx.input_cands(t) for t in (a, b)) and ctx.divides(
                    out.shape[dim], 1, f"batch dimension {dim}"
                ):
                    found.append(ctx.strategy("shard", p, {ctx.slot(a): p, ctx.slot(b): p}))
    return found


def _embedding(ctx: RuleContext) -> list[Strategy]:
    node = ctx.node
    w, ids = node_args(node)[0], node_args(node)[1]
    wv, out = tensor_val(w), tensor_val(node)
    if wv is None or out is None or wv.ndim != 2 or not isinstance(ids, Node):
        return []
    found: list[Strategy] = []
    vocab, dim = wv.shape
    if ctx.divides(vocab, 1, "vocabulary"):
        found.append(ctx.strategy("row", P, {ctx.slot(w): shard(0)}))
    if ctx.divides(dim, 1, "embedding dimension"):
        found.append(ctx.strategy("col", shard(out.ndim - 1), {ctx.slot(w): shard(1)}))
    return found


def _grouped_mm(ctx: RuleContext) -> list[Strategy]:
    """A grouped expert matmul, ``out[S, N] = x[S, K] @ W[e][K, N]`` for the rows ``offs`` gives
    expert ``e`` (transformers' ``grouped_mm_fallback``, ``aten._grouped_mm``): ``col`` splits
    every expert's output features (with groups where a fused gate / up is cut in halves later),
    ``row`` every expert's input features (output ``P``). The rows, and so the routing, are
    never split."""
    node = ctx.node
    x, w = node_args(node)[0], node_args(node)[1]
    xv, wv, out = tensor_val(x), tensor_val(w), tensor_val(node)
    if xv is None or wv is None or out is None or xv.ndim != 2 or wv.ndim != 3 or x is w:
        return []
    if node_arg(node, 3, "bias") is not None:
        return []
    found: list[Strategy] = []
    n_in, n_out = wv.shape[1], wv.shape[2]
    for g in fused_groups(node, n_out):
        if ctx.divides(n_out, g, "expert output features"):
            req = {ctx.slot(x): R, ctx.slot(w): shard(2, g)}
            found.append(ctx.strategy("col", shard(1, g), req, {ctx.slot(x): P}))
    if ctx.divides(n_in, 1, "expert input features"):
        found.append(ctx.strategy("row", P, {ctx.slot(x): shard(1), ctx.slot(w): shard(1)}))
    return found


GROUPED_MATMULS = frozenset({"grouped_mm_fallback", "_grouped_mm"})
"""Op names of the grouped expert matmuls (``x[S, K]``, stacked weights ``W[E, K, N]``, offsets)."""


def fused_groups(node: Node, features: int) -> list[int]:
    """Column-split group counts worth offering for a matmul with ``features`` outputs: 1, and the
    number of equal parts a later split/chunk cuts the last dimension into (a fused QKV or
    gate/up projection), looking through views that keep that dimension."""
    groups = [1]
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop(0)
        if user in seen:
            continue
        seen.add(user)
        op, uv, src = (
            op_name(user),
            tensor_val(user),
            tensor_val(node_args(user)[0]) if node_args(user) else None,
        )
        if src is None or src.ndim == 0 or src.shape[-1] != features:
            continue
        last = src.ndim - 1
        if op in ("split", "split_with_sizes", "chunk"):
            parts = split_parts(user, src)
            if parts and norm_dim(node_arg(user, 2, "dim", 0), src.ndim) == last:
                groups.append(len(parts))
        elif (
            op in RESHAPES and uv is not None and uv.ndim >= 1 and uv.shape[-1] == features
        ) or op in ("alias", "contiguous", "clone", "to", "_to_copy"):
            todo.extend(user.users)
        elif op in RESHAPES and uv is not None and (g := _leading_part(list(uv.shape), src)):
            groups.append(g)  # [q; k; v] viewed as (..., 3, heads, head_dim)
    return [g for g in dict.fromkeys(groups) if features % g == 0]


def _leading_part(out: list[int], src: torch.Tensor) -> int:
    """``g`` when ``out`` keeps ``src``'s leading dims and cuts its last one into ``(g, heads,
    head_dim)`` (``g > 1``, and at least three parts: ``(heads, head_dim)`` alone is no fused
    projection); 0 otherwise."""
    lead = list(src.shape[:-1])
    rest = out[len(lead) :]
    if out[: len(lead)] != lead or len(rest) < 3 or math.prod(rest) != src.shape[-1]:
        return 0
    return rest[0] if rest[0] > 1 else 0


# -- attention --------------------------------------------------------------------------------


def _sdpa(ctx: RuleContext) -> list[Strategy]:
    node = ctx.node
    q, k, v = node_args(node)[:3]
    mask = node_arg(node, 3, "attn_mask")
    qv, kv, vv, out = tensor_val(q), tensor_val(k), tensor_val(v), tensor_val(node)
    if qv is None or kv is None or vv is None or out is None or qv.ndim != 4:
        return []
    if kv.ndim != 4 or vv.ndim != 4:
        return []
    heads, kv_heads = qv.shape[1], kv.shape[1]
    ok = ctx.divides(heads, 1, "query heads")
    if kv_heads != heads:
        ok = ctx.divides(kv_heads, 1, "key/value heads (GQA)") and ok
    if not ok:
        return []
    req = {ctx.slot(q): shard(1), ctx.slot(k): shard(1), ctx.slot(v): shard(1)}
    grads: dict[int, Placement] = {}
    if isinstance(mask, Node):
        mv = tensor_val(mask)
        if mv is None:
            return []
        if mv.ndim >= 3 and mv.shape[mv.ndim - 3] == heads:
            req[ctx.slot(mask)] = shard(mv.ndim - 3)
        else:  # broadcast over the split heads: each rank's gradient is one term of the sum
            grads[ctx.slot(mask)] = P
    return [ctx.strategy("shard", shard(1), req, grads)]


RULES: dict[str, Rule] = {
    "linear": _linear,
    "addmm": _linear,
    "mm": _matmul,
    "matmul": _matmul,
    "bmm": _matmul,
    "embedding": _embedding,
    "scaled_dot_product_attention": _sdpa,
    **dict.fromkeys(sorted(GROUPED_MATMULS), _grouped_mm),
}
