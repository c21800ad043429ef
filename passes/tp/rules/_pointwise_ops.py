"""The sharding rule of pointwise ops (as DTensor's ``_pointwise_ops.py``): the output takes a split
of an input (broadcast inputs stay ``R`` and get partial gradients); ``P`` passes through the ops
that are linear in it (add/sub of partials, mul/div by a replicated factor, neg, casts, copies), and
``zeros_like`` may start one (a sum of zeros: where an MoE layer accumulates its experts' partial
outputs)."""

from __future__ import annotations

import torch
from torch.fx import Node

from autopart.passes.tp.placements import P, Placement, Strategy, shard
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_args,
    op_name,
    overload_name,
    tensor_val,
)

__all__ = ["POINTWISE", "RULES"]

POINTWISE = frozenset(
    [
        "abs",
        "acos",
        "add",
        "addcdiv",
        "addcmul",
        "asin",
        "atan",
        "bitwise_and",
        "bitwise_not",
        "bitwise_or",
        "bitwise_xor",
        "ceil",
        "clamp",
        "clamp_max",
        "clamp_min",
        "clone",
        "contiguous",
        "cos",
        "cosh",
        "div",
        "dropout",
        "elu",
        "eq",
        "erf",
        "exp",
        "expm1",
        "fill",
        "floor",
        "fmod",
        "ge",
        "gelu",
        "gt",
        "hardsigmoid",
        "hardswish",
        "hardtanh",
        "isnan",
        "le",
        "leaky_relu",
        "lerp",
        "log",
        "log1p",
        "log2",
        "logical_and",
        "logical_not",
        "logical_or",
        "lt",
        "masked_fill",
        "maximum",
        "minimum",
        "mish",
        "mul",
        "ne",
        "neg",
        "pow",
        "reciprocal",
        "relu",
        "remainder",
        "round",
        "rsqrt",
        "sigmoid",
        "sign",
        "silu",
        "sin",
        "sinh",
        "softplus",
        "sqrt",
        "square",
        "sub",
        "tan",
        "tanh",
        "to",
        "_to_copy",
        "type_as",
        "where",
        "alias",
        "detach",
        "lift_fresh_copy",
        "__and__",
        "__or__",
        "__xor__",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "native_dropout",
    ]
)
_PARTIAL_UNARY = frozenset({"neg", "clone", "contiguous", "alias", "to", "_to_copy"})


def _pointwise(ctx: RuleContext) -> list[Strategy]:
    out = tensor_val(ctx.node)
    if out is None:
        return []
    found: list[Strategy] = []
    tensors = [(i, t, tensor_val(t)) for i, t in enumerate(ctx.inputs)]
    if any(tv is None for _, _, tv in tensors):
        return []
    targets: list[Placement] = []
    for _, t, tv in tensors:
        assert tv is not None
        off = out.ndim - tv.ndim
        for p in ctx.input_cands(t):
            if p.is_shard and off >= 0 and tv.shape[p.dim] == out.shape[p.dim + off]:
                targets.append(shard(p.dim + off, p.groups))
    for p in dict.fromkeys(targets):
        if not ctx.divides(out.shape[p.dim], p.groups, f"output dimension {p.dim}"):
            continue
        req: dict[int, Placement] = {}
        grads: dict[int, Placement] = {}
        for i, _, tv in tensors:
            assert tv is not None
            k = p.dim - (out.ndim - tv.ndim)
            if k >= 0 and tv.shape[k] == out.shape[p.dim]:
                req[i] = shard(k, p.groups)
            else:  # broadcast along the split dimension: its gradient sums over the ranks' parts
                grads[i] = P
        found.append(ctx.strategy("shard", p, req, grads))
    found += _partial_pointwise(ctx, out)
    if op_name(ctx.node) == "zeros_like" and out.is_floating_point():
        found.append(ctx.strategy("partial", P, {}, {0: P}))  # zero: every rank's part of zero
    return found


def _partial_pointwise(ctx: RuleContext, out: torch.Tensor) -> list[Strategy]:
    """Strategies that keep partial sums: the op must be linear in its partial input(s), and each
    input read as ``P`` must be able to be partial (an integer tensor never is)."""
    node, op = ctx.node, op_name(ctx.node)
    partial = [P in ctx.input_cands(t) for t in ctx.inputs]
    if not out.is_floating_point() or not any(partial):
        return []
    n = len(ctx.inputs)
    if op in _PARTIAL_UNARY and n == 1:
        return [ctx.strategy("partial", P, {0: P})]
    if op in ("add", "sub") and overload_name(node) == "Tensor" and n == 2 and all(partial):
        a, b = node_args(node)[0], node_args(node)[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return [ctx.strategy("partial", P, {0: P, 1: P})]
    if op in ("mul", "div") and overload_name(node) in ("Tensor", "Scalar"):
        a, b = node_args(node)[0], node_args(node)[1]
        options = [0] if op == "div" else [0, 1]
        found = []
        for pos in options:
            arg, other = (a, b) if pos == 0 else (b, a)
            if not isinstance(arg, Node) or not partial[ctx.slot(arg)]:
                continue
            req = {ctx.slot(arg): P}
            grads: dict[int, Placement] = {}
            if isinstance(other, Node):
                if other is arg:
                    continue
                grads[ctx.slot(other)] = P  # d(out)/d(other) = grad * partial
            found.append(ctx.strategy("partial", P, req, grads))
        return found
    return []


RULES: dict[str, Rule] = dict.fromkeys(sorted(POINTWISE), _pointwise)
