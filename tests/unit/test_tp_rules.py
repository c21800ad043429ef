"""Property tests of every TP sharding rule (``passes/tp/rules/``), one op at a time.

For a one-op fx graph with Hypothesis-drawn shapes, TP degree and candidate input placements, every
strategy :func:`node_strategies` offers is simulated rank by rank in one process: each input is
given to every rank in the placement the strategy reads it in (``P``: random parts that sum to it),
each rank runs the call :func:`~autopart.passes.tp.local.local_call` makes (the code ``shard_tp``
emits: local shape arguments, vocabulary-parallel embedding, row-parallel bias), and the ranks'
outputs, combined by the output placement, must equal the unsharded op. Backward: the output
gradient is placed as ``dual(output placement)``, every rank runs its local backward, and each
input's gradient, combined by the placement the runtime gives it (``_Rewriter._grad``: partial
for an input read ``R`` by a node whose output is not ``R``), must equal the unsharded gradient.
Every split the strategy uses must be divisible by the degree (otherwise no sharded strategy may
be offered), and for reshapes a strategy chosen at one batch size must stay exact at another (the
plan is made on the full batch and run on micro-batches).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from autopart.codegen.templates.collectives import shard, unshard
from autopart.passes.tp.local import local_call
from autopart.passes.tp.placements import P, Placement, R, Strategy, dual
from autopart.passes.tp.placements import shard as S
from autopart.passes.tp.rules import node_strategies, op_name
from autopart.passes.tp.shard import _Rewriter, tp_partial_bias

aten = torch.ops.aten
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(SETTINGS, max_examples=8)
"""For tests parametrized by op: every op is checked."""
DEGREES = st.sampled_from([2, 4])
TESTED: set[str] = set()
"""Op names checked by a property test (for the coverage test at the end)."""


# ---------------------------------------------------------------------------------------------
# one-op graphs


class In:
    """Marks argument positions holding the ``i``-th input tensor of a one-op graph."""

    def __init__(self, i: int) -> None:
        self.i = i


def build(
    target: Any,
    inputs: Sequence[torch.Tensor],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    then: Callable[[Graph, Node], list[Node]] | None = None,
) -> tuple[GraphModule, Node, list[Node]]:
    """The graph ``target(*args, **kwargs)`` of placeholders, plus the users ``then`` adds; every
    node's ``meta["val"]`` is its real value."""
    g = Graph()
    phs = [g.placeholder(f"x{i}") for i in range(len(inputs))]

    def sub(a: Any) -> Any:
        if isinstance(a, In):
            return phs[a.i]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    node = g.call_function(
        target, tuple(sub(a) for a in args), {k: sub(v) for k, v in (kwargs or {}).items()}
    )
    extra = then(g, node) if then is not None else []
    g.output((node, *extra))
    gm = GraphModule(torch.nn.Module(), g)
    env: dict[Node, Any] = {}
    feed = iter(inputs)
    for n in g.nodes:
        if n.op == "placeholder":
            env[n] = next(feed)
        elif n.op == "call_function":
            env[n] = n.target(
                *map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__)
            )
        else:
            continue
        n.meta["val"] = env[n]
    return gm, node, extra


# ---------------------------------------------------------------------------------------------
# placements of values on the simulated ranks


def _is_float(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_is_float(x) for x in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _first(v: Any) -> torch.Tensor:
    return v[0] if isinstance(v, (list, tuple)) else v


def _divisible(v: Any, p: Placement, d: int) -> bool:
    if not p.is_shard:
        return True
    return all(
        x.ndim > p.dim and x.shape[p.dim] % (p.groups * d) == 0
        for x in (v if isinstance(v, (list, tuple)) else [v])
    )


def _place(v: Any, p: Placement, d: int, gen: torch.Generator) -> list[Any]:
    """Every rank's piece of the whole value ``v`` (a tensor or a list of tensors)."""
    if isinstance(v, (list, tuple)):
        per = [_place(x, p, d, gen) for x in v]
        return [type(v)(x[r] for x in per) for r in range(d)]
    if p == R:
        return [v.clone() for _ in range(d)]
    if p == P:
        parts = [torch.randn(v.shape, generator=gen, dtype=v.dtype) for _ in range(d - 1)]
        return [*parts, v - sum(parts, torch.zeros_like(v))]
    return [shard(v, p.dim, p.groups, d, r) for r in range(d)]


def _combine(pieces: list[Any], p: Placement, full: Any, what: str) -> Any:
    """The whole value of the ranks' ``pieces`` placed ``p``; ``R`` pieces must all equal ``full``."""
    if isinstance(full, (list, tuple)):
        return [
            _combine([x[i] for x in pieces], p, full[i], f"{what}[{i}]") for i in range(len(full))
        ]
    if p == R:
        for r, x in enumerate(pieces):
            torch.testing.assert_close(
                x,
                full,
                atol=1e-9,
                rtol=1e-9,
                msg=lambda m, r=r: f"{what}: rank {r} differs from the whole ({p}): {m}",
            )
        return pieces[0]
    if p == P:
        return sum(pieces[1:], pieces[0])
    return unshard(pieces, p.dim, p.groups)


def _leaf(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return type(v)(_leaf(x) for x in v)
    v = v.detach().clone()
    return v.requires_grad_(True) if v.is_floating_point() else v


def _tensors(v: Any) -> list[torch.Tensor]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _grads(outs: Any, gouts: Any, leaves: list[Any]) -> list[Any]:
    """The gradient of every input (``None`` for integer ones)."""
    flat_leaves = [t for v in leaves for t in _tensors(v) if t.requires_grad]
    outs_l = [o for o in _tensors(outs) if o.requires_grad]
    gouts_l = [g for o, g in zip(_tensors(outs), _tensors(gouts)) if o.requires_grad]
    got: Sequence[Any] = [None] * len(flat_leaves)
    if outs_l and flat_leaves:
        got = torch.autograd.grad(outs_l, flat_leaves, gouts_l, allow_unused=True)
    it = iter(got)
    res = []
    for v in leaves:
        ts = _tensors(v)
        gs = [(next(it) if t.requires_grad else None) for t in ts]
        gs = [torch.zeros_like(t) if g is None and t.requires_grad else g for t, g in zip(ts, gs)]
        res.append(gs if isinstance(v, (list, tuple)) else gs[0])
    return res


# ---------------------------------------------------------------------------------------------
# the check


def plausible(v: Any, d: int, groups: Sequence[int] = (1,)) -> list[Placement]:
    """The placements a producer could give ``v``: ``R``, ``P`` (floating point), and every
    divisible split."""
    t = _first(v)
    found = [R] + ([P] if _is_float(v) else [])
    for k in range(t.ndim):
        for g in groups:
            if _divisible(v, S(k, g), d):
                found.append(S(k, g))
    return found


def check(
    node: Node,
    d: int,
    cands: dict[Node, list[Placement]] | None = None,
    *,
    seed: int = 0,
    groups: Sequence[int] = (1,),
    run_on: Node | None = None,
) -> list[Strategy]:
    """Simulate every strategy of ``node`` on ``d`` ranks (module docstring); return them.
    ``run_on``: the same op in a graph of another batch size, to run the strategies on."""
    TESTED.add(op_name(node))
    if cands is None:
        cands = {u: plausible(u.meta["val"], d, groups) for u in node.all_input_nodes}
    strategies = node_strategies(node, d, cands).strategies
    assert strategies[0].label == "replicate"
    target = run_on if run_on is not None else node
    for strategy in strategies:
        _simulate(target, strategy, d, seed)
    return list(strategies)


def _simulate(node: Node, st_: Strategy, d: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    inputs = node.all_input_nodes
    full_in = [_leaf(u.meta["val"]) for u in inputs]
    label = f"{node.format_node()} under {st_}"
    for u, p in zip(inputs, st_.inputs):
        assert _divisible(u.meta["val"], p, d), (
            f"{label}: input {u} read as {p} is not divisible by {d}"
        )
        assert p != P or _is_float(u.meta["val"]), f"{label}: integer input read as P"
    full_env = dict(zip(inputs, full_in))
    full_out = node.target(
        *map_arg(node.args, full_env.__getitem__), **map_arg(node.kwargs, full_env.__getitem__)
    )
    assert _divisible(full_out, st_.output, d), f"{label}: output {st_.output} not divisible by {d}"
    gout = [
        torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else None
        for t in _tensors(full_out)
    ]
    gout = gout if isinstance(full_out, (list, tuple)) else gout[0]
    full_grads = _grads(full_out, gout, full_in)

    placed = {
        u: _place(v.detach() if isinstance(v, torch.Tensor) else [x.detach() for x in v], p, d, gen)
        for u, v, p in zip(inputs, full_in, st_.inputs)
    }
    read_as = dict(zip(inputs, st_.inputs))
    outs, local_grads = [], []
    for r in range(d):
        env = {u: _leaf(placed[u][r]) for u in inputs}
        args = map_arg(node.args, env.__getitem__)
        kwargs = dict(map_arg(node.kwargs, env.__getitem__))
        call = local_call(node, args, kwargs, st_.output, lambda u: read_as.get(u), d, r)
        out = call.target(*call.args, **call.kwargs)
        if call.row_bias is not None:
            out = tp_partial_bias(out, *call.row_bias)
        outs.append(out)
        g_p = dual(st_.output)
        g_local = gout if g_p == R else _place_grad(gout, g_p, d, r)
        local_grads.append(_grads(out, g_local, [env[u] for u in inputs]))
    got = _combine(
        outs,
        st_.output,
        full_out.detach() if isinstance(full_out, torch.Tensor) else [x.detach() for x in full_out],
        f"{label}: output",
    )
    _close(got, full_out, f"{label}: output")
    for i, u in enumerate(inputs):
        if full_grads[i] is None or not _is_float(u.meta["val"]):
            continue
        eff = _Rewriter._grad(None, node, u, st_.inputs[i], st_.output)  # type: ignore[arg-type]
        # the ILP costs the gradient the strategy declares: it must be the one the runtime makes
        assert st_.grads[i] == eff, (
            f"{label}: gradient of {u} declared {st_.grads[i]}, runtime {eff}"
        )
        pieces = [lg[i] for lg in local_grads]
        g = _combine(pieces, eff, full_grads[i], f"{label}: gradient of {u} ({eff})")
        _close(g, full_grads[i], f"{label}: gradient of input {u} combined as {eff}")


def _place_grad(g: Any, p: Placement, d: int, r: int) -> Any:
    if isinstance(g, (list, tuple)):
        return [None if x is None else shard(x, p.dim, p.groups, d, r) for x in g]
    return shard(g, p.dim, p.groups, d, r)


def _close(got: Any, want: Any, what: str) -> None:
    for i, (a, b) in enumerate(zip(_tensors(got), _tensors(want))):
        torch.testing.assert_close(
            a.detach(), b.detach(), atol=1e-8, rtol=1e-8, msg=lambda m, i=i: f"{what} [{i}]: {m}"
        )


def _sharded(strategies: list[Strategy]) -> list[Strategy]:
    return [s for s in strategies if s.label != "replicate"]


def rand(gen_seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64
    )


SIZES = st.sampled_from([1, 2, 3, 4, 6, 8, 12])
SMALL = st.sampled_from([1, 2, 3, 4])
SEEDS = st.integers(0, 2**16)


def _only_replicated(strategies: list[Strategy]) -> bool:
    return not _sharded(strategies)


# ---------------------------------------------------------------------------------------------
# weight matmuls


@SETTINGS
@given(
    d=DEGREES,
    b=SMALL,
    s=SMALL,
    k=SIZES,
    n=SIZES,
    bias=st.booleans(),
    fused=st.booleans(),
    seed=SEEDS,
)
def test_linear(d: int, b: int, s: int, k: int, n: int, bias: bool, fused: bool, seed: int) -> None:
    n = 3 * n if fused else n
    ins = [rand(seed, b, s, k), rand(seed + 1, n, k), rand(seed + 2, n)][: 2 + bias]
    then = (
        (lambda g, node: [g.call_function(aten.split.Tensor, (node, n // 3, -1))])
        if fused
        else None
    )
    _, node, _ = build(aten.linear.default, ins, [In(i) for i in range(len(ins))], then=then)
    found = check(node, d, seed=seed, groups=(1, 3))
    labels = {s_.label for s_ in found}
    assert ("col" in labels) == (n % d == 0 or (fused and n % (3 * d) == 0))
    assert ("row" in labels) == (k % d == 0)
    if fused and n % (3 * d) == 0:
        assert any(s_.output == S(2, 3) for s_ in found)


@SETTINGS
@given(d=DEGREES, m=SIZES, k=SIZES, n=SIZES, seed=SEEDS)
def test_addmm(d: int, m: int, k: int, n: int, seed: int) -> None:
    ins = [rand(seed, n), rand(seed + 1, m, k), rand(seed + 2, k, n)]
    _, node, _ = build(aten.addmm.default, ins, [In(0), In(1), In(2)])
    found = check(node, d, seed=seed)
    assert {s_.label for s_ in found} == {"replicate"} | ({"col"} if n % d == 0 else set()) | (
        {"row"} if k % d == 0 else set()
    )


@SETTINGS
@given(
    d=DEGREES,
    op=st.sampled_from(["mm", "matmul3", "matmul4", "bmm"]),
    b=SIZES,
    m=SMALL,
    k=SIZES,
    n=SIZES,
    seed=SEEDS,
)
def test_matmuls(d: int, op: str, b: int, m: int, k: int, n: int, seed: int) -> None:
    if op == "mm":
        target, a, w = aten.mm.default, rand(seed, m, k), rand(seed + 1, k, n)
    elif op == "matmul3":
        target, a, w = aten.matmul.default, rand(seed, b, m, k), rand(seed + 1, k, n)
    elif op == "matmul4":
        target, a, w = aten.matmul.default, rand(seed, 3, b, m, k), rand(seed + 1, 3, b, k, n)
    else:
        target, a, w = aten.bmm.default, rand(seed, b, m, k), rand(seed + 1, b, k, n)
    _, node, _ = build(target, [a, w], [In(0), In(1)])
    found = check(node, d, seed=seed)
    if op in ("matmul4", "bmm") and b % d == 0 and b > 1:
        dim = 1 if op == "matmul4" else 0
        assert any(s_.output == S(dim) for s_ in found), "batch-dimension (heads) shard missing"
    if n % d and k % d and (op in ("mm", "matmul3") or b % d):
        assert _only_replicated(found)


@SETTINGS
@given(d=DEGREES, v=SIZES, e=SIZES, b=SMALL, s=SMALL, pad=st.booleans(), seed=SEEDS)
def test_embedding(d: int, v: int, e: int, b: int, s: int, pad: bool, seed: int) -> None:
    ids = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(seed))
    args: list[Any] = [In(0), In(1)] + ([v - 1] if pad else [])
    _, node, _ = build(aten.embedding.default, [rand(seed, v, e), ids], args)
    found = check(node, d, seed=seed)
    labels = {s_.label for s_ in found}
    assert ("row" in labels) == (v % d == 0) and ("col" in labels) == (e % d == 0)


# ---------------------------------------------------------------------------------------------
# attention


@SETTINGS
@given(
    d=DEGREES,
    b=SMALL,
    hkv=SIZES,
    rep=st.sampled_from([1, 2]),
    s=SMALL,
    dh=SMALL,
    mask=st.sampled_from([None, "full", "batch", "heads", "2d"]),
    causal=st.booleans(),
    seed=SEEDS,
)
def test_sdpa(
    d: int, b: int, hkv: int, rep: int, s: int, dh: int, mask: str | None, causal: bool, seed: int
) -> None:
    h = hkv * rep
    ins = [rand(seed, b, h, s, dh), rand(seed + 1, b, hkv, s, dh), rand(seed + 2, b, hkv, s, dh)]
    kwargs: dict[str, Any] = {}
    if mask is not None:
        shape = {"full": (b, h, s, s), "batch": (b, 1, s, s), "heads": (h, s, s), "2d": (s, s)}[
            mask
        ]
        ins.append(rand(seed + 3, *shape))
        kwargs["attn_mask"] = In(3)
    elif causal:
        kwargs["is_causal"] = True
    if rep > 1:
        kwargs["enable_gqa"] = True
    _, node, _ = build(
        aten.scaled_dot_product_attention.default, ins, [In(0), In(1), In(2)], kwargs
    )
    found = check(node, d, seed=seed)
    assert (not _only_replicated(found)) == (h % d == 0 and hkv % d == 0)


# ---------------------------------------------------------------------------------------------
# pointwise

UNARY = [
    (aten.relu.default, ()),
    (aten.gelu.default, ()),
    (aten.exp.default, ()),
    (aten.tanh.default, ()),
    (aten.neg.default, ()),
    (aten.sigmoid.default, ()),
    (aten.silu.default, ()),
    (aten.sin.default, ()),
    (aten.erf.default, ()),
    (aten.square.default, ()),
    (aten.clone.default, ()),
    (aten.alias.default, ()),
    (aten.detach.default, ()),
    (aten.mul.Scalar, (2.5,)),
    (aten.div.Scalar, (4.0,)),
    (aten.add.Tensor, (1.5,)),
    (aten.pow.Tensor_Scalar, (2,)),
    (aten.clamp.default, (-0.5, 0.5)),
    (aten.leaky_relu.default, (0.1,)),
    (aten.dropout.default, (0.0, False)),
    (aten._to_copy.default, ()),
]
BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default]


def _broadcast_shape(draw: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with some dimensions 1 and maybe some leading ones dropped."""
    out = tuple(1 if draw(st.booleans()) else s for s in shape)
    return out[draw(st.integers(0, len(out))) :]


@pytest.mark.parametrize("op", UNARY, ids=lambda o: str(o[0]))
@FEW
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), seed=SEEDS)
def test_pointwise_unary(d: int, shape: list[int], op: Any, seed: int) -> None:
    target, extra = op
    _, node, _ = build(target, [rand(seed, *shape)], [In(0), *extra])
    check(node, d, seed=seed)


@pytest.mark.parametrize("op", BINARY, ids=str)
@FEW
@given(
    d=DEGREES,
    data=st.data(),
    shape=st.lists(SIZES, min_size=1, max_size=4),
    swap=st.booleans(),
    seed=SEEDS,
)
def test_pointwise_binary_broadcasting(
    d: int, data: Any, shape: list[int], op: Any, swap: bool, seed: int
) -> None:
    other = _broadcast_shape(data.draw, tuple(shape))
    a, b = rand(seed, *shape), rand(seed + 1, *other)
    if op is aten.div.Tensor:
        b = b.exp() + 0.5
    ins = [b, a] if swap and op is not aten.div.Tensor else [a, b]
    _, node, _ = build(op, ins, [In(0), In(1)])
    check(node, d, seed=seed)


@SETTINGS
@given(d=DEGREES, b=SMALL, h=SIZES, s=SIZES, bias=st.sampled_from(["h11", "1s", "hss"]), seed=SEEDS)
def test_alibi_bias_added_to_head_split_scores(
    d: int, b: int, h: int, s: int, bias: str, seed: int
) -> None:
    shape = {"h11": (h, 1, 1), "1s": (1, s), "hss": (h, s, s)}[bias]
    _, node, _ = build(
        aten.add.Tensor, [rand(seed, b, h, s, s), rand(seed + 1, *shape)], [In(0), In(1)]
    )
    x = node.all_input_nodes[0]
    found = check(node, d, {x: [R, S(1), P], node.all_input_nodes[1]: [R]}, seed=seed)
    if h % d == 0:
        assert any(s_.output == S(1) for s_ in found)


@pytest.mark.parametrize("op", ["where", "masked_fill", "addcmul", "lerp"])
@FEW
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), data=st.data(), seed=SEEDS)
def test_pointwise_ternary(d: int, shape: list[int], data: Any, op: str, seed: int) -> None:
    other = _broadcast_shape(data.draw, tuple(shape))
    x = rand(seed, *shape)
    cond = torch.rand(other, generator=torch.Generator().manual_seed(seed)) > 0.5
    if op == "where":
        _, node, _ = build(
            aten.where.self, [cond, x, rand(seed + 1, *other)], [In(0), In(1), In(2)]
        )
    elif op == "masked_fill":
        _, node, _ = build(aten.masked_fill.Scalar, [x, cond], [In(0), In(1), -1.0])
    elif op == "addcmul":
        _, node, _ = build(
            aten.addcmul.default,
            [x, rand(seed + 1, *other), rand(seed + 2, *shape)],
            [In(0), In(1), In(2)],
            {"value": 0.5},
        )
    else:
        _, node, _ = build(aten.lerp.Scalar, [x, rand(seed + 1, *other)], [In(0), In(1), 0.25])
    check(node, d, seed=seed)


# ---------------------------------------------------------------------------------------------
# layout ops


@st.composite
def regroupings(draw: Any) -> tuple[list[int], list[int], list[int]]:
    """Atoms (the first one the batch), and two ways to group them into dims (each a list of
    group lengths): merges, splits and regroupings of adjacent dimensions."""
    atoms = draw(st.lists(SIZES, min_size=2, max_size=4))

    def cut() -> list[int]:
        lens, cur = [], 1
        for _ in atoms[1:]:
            if draw(st.booleans()):
                lens.append(cur)
                cur = 1
            else:
                cur += 1
        return [*lens, cur]

    return atoms, cut(), cut()


def _shape(atoms: list[int], lens: list[int]) -> list[int]:
    out, i = [], 0
    for n in lens:
        out.append(int(torch.tensor(atoms[i : i + n]).prod()))
        i += n
    return out


@SETTINGS
@given(
    d=DEGREES,
    case=regroupings(),
    op=st.sampled_from(["view", "reshape", "_unsafe_view"]),
    b2=SIZES,
    ones=st.booleans(),
    seed=SEEDS,
)
def test_reshapes(d: int, case: Any, op: str, b2: int, ones: bool, seed: int) -> None:
    """Every strategy is exact, and still exact when run at another batch size (the first atom):
    the plan is made on the whole batch and run on micro-batches."""
    atoms, lens_in, lens_out = case
    target = getattr(aten, op).default

    def graph(batch: int) -> Node:
        a = [batch, *atoms[1:]]
        out = _shape(a, lens_out) + ([1] if ones else [])
        _, node, _ = build(target, [rand(seed, *_shape(a, lens_in))], [In(0), out])
        return node

    node = graph(atoms[0])
    check(node, d, seed=seed, groups=(1, 3))
    # activations are never split on a dimension holding the batch (the first one)
    cands = {
        u: [p for p in plausible(u.meta["val"], d, (1, 3)) if p.dim != 0 or not p.is_shard]
        for u in node.all_input_nodes
    }
    if atoms[0] == 1:
        return  # a plan made at batch 1 runs at batch 1 only
    other = graph(b2)
    for st_ in _sharded(node_strategies(node, d, cands).strategies):
        if all(_divisible(u.meta["val"], p, d) for u, p in zip(other.all_input_nodes, st_.inputs)):
            _simulate(other, st_, d, seed)


@SETTINGS
@given(
    d=DEGREES,
    b=st.sampled_from([2, 3, 4]),
    b2=st.sampled_from([1, 2, 3, 5]),
    h=st.sampled_from([2, 4, 8]),
    s=SMALL,
    seed=SEEDS,
)
def test_alibi_merge_of_batch_and_heads_is_not_sharded(
    d: int, b: int, b2: int, h: int, s: int, seed: int
) -> None:
    """(B, H, S, S) -> (B*H, S, S) with the heads split: exact at batch B only with groups=B, so no
    sharded strategy (DTensor: a merged dim is split only on its outermost factor)."""
    _, node, _ = build(aten.view.default, [rand(seed, b, h, s, s)], [In(0), [b * h, s, s]])
    found = check(node, d, {node.all_input_nodes[0]: [R, P, S(1)]}, seed=seed)
    assert not [s_ for s_ in found if s_.output.is_shard], found
    # the heads outermost is fine: (H, B, S, S) -> (H*B, S, S)
    _, node, _ = build(aten.view.default, [rand(seed, h, b, s, s)], [In(0), [h * b, s, s]])
    found = check(node, d, {node.all_input_nodes[0]: [R, P] + [S(0)] * (h % d == 0)}, seed=seed)
    assert (S(0) in [s_.output for s_ in found]) == (h % d == 0)


@SETTINGS
@given(d=DEGREES, shape=st.lists(SIZES, min_size=2, max_size=4), data=st.data(), seed=SEEDS)
def test_flatten_unflatten_squeeze_unsqueeze(
    d: int, shape: list[int], data: Any, seed: int
) -> None:
    x = rand(seed, *shape)
    n = len(shape)
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start, n - 1))
    _, node, _ = build(aten.flatten.using_ints, [x], [In(0), start, end])
    check(node, d, seed=seed, groups=(1, 3))
    dim = data.draw(st.integers(0, n - 1))
    parts = data.draw(
        st.sampled_from(
            [[1, shape[dim]], [shape[dim], 1], [shape[dim]]]
            + ([[3, shape[dim] // 3]] if shape[dim] % 3 == 0 else [])
            + ([[2, shape[dim] // 2]] if shape[dim] % 2 == 0 else [])
        )
    )
    _, node, _ = build(aten.unflatten.int, [x], [In(0), dim - n * data.draw(st.booleans()), parts])
    check(node, d, seed=seed, groups=(1, 3))
    _, node, _ = build(aten.unsqueeze.default, [x], [In(0), data.draw(st.integers(-n - 1, n))])
    check(node, d, seed=seed)
    y = rand(seed, *shape[:dim], 1, *shape[dim:])
    _, node, _ = build(aten.squeeze.dim, [y], [In(0), dim])
    check(node, d, seed=seed)


@SETTINGS
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), data=st.data(), seed=SEEDS)
def test_expand(d: int, shape: list[int], data: Any, seed: int) -> None:
    small = _broadcast_shape(data.draw, tuple(shape))
    sizes = [
        (-1 if data.draw(st.booleans()) and s == small[i - len(shape) + len(small)] else s)
        if i >= len(shape) - len(small)
        else s
        for i, s in enumerate(shape)
    ]
    _, node, _ = build(aten.expand.default, [rand(seed, *small)], [In(0), sizes])
    check(node, d, seed=seed)


@SETTINGS
@given(d=DEGREES, shape=st.lists(SIZES, min_size=2, max_size=4), data=st.data(), seed=SEEDS)
def test_transpose_t_permute(d: int, shape: list[int], data: Any, seed: int) -> None:
    n, x = len(shape), rand(seed, *shape)
    a, b = data.draw(st.integers(-n, n - 1)), data.draw(st.integers(-n, n - 1))
    _, node, _ = build(aten.transpose.int, [x], [In(0), a, b])
    check(node, d, seed=seed, groups=(1, 3))
    _, node, _ = build(aten.permute.default, [x], [In(0), data.draw(st.permutations(range(n)))])
    check(node, d, seed=seed, groups=(1, 3))
    _, node, _ = build(aten.t.default, [rand(seed, *shape[:2])], [In(0)])
    check(node, d, seed=seed)


@SETTINGS
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), data=st.data(), seed=SEEDS)
def test_slice_narrow_select_roll(d: int, shape: list[int], data: Any, seed: int) -> None:
    n, x = len(shape), rand(seed, *shape)
    dim = data.draw(st.integers(0, n - 1))
    size = shape[dim]
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.sampled_from([size, 2**63 - 1, max(start + 1, size - 1)]))
    _, node, _ = build(
        aten.slice.Tensor, [x], [In(0), dim, start, end, data.draw(st.sampled_from([1, 2]))]
    )
    check(node, d, seed=seed, groups=(1, 3))
    _, node, _ = build(
        aten.narrow.default, [x], [In(0), dim, start, data.draw(st.integers(1, size - start))]
    )
    check(node, d, seed=seed, groups=(1, 3))
    _, node, _ = build(aten.select.int, [x], [In(0), dim - n * data.draw(st.booleans()), start])
    check(node, d, seed=seed, groups=(1, 3))
    dims = data.draw(st.sampled_from([[dim], [], [dim, (dim + 1) % n]] if n > 1 else [[dim], []]))
    _, node, _ = build(aten.roll.default, [x], [In(0), [1] * max(1, len(dims)), dims])
    check(node, d, seed=seed)


@SETTINGS
@given(
    d=DEGREES,
    b=SMALL,
    hkv=SIZES,
    rep=st.sampled_from([1, 2, 3]),
    s=SMALL,
    out_size=st.booleans(),
    seed=SEEDS,
)
def test_repeat_interleave_gqa(
    d: int, b: int, hkv: int, rep: int, s: int, out_size: bool, seed: int
) -> None:
    kwargs = {"output_size": hkv * rep} if out_size else {}
    _, node, _ = build(
        aten.repeat_interleave.self_int, [rand(seed, b, hkv, s, 2)], [In(0), rep, 1], kwargs
    )
    found = check(node, d, seed=seed)
    if hkv % d == 0:
        assert S(1) in [s_.output for s_ in found]


# ---------------------------------------------------------------------------------------------
# split / chunk / getitem / cat, fused QKV


def _getitems(n: int) -> Callable[[Graph, Node], list[Node]]:
    return lambda g, node: [g.call_function(operator.getitem, (node, i)) for i in range(n)]


@SETTINGS
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=1, max_size=3),
    data=st.data(),
    op=st.sampled_from(["split", "split_with_sizes", "chunk"]),
    seed=SEEDS,
)
def test_split_chunk_getitem(d: int, shape: list[int], data: Any, op: str, seed: int) -> None:
    n, x = len(shape), rand(seed, *shape)
    dim = data.draw(st.integers(0, n - 1))
    size = shape[dim]
    divisors = [k for k in range(1, size + 1) if size % k == 0]
    parts = data.draw(st.sampled_from(divisors))
    neg = data.draw(st.booleans())
    if op == "split":
        each = data.draw(st.sampled_from([size // parts, max(1, size // parts + 1)]))
        count = -(-size // each)
        args = [In(0), each, dim - n * neg]
        target = aten.split.Tensor
    elif op == "split_with_sizes":
        count, args, target = (
            parts,
            [In(0), [size // parts] * parts, dim - n * neg],
            aten.split_with_sizes.default,
        )
    else:
        count, args, target = (
            len(torch.chunk(x, parts, dim)),
            [In(0), parts, dim - n * neg],
            aten.chunk.default,
        )
    _, node, items = build(target, [x], args, then=_getitems(count))
    check(node, d, seed=seed, groups=(1, 2, 3))
    cands = {u: plausible(u.meta["val"], d, (1, 2, 3)) for u in node.all_input_nodes}
    outs = {s_.output for s_ in node_strategies(node, d, cands).strategies}
    check(items[-1], d, {node: sorted(outs)}, seed=seed)


@SETTINGS
@given(
    d=DEGREES,
    b=SMALL,
    s=SMALL,
    e=SMALL,
    h=SIZES,
    dh=SMALL,
    layout=st.sampled_from(["concat-split", "concat-view", "interleaved"]),
    seed=SEEDS,
)
def test_fused_qkv_both_layouts(
    d: int, b: int, s: int, e: int, h: int, dh: int, layout: str, seed: int
) -> None:
    """A fused QKV projection cut into q, k and v, node by node, each with the placements its
    producer's strategies give: [q; k; v] (groups=3, then split / view (B,S,3,H,D)) and the
    per-head interleaved [q1 k1 v1 q2 ...] (view (B,S,H,3D) with H split, then split)."""
    hid = h * dh
    ins = [rand(seed, b, s, e), rand(seed + 1, 3 * hid, e), rand(seed + 2, 3 * hid)]

    def then(g: Graph, lin: Node) -> list[Node]:
        if layout == "concat-split":
            sp = g.call_function(aten.split.Tensor, (lin, hid, -1))
            q = g.call_function(operator.getitem, (sp, 0))
            return [sp, q, g.call_function(aten.view.default, (q, [b, s, h, dh]))]
        if layout == "concat-view":
            return [g.call_function(aten.view.default, (lin, [b, s, 3, h, dh]))]
        v = g.call_function(aten.view.default, (lin, [b, s, h, 3 * dh]))
        sp = g.call_function(aten.split.Tensor, (v, dh, -1))
        return [v, sp, g.call_function(operator.getitem, (sp, 1))]

    _, lin, chain = build(aten.linear.default, ins, [In(0), In(1), In(2)], then=then)
    cands: dict[Node, list[Placement]] = {u: [R] for u in lin.all_input_nodes}
    places = {s_.output for s_ in check(lin, d, cands, seed=seed)}
    for node in chain:
        src = node.all_input_nodes[0]
        cands = {src: sorted(places)}
        places = {s_.output for s_ in check(node, d, cands, seed=seed)}
    sharded = {p for p in places if p.is_shard}
    if h % d == 0:  # the heads of q (k, v) end up split
        head_dim = {"concat-split": 2, "concat-view": 3, "interleaved": 2}[layout]
        assert S(head_dim) in sharded, (layout, places)


@SETTINGS
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=1, max_size=3),
    data=st.data(),
    k=st.sampled_from([2, 3]),
    seed=SEEDS,
)
def test_cat(d: int, shape: list[int], data: Any, k: int, seed: int) -> None:
    n = len(shape)
    dim = data.draw(st.integers(0, n - 1))
    equal = data.draw(st.booleans())
    ins = []
    for i in range(k):
        sh = list(shape)
        if not equal:
            sh[dim] = data.draw(SIZES)
        ins.append(rand(seed + i, *sh))
    _, node, _ = build(
        aten.cat.default, ins, [[In(i) for i in range(k)], dim - n * data.draw(st.booleans())]
    )
    check(node, d, seed=seed, groups=(1, 3))


# ---------------------------------------------------------------------------------------------
# reductions and norms

REDUCTIONS = [
    "sum",
    "mean",
    "amax",
    "amin",
    "sum_all",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
]


@pytest.mark.parametrize("op", REDUCTIONS)
@FEW
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), data=st.data(), seed=SEEDS)
def test_reductions(d: int, shape: list[int], data: Any, op: str, seed: int) -> None:
    n, x = len(shape), rand(seed, *shape)
    dim = data.draw(st.integers(-n, n - 1))
    keep = data.draw(st.booleans())
    if op in ("sum", "mean"):
        dims = data.draw(st.lists(st.integers(0, n - 1), unique=True, min_size=1, max_size=n))
        target, args = (aten.sum.dim_IntList if op == "sum" else aten.mean.dim), [In(0), dims, keep]
    elif op in ("amax", "amin"):
        dims = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
        target, args = getattr(aten, op).default, [In(0), dims, keep]
    elif op == "sum_all":
        target, args = aten.sum.default, [In(0)]
    elif op.startswith("_"):
        target, args = getattr(aten, op).default, [In(0), dim, False]
    else:
        target, args = getattr(aten, op).int, [In(0), dim]
    _, node, _ = build(target, [x], args)
    check(node, d, seed=seed, groups=(1, 3))


@SETTINGS
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=2, max_size=3),
    normed=st.sampled_from([1, 2]),
    op=st.sampled_from(["layer_norm", "layer_norm_no_affine", "rms_norm"]),
    seed=SEEDS,
)
def test_norms(d: int, shape: list[int], normed: int, op: str, seed: int) -> None:
    normed = min(normed, len(shape) - 1)
    ns = shape[-normed:]
    x, w, b = rand(seed, *shape), rand(seed + 1, *ns), rand(seed + 2, *ns)
    if op == "layer_norm":
        _, node, _ = build(aten.layer_norm.default, [x, w, b], [In(0), ns, In(1), In(2), 1e-5])
    elif op == "layer_norm_no_affine":
        _, node, _ = build(aten.layer_norm.default, [x], [In(0), ns, None, None, 1e-5])
    else:
        _, node, _ = build(aten.rms_norm.default, [x, w], [In(0), ns, In(1), 1e-6])
    found = check(node, d, seed=seed)
    if any(s % d == 0 for s in shape[:-normed]):
        assert _sharded(found)
