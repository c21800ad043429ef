"""The sharding rules of :mod:`autopart.passes.tp.strategies`, one function per family of ops:
each takes a node (with the candidate placements of its inputs) and returns the sharded strategies
it supports, recording why a split was refused when the TP degree does not divide a size."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from autopart.passes.tp.placements import (
    NodeStrategies,
    P,
    Placement,
    R,
    Strategy,
    dual,
    replicated,
    shard,
)

__all__ = ["RULE_OPS", "WEIGHT_SLOT", "cache_key", "node_strategies", "op_name", "weight_param"]


# ---------------------------------------------------------------------------------------------
# rules


def op_name(node: Node) -> str:
    """``"add"`` for ``aten.add.Tensor``, ``"getitem"`` for ``operator.getitem``; ``""`` otherwise."""
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[-1]
    return ""


def _overload(node: Node) -> str:
    target = node.target
    return target._overloadname if isinstance(target, torch._ops.OpOverload) else ""


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _args(node: Node) -> Any:
    """``node.args``, untyped: aten schemas fix what each position holds."""
    return node.args


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Ctx:
    """What one rule needs: the node, the TP degree, the inputs' candidate placements, and a list
    collecting divisibility reasons."""

    def __init__(self, node: Node, degree: int, cands: Mapping[Node, list[Placement]]) -> None:
        self.node = node
        self.degree = degree
        self.cands = cands
        self.inputs = node.all_input_nodes
        self.reasons: list[str] = []

    def slot(self, arg: Any) -> int:
        return self.inputs.index(arg)

    def input_cands(self, arg: Node) -> list[Placement]:
        return self.cands.get(arg, [R])

    def divides(self, size: int, groups: int, what: str) -> bool:
        if size % (groups * self.degree) == 0:
            return True
        per = f"{size} = {groups} parts of {size // groups}" if groups > 1 else str(size)
        self.reasons.append(f"{what} ({per}) not divisible by the TP degree {self.degree}")
        return False

    def strategy(
        self,
        label: str,
        output: Placement,
        required: Mapping[int, Placement],
        grads: Mapping[int, Placement] | None = None,
        *,
        sharded: bool = True,
    ) -> Strategy:
        """A strategy with ``required[slot]`` for the given inputs (``R`` for the others) and
        gradients ``grads[slot]`` (default: the dual of the requirement)."""
        grads = grads or {}
        ins = tuple(required.get(i, R) for i in range(len(self.inputs)))
        gs = tuple(grads.get(i, dual(p)) for i, p in enumerate(ins))
        return Strategy(label, output, ins, gs, sharded=sharded)


def node_strategies(
    node: Node, degree: int, cands: Mapping[Node, list[Placement]]
) -> NodeStrategies:
    if node.op == "output":
        n = len(node.all_input_nodes)
        return NodeStrategies((Strategy("replicate", R, (R,) * n, (R,) * n, sharded=False),))
    base = replicated(node)
    if degree == 1 or node.op != "call_function":
        return NodeStrategies((base,))
    ctx = _Ctx(node, degree, cands)
    op = op_name(node)
    rule = _RULES.get(op)
    if rule is None and op in _POINTWISE:
        rule = _pointwise
    found = rule(ctx) if rule is not None else []
    strategies = [base] + [s for s in dict.fromkeys(found) if s != base]
    return NodeStrategies(tuple(strategies), tuple(dict.fromkeys(ctx.reasons)))


# -- weight matmuls ---------------------------------------------------------------------------


def _linear(ctx: _Ctx) -> list[Strategy]:
    """``linear(x, W[N, K], b[N])`` and ``addmm(b[N], x, W[K, N])`` (HF Conv1D)."""
    node, op = ctx.node, op_name(ctx.node)
    if op == "linear":
        x, w, b = _args(node)[0], _args(node)[1], _arg(node, 2, "bias")
        out_dim, in_dim = 0, 1
    else:
        b, x, w = _args(node)[0], _args(node)[1], _args(node)[2]
        if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
            return []
        out_dim, in_dim = 1, 0
    out, wv, xv = _val(node), _val(w), _val(x)
    if out is None or wv is None or xv is None or wv.ndim != 2:
        return []
    bias = b if isinstance(b, Node) else None
    bv = _val(bias)
    if bias is not None and (bv is None or bv.ndim != 1):
        return []
    found: list[Strategy] = []
    n_out, n_in = wv.shape[out_dim], wv.shape[in_dim]
    last = out.ndim - 1
    for g in _fused_groups(node, n_out):
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


def _matmul(ctx: _Ctx) -> list[Strategy]:
    """``mm`` / ``matmul`` / ``bmm``: A[..., M, K] @ B[..., K, N]."""
    node = ctx.node
    a, b = _args(node)[0], _args(node)[1]
    av, bv, out = _val(a), _val(b), _val(node)
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


def _embedding(ctx: _Ctx) -> list[Strategy]:
    node = ctx.node
    w, ids = _args(node)[0], _args(node)[1]
    wv, out = _val(w), _val(node)
    if wv is None or out is None or wv.ndim != 2 or not isinstance(ids, Node):
        return []
    found: list[Strategy] = []
    vocab, dim = wv.shape
    if ctx.divides(vocab, 1, "vocabulary"):
        found.append(ctx.strategy("row", P, {ctx.slot(w): shard(0)}))
    if ctx.divides(dim, 1, "embedding dimension"):
        found.append(ctx.strategy("col", shard(out.ndim - 1), {ctx.slot(w): shard(1)}))
    return found


def _fused_groups(node: Node, features: int) -> list[int]:
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
        op, uv, src = op_name(user), _val(user), _val(_args(user)[0]) if _args(user) else None
        if src is None or src.ndim == 0 or src.shape[-1] != features:
            continue
        last = src.ndim - 1
        if op in ("split", "split_with_sizes", "chunk"):
            parts = _split_parts(user, src)
            if parts and _norm_dim(_arg(user, 2, "dim", 0), src.ndim) == last:
                groups.append(len(parts))
        elif (
            op in _RESHAPES and uv is not None and uv.ndim >= 1 and uv.shape[-1] == features
        ) or op in ("alias", "contiguous", "clone", "to", "_to_copy"):
            todo.extend(user.users)
        elif op in _RESHAPES and uv is not None and (g := _leading_part(list(uv.shape), src)):
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


def _what(node: Node) -> str:
    """The op, for reasons; reasons name no node, so identical layers share their strategies."""
    return op_name(node) or str(node.target)


# -- attention --------------------------------------------------------------------------------


def _sdpa(ctx: _Ctx) -> list[Strategy]:
    node = ctx.node
    q, k, v = _args(node)[:3]
    mask = _arg(node, 3, "attn_mask")
    qv, kv, vv, out = _val(q), _val(k), _val(v), _val(node)
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
        mv = _val(mask)
        if mv is None:
            return []
        if mv.ndim >= 3 and mv.shape[mv.ndim - 3] == heads:
            req[ctx.slot(mask)] = shard(mv.ndim - 3)
        else:  # broadcast over the split heads: each rank's gradient is one term of the sum
            grads[ctx.slot(mask)] = P
    return [ctx.strategy("shard", shard(1), req, grads)]


# -- pointwise ----------------------------------------------------------------------------------

_POINTWISE = frozenset(
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
        "__invert__",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "native_dropout",
    ]
)
_PARTIAL_UNARY = frozenset({"neg", "clone", "contiguous", "alias", "to", "_to_copy"})


def _pointwise(ctx: _Ctx) -> list[Strategy]:
    out = _val(ctx.node)
    if out is None:
        return []
    found: list[Strategy] = []
    tensors = [(i, t, _val(t)) for i, t in enumerate(ctx.inputs)]
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
    return found


def _partial_pointwise(ctx: _Ctx, out: torch.Tensor) -> list[Strategy]:
    """Strategies that keep partial sums: the op must be linear in its partial input(s)."""
    node, op = ctx.node, op_name(ctx.node)
    if not out.is_floating_point() or not any(P in ctx.input_cands(t) for t in ctx.inputs):
        return []
    n = len(ctx.inputs)
    if op in _PARTIAL_UNARY and n == 1:
        return [ctx.strategy("partial", P, {0: P})]
    if op in ("add", "sub") and _overload(node) == "Tensor" and n == 2:
        a, b = _args(node)[0], _args(node)[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return [ctx.strategy("partial", P, {0: P, 1: P})]
    if op in ("mul", "div") and _overload(node) in ("Tensor", "Scalar"):
        a, b = _args(node)[0], _args(node)[1]
        options = [0] if op == "div" else [0, 1]
        found = []
        for pos in options:
            arg, other = (a, b) if pos == 0 else (b, a)
            if not isinstance(arg, Node):
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


# -- layout ops ---------------------------------------------------------------------------------

_RESHAPES = frozenset(
    {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"}
)


def _single_input(
    mapper: Callable[[_Ctx, Placement, torch.Tensor, torch.Tensor], Placement | None],
) -> Callable[[_Ctx], list[Strategy]]:
    """A rule for a layout op of one tensor input: each candidate placement of the input maps to
    an output placement (or to nothing: not supported); ``P`` maps to ``P``."""

    def rule(ctx: _Ctx) -> list[Strategy]:
        node = ctx.node
        src = _args(node)[0]
        sv, out = _val(src), _val(node)
        if not isinstance(src, Node) or sv is None or len(ctx.inputs) != 1:
            return []
        if out is None and op_name(node) not in _LIST_OUTPUTS:
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


_LIST_OUTPUTS = frozenset({"split", "split_with_sizes", "chunk", "unbind"})


def _reshape_map(ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor) -> Placement | None:
    return _reshape_placement(list(sv.shape), list(out.shape), p, ctx)


def _reshape_placement(
    in_shape: list[int], out_shape: list[int], p: Placement, ctx: _Ctx
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
                    f"{_what(ctx.node)} merges a split dimension into the dimensions before it "
                    f"(size {before}, e.g. batch x heads): only the outermost factor of a merge "
                    "can stay split"
                )
                return None
            return _split_group([out_shape[k] for k in go], go, p.groups, ctx)
    return None


def _split_group(sizes: list[int], dims: list[int], groups: int, ctx: _Ctx) -> Placement | None:
    size, dim = sizes[0], dims[0]
    if size % groups == 0 and (size // groups) % ctx.degree == 0:
        return shard(dim, groups)
    if groups % size == 0 and len(sizes) > 1:  # (3 * hidden, groups 3) -> (3, hidden): on hidden
        return _split_group(sizes[1:], dims[1:], groups // size, ctx)
    parts = f"{groups} x {size // groups}" if groups > 1 and size % groups == 0 else str(size)
    ctx.reasons.append(
        f"{_what(ctx.node)} of a split dimension into a dimension of size {parts} (e.g. attention "
        f"heads) not divisible by the TP degree {ctx.degree}"
    )
    return None


def _expand_map(ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor) -> Placement | None:
    off = out.ndim - sv.ndim
    return shard(p.dim + off, p.groups) if out.shape[p.dim + off] == sv.shape[p.dim] else None


def _transpose_map(
    ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    node, op = ctx.node, op_name(ctx.node)
    if op == "t":
        perm = list(range(sv.ndim))[::-1]
    elif op == "permute":
        perm = [_norm_dim(d, sv.ndim) for d in _args(node)[1]]
    else:
        a, b = _norm_dim(_args(node)[1], sv.ndim), _norm_dim(_args(node)[2], sv.ndim)
        perm = list(range(sv.ndim))
        perm[a], perm[b] = perm[b], perm[a]
    return shard(perm.index(p.dim), p.groups)


def _slice_map(ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor) -> Placement | None:
    """slice / narrow / select / roll: fine along other dimensions (or a full slice)."""
    node, op = ctx.node, op_name(ctx.node)
    if op == "roll":
        raw = _arg(node, 2, "dims", [])
        dims: list[int] = [raw] if isinstance(raw, int) else list(raw)
        if not dims or p.dim in [_norm_dim(d, sv.ndim) for d in dims]:
            return None
        return p
    dim = _norm_dim(_arg(node, 1, "dim", 0), sv.ndim)
    if op == "select":
        return None if dim == p.dim else shard(p.dim - (dim < p.dim), p.groups)
    if dim == p.dim and out.shape[dim] != sv.shape[dim]:
        return None
    return p


def _repeat_interleave_map(
    ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor
) -> Placement | None:
    """``repeat_interleave(x, r, dim)``: each rank repeats its own slices (the GQA key/value heads:
    rank r's kv heads become exactly the q heads of rank r)."""
    dim = _arg(ctx.node, 2, "dim")
    if dim is None or not isinstance(_arg(ctx.node, 1, "repeats"), int):
        return None
    return p if out.ndim == sv.ndim else None


def _split_map(ctx: _Ctx, p: Placement, sv: torch.Tensor, out: torch.Tensor) -> Placement | None:
    """split / chunk: the placement of every part. Along the split dimension only equal parts
    whose count divides the groups (a fused QKV cut into q, k, v)."""
    node = ctx.node
    dim = _norm_dim(_arg(node, 2, "dim", 0), sv.ndim)
    if dim != p.dim:
        return p
    parts = _split_parts(node, sv)
    if not parts or p.groups % len(parts) != 0:
        # Only a reason when no grouped layout can exist: otherwise the producer offers one
        # (``_fused_groups``) and this ungrouped split is merely not the way to cut it.
        if parts and p.groups == 1 and parts[0] % ctx.degree:
            ctx.reasons.append(
                f"{_what(node)} of a split dimension into {len(parts)} parts needs the "
                f"interleaved layout of a fused projection, which needs each part ({parts[0]}) "
                f"divisible by the TP degree {ctx.degree}"
            )
        return None
    return shard(dim, p.groups // len(parts))


def _split_parts(node: Node, sv: torch.Tensor) -> list[int] | None:
    """Sizes of the equal parts a split/chunk cuts its dimension into (``None``: unequal)."""
    op = op_name(node)
    dim = _norm_dim(_arg(node, 2, "dim", 0), sv.ndim)
    size = sv.shape[dim]
    if op == "chunk":
        chunks = _args(node)[1]
        each = -(-size // chunks)
        parts = [each] * (size // each) + ([size % each] if size % each else [])
    elif op == "split":
        each = _args(node)[1]
        if not isinstance(each, int):
            return None
        parts = [each] * (size // each) + ([size % each] if size % each else [])
    elif op == "split_with_sizes":
        parts = list(_args(node)[1])
    else:
        return None
    return parts if len(set(parts)) == 1 else None


def _getitem(ctx: _Ctx) -> list[Strategy]:
    src = _args(ctx.node)[0]
    if not isinstance(src, Node) or op_name(src) not in _LIST_OUTPUTS:
        return []
    return [
        ctx.strategy("partial" if p == P else "shard", p, {0: p})
        for p in ctx.input_cands(src)
        if p != R
    ]


def _cat(ctx: _Ctx) -> list[Strategy]:
    node, out = ctx.node, _val(ctx.node)
    tensors = _args(node)[0]
    if out is None or not isinstance(tensors, (list, tuple)):
        return []
    if len(set(tensors)) != len(tensors) or not all(isinstance(t, Node) for t in tensors):
        return []
    dim = _norm_dim(_arg(node, 1, "dim", 0), out.ndim)
    vals = [_val(t) for t in tensors]
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


# -- reductions and normalisation ----------------------------------------------------------------


def _reduction(ctx: _Ctx) -> list[Strategy]:
    node, op = ctx.node, op_name(ctx.node)
    src = _args(node)[0]
    sv, out = _val(src), _val(node)
    if not isinstance(src, Node) or sv is None or out is None or len(ctx.inputs) != 1:
        return []
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        dims, keep = [_norm_dim(_args(node)[1], sv.ndim)], True
    else:
        raw = _arg(node, 1, "dim")
        if raw is None or raw == []:
            dims = list(range(sv.ndim))
        else:
            dims = [_norm_dim(d, sv.ndim) for d in ([raw] if isinstance(raw, int) else raw)]
        keep = bool(_arg(node, 2, "keepdim", False)) or out.ndim == sv.ndim
    found = []
    for p in ctx.input_cands(src):
        if p == P and op in ("sum", "mean") and out.is_floating_point():
            found.append(ctx.strategy("partial", P, {0: P}))
        elif p.is_shard and p.dim not in dims:
            k = p.dim if keep else p.dim - sum(d < p.dim for d in dims)
            found.append(ctx.strategy("shard", shard(k, p.groups), {0: p}))
    return found


def _norm(ctx: _Ctx) -> list[Strategy]:
    """layer_norm / rms_norm: any split outside the normalised (last) dimensions; the weight and
    bias stay replicated and get partial gradients (they are broadcast over the split)."""
    node = ctx.node
    x, shape = _args(node)[0], _args(node)[1]
    xv = _val(x)
    if not isinstance(x, Node) or xv is None:
        return []
    first_normed = xv.ndim - len(shape)
    found = []
    for p in ctx.input_cands(x):
        if p.is_shard and p.dim < first_normed:
            grads = {i: P for i, t in enumerate(ctx.inputs) if t is not x}
            found.append(ctx.strategy("shard", p, {ctx.slot(x): p}, grads))
    return found


_RULES: dict[str, Callable[[_Ctx], list[Strategy]]] = {
    "linear": _linear,
    "addmm": _linear,
    "mm": _matmul,
    "matmul": _matmul,
    "bmm": _matmul,
    "embedding": _embedding,
    "scaled_dot_product_attention": _sdpa,
    **dict.fromkeys(_RESHAPES, _single_input(_reshape_map)),
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
    "getitem": _getitem,
    "cat": _cat,
    **dict.fromkeys(
        ["sum", "mean", "amax", "amin", "softmax", "_softmax", "log_softmax", "_log_softmax"],
        _reduction,
    ),
    "layer_norm": _norm,
    "rms_norm": _norm,
}

RULE_OPS = frozenset(_RULES) | _POINTWISE
"""The aten op names with sharding rules (everything else runs replicated)."""


def cache_key(node: Node, cands: Mapping[Node, list[Placement]]) -> Any:
    """What a node's strategies depend on: its op, its non-tensor arguments, its output's shape,
    and each input's position, shape, candidate placements and op (``None``: do not cache)."""
    if node.op != "call_function":
        return None
    inputs = node.all_input_nodes

    def spec(a: Any) -> Any:
        if isinstance(a, Node):
            return (
                "node",
                inputs.index(a),
                _val_spec(a.meta.get("val")),
                tuple(cands[a]),
                op_name(a),
            )
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(spec(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, spec(v)) for k, v in a.items()))
        return ("value", repr(a))

    out = _val(node)
    fused = None
    if op_name(node) in ("linear", "addmm") and out is not None and out.ndim:
        fused = tuple(_fused_groups(node, out.shape[-1]))
    return (
        node.target,
        spec(_args(node)),
        spec(node.kwargs),
        _val_spec(node.meta.get("val")),
        fused,
    )


def _val_spec(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_val_spec(v) for v in val)
    return repr(val)


WEIGHT_SLOT = {"linear": 1, "addmm": 2, "mm": 1, "matmul": 1, "embedding": 0}
"""Argument position of the weight of each weight-matmul op."""


def weight_param(node: Node, slot: int) -> Node | None:
    """The ``get_attr`` parameter that argument ``slot`` of ``node`` is, or is a view of."""
    arg = _args(node)[slot] if slot < len(_args(node)) else None
    while isinstance(arg, Node) and arg.op == "call_function" and op_name(arg) in _WEIGHT_VIEWS:
        arg = _args(arg)[0]
    if isinstance(arg, Node) and arg.op == "get_attr":
        owner = arg.graph.owning_module
        if owner is not None and _is_parameter(owner, str(arg.target)):
            return arg
    return None


_WEIGHT_VIEWS = frozenset({"t", "transpose", "permute", "alias", "view", "reshape"})


def _is_parameter(gm: GraphModule, target: str) -> bool:
    prefix, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(prefix) if prefix else gm
    except AttributeError:
        return False
    return name in owner._parameters
