"""Property tests of the TP sharding rules (``passes/tp/rules/``) other than the pointwise family
(``test_tp_rules_pointwise.py``), one op at a time, by the one-process simulation of
``tests/_tp_rule_check.py``: Hypothesis draws shapes, degrees 2 and 4 and the candidate placements
of the inputs, and every strategy the rule offers must give the unsharded op's output and input
gradients. For reshapes, a strategy chosen at one batch size must stay exact at another (the plan
is made on the full batch and run on micro-batches). Each test declares the ops it checks
(``covers``); ``test_tp_rules_coverage.py`` requires every registered rule to be declared.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.fx import Graph, Node

from autopart.passes.tp.placements import P, Placement, R
from autopart.passes.tp.placements import shard as S
from autopart.passes.tp.rules import node_strategies
from tests._tp_rule_check import (
    DEGREES,
    FEW,
    SEEDS,
    SETTINGS,
    SIZES,
    SMALL,
    In,
    broadcast_shape,
    build,
    check,
    covers,
    divisible,
    only_replicated,
    plausible,
    rand,
    sharded,
    simulate,
)

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# weight matmuls


@covers("linear")
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


def _grouped_inputs(op: Any, seed: int, counts: list[int], k: int, n: int) -> list[torch.Tensor]:
    """``x[rows, k]``, stacked weights ``[E, k, n]`` and the offsets (cumulative rows per
    expert); float32 and int32 for ``aten._grouped_mm``, which runs only those on CPU."""
    offs = torch.tensor(counts).cumsum(0)
    x, w = rand(seed, int(offs[-1]), k), rand(seed + 1, len(counts), k, n)
    if op is aten._grouped_mm.default:
        return [x.float(), w.float(), offs.int()]
    return [x, w, offs]


def _grouped_ops() -> list[Any]:
    # importing transformers' MoE integration registers transformers::grouped_mm_fallback
    pytest.importorskip("transformers.integrations.moe")
    return [torch.ops.transformers.grouped_mm_fallback.default, aten._grouped_mm.default]


@pytest.mark.parametrize(
    "which",
    [
        pytest.param(0, marks=covers("grouped_mm_fallback"), id="grouped_mm_fallback"),
        pytest.param(1, marks=covers("_grouped_mm"), id="_grouped_mm"),
    ],
)
@FEW
@given(
    d=DEGREES,
    counts=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    k=st.sampled_from([4, 8, 12]),
    n=st.sampled_from([4, 8, 16]),
    fused=st.booleans(),
    seed=SEEDS,
)
def test_grouped_expert_matmul(
    which: int, d: int, counts: list[int], k: int, n: int, fused: bool, seed: int
) -> None:
    # every expert's rows times its own weight; a fused gate / up (cut in halves after the
    # matmul) splits in two groups, so each half keeps its own part
    op = _grouped_ops()[which]
    if op is aten._grouped_mm.default:  # float32 on CPU, strides multiples of 16 bytes
        k, n = 4 * d * (1 + k // 4 % 2), 4 * d * (1 + n // 4 % 2)  # short sums: float32 rounding
    n = 2 * n if fused else n
    ins = _grouped_inputs(op, seed, counts, k, n)
    then = (lambda g, node: [g.call_function(aten.chunk.default, (node, 2, -1))]) if fused else None
    _, node, _ = build(op, ins, [In(0), In(1), In(2)], then=then)
    found = check(node, d, seed=seed, groups=(1, 2))
    labels = {s_.label for s_ in found}
    assert ("col" in labels) == (n % d == 0 or (fused and n % (2 * d) == 0))
    assert ("row" in labels) == (k % d == 0)
    if fused and n % (2 * d) == 0:
        assert any(s_.output == S(1, 2) for s_ in found)
    assert all(not p.is_shard or p.dim != 0 for s_ in found for p in (s_.output, *s_.inputs[:1]))


@covers("addmm")
@SETTINGS
@given(d=DEGREES, m=SIZES, k=SIZES, n=SIZES, seed=SEEDS)
def test_addmm(d: int, m: int, k: int, n: int, seed: int) -> None:
    ins = [rand(seed, n), rand(seed + 1, m, k), rand(seed + 2, k, n)]
    _, node, _ = build(aten.addmm.default, ins, [In(0), In(1), In(2)])
    found = check(node, d, seed=seed)
    assert {s_.label for s_ in found} == {"replicate"} | ({"col"} if n % d == 0 else set()) | (
        {"row"} if k % d == 0 else set()
    )


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, marks=covers(name))
        for op, name in [("mm", "mm"), ("matmul3", "matmul"), ("matmul4", "matmul"), ("bmm", "bmm")]
    ],
)
@FEW
@given(
    d=DEGREES,
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
        assert only_replicated(found)


@covers("embedding")
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


@covers("scaled_dot_product_attention")
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
    assert (not only_replicated(found)) == (h % d == 0 and hkv % d == 0)


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


@pytest.mark.parametrize(
    "op", [pytest.param(op, marks=covers(op)) for op in ["view", "reshape", "_unsafe_view"]]
)
@FEW
@given(
    d=DEGREES,
    case=regroupings(),
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
    for st_ in sharded(node_strategies(node, d, cands).strategies):
        if all(divisible(u.meta["val"], p, d) for u, p in zip(other.all_input_nodes, st_.inputs)):
            simulate(other, st_, d, seed)


@covers("view")
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


@covers("flatten", "unflatten", "unsqueeze", "squeeze")
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


@covers("expand")
@SETTINGS
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), data=st.data(), seed=SEEDS)
def test_expand(d: int, shape: list[int], data: Any, seed: int) -> None:
    small = broadcast_shape(data.draw, tuple(shape))
    sizes = [
        (-1 if data.draw(st.booleans()) and s == small[i - len(shape) + len(small)] else s)
        if i >= len(shape) - len(small)
        else s
        for i, s in enumerate(shape)
    ]
    _, node, _ = build(aten.expand.default, [rand(seed, *small)], [In(0), sizes])
    check(node, d, seed=seed)


@covers("transpose", "permute", "t")
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


@covers("slice", "narrow", "select", "roll")
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


@covers("repeat_interleave")
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


@pytest.mark.parametrize(
    "op", [pytest.param(op, marks=covers(op)) for op in ["split", "split_with_sizes", "chunk"]]
)
@covers("getitem")
@FEW
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=1, max_size=3),
    data=st.data(),
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


@covers("linear", "view")
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


@covers("cat")
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


@covers("index_add")
@SETTINGS
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=1, max_size=3),
    data=st.data(),
    rows=SIZES,
    seed=SEEDS,
)
def test_index_add(d: int, shape: list[int], data: Any, rows: int, seed: int) -> None:
    # how an MoE layer scatters an expert's rows back to their tokens (repeated indices add up)
    n = len(shape)
    dim = data.draw(st.integers(0, n - 1))
    index = torch.randint(0, shape[dim], (rows,), generator=torch.Generator().manual_seed(seed))
    source = [*shape[:dim], rows, *shape[dim + 1 :]]
    ins = [rand(seed, *shape), index, rand(seed + 1, *source)]
    _, node, _ = build(
        aten.index_add.default, ins, [In(0), dim - n * data.draw(st.booleans()), In(1), In(2)]
    )
    outputs = {s.output for s in check(node, d, seed=seed)}
    assert P in outputs  # the sum of the ranks' partial destinations and sources
    assert all(not p.is_shard or p.dim != dim for p in outputs)  # never the indexed dimension


def test_an_moe_layer_accumulates_expert_partial_sums_from_zeros() -> None:
    # zeros_like may start a partial sum (zero is every rank's part of zero), so the experts'
    # row-parallel outputs are added up (index_add) before one all-reduce of the layer
    x = rand(0, 6, 4)
    _, node, _ = build(aten.zeros_like.default, [x], [In(0)])
    assert P in {s.output for s in check(node, 2)}


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


@pytest.mark.parametrize(
    "op", [pytest.param(op, marks=covers(op.removesuffix("_all"))) for op in REDUCTIONS]
)
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


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, marks=covers(op.removesuffix("_no_affine")))
        for op in ["layer_norm", "layer_norm_no_affine", "rms_norm"]
    ],
)
@FEW
@given(
    d=DEGREES,
    shape=st.lists(SIZES, min_size=2, max_size=3),
    normed=st.sampled_from([1, 2]),
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
        assert sharded(found)
