"""Sharding rules of reductions and normalisations (as DTensor's ``_math_ops.py``): ``sum`` /
``mean`` / ``amax`` / ``amin``, softmax and log-softmax, ``layer_norm`` / ``rms_norm`` keep any
split outside the reduced or normalised dimensions; ``sum`` / ``mean`` keep ``P``."""

from __future__ import annotations

from torch.fx import Node

from autopart.passes.tp.placements import P, Strategy, shard
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_arg,
    node_args,
    norm_dim,
    op_name,
    tensor_val,
)

__all__ = ["RULES"]


def _reduction(ctx: RuleContext) -> list[Strategy]:
    node, op = ctx.node, op_name(ctx.node)
    src = node_args(node)[0]
    sv, out = tensor_val(src), tensor_val(node)
    if not isinstance(src, Node) or sv is None or out is None or len(ctx.inputs) != 1:
        return []
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        dims, keep = [norm_dim(node_args(node)[1], sv.ndim)], True
    else:
        raw = node_arg(node, 1, "dim")
        if raw is None or raw == []:
            dims = list(range(sv.ndim))
        else:
            dims = [norm_dim(d, sv.ndim) for d in ([raw] if isinstance(raw, int) else raw)]
        keep = bool(node_arg(node, 2, "keepdim", False)) or out.ndim == sv.ndim
    found = []
    for p in ctx.input_cands(src):
        if p == P and op in ("sum", "mean") and out.is_floating_point():
            found.append(ctx.strategy("partial", P, {0: P}))
        elif p.is_shard and p.dim not in dims:
            k = p.dim if keep else p.dim - sum(d < p.dim for d in dims)
            found.append(ctx.strategy("shard", shard(k, p.groups), {0: p}))
    return found


def _norm(ctx: RuleContext) -> list[Strategy]:
    """layer_norm / rms_norm: any split outside the normalised (last) dimensions; the weight and
    bias stay replicated and get partial gradients (they are broadcast over the split)."""
    node = ctx.node
    x, shape = node_args(node)[0], node_args(node)[1]
    xv = tensor_val(x)
    if not isinstance(x, Node) or xv is None:
        return []
    first_normed = xv.ndim - len(shape)
    found = []
    for p in ctx.input_cands(x):
        if p.is_shard and p.dim < first_normed:
            grads = {i: P for i, t in enumerate(ctx.inputs) if t is not x}
            found.append(ctx.strategy("shard", p, {ctx.slot(x): p}, grads))
    return found


RULES: dict[str, Rule] = {
    **dict.fromkeys(
        ["sum", "mean", "amax", "amin", "softmax", "_softmax", "log_softmax", "_log_softmax"],
        _reduction,
    ),
    "layer_norm": _norm,
    "rms_norm": _norm,
}
