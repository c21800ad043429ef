"""The one-process check of a TP sharding rule (``passes/tp/rules/``), shared by the property tests
of ``tests/unit/test_tp_rules*.py``.

For a one-op fx graph (:func:`build`), every strategy :func:`node_strategies` offers is simulated
rank by rank in one process (:func:`check`): each input is given to every rank in the placement
the strategy reads it in (``P``: random parts that sum to it), each rank runs the call
:func:`~autopart.passes.tp.local.local_call` makes (the code ``shard_tp`` emits: local shape
arguments, vocabulary-parallel embedding, row-parallel bias), and the ranks' outputs, combined by
the output placement, must equal the unsharded op. Backward: the output gradient is placed as
``dual(output placement)``, every rank runs its local backward, and each input's gradient,
combined by the placement the runtime gives it (:func:`grad_placement`: partial for an input read
``R`` by a node whose output is not ``R``), must equal the unsharded gradient. Every split the
strategy uses must be divisible by the degree (otherwise no sharded strategy may be offered).

Values are float64 and compared to 1e-8; where a less precise float dtype takes part (a cast to
float32, a float32 input), at that dtype's precision (torch.testing's defaults for it).

A test declares the op names it checks with :func:`covers`; conftest fails a test that declared an
op it never checked (:data:`TESTED`), and ``test_tp_rules_coverage.py`` fails when a registered
rule is declared by no test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from autopart.codegen.templates.collectives import shard, unshard
from autopart.passes.tp.local import local_call
from autopart.passes.tp.placements import P, Placement, R, Strategy, dual
from autopart.passes.tp.placements import shard as S
from autopart.passes.tp.rules import node_strategies, op_name
from autopart.passes.tp.shard import grad_placement, tp_partial_bias

__all__ = [
    "DEGREES",
    "FEW",
    "SEEDS",
    "SETTINGS",
    "SIZES",
    "SMALL",
    "TESTED",
    "In",
    "broadcast_shape",
    "build",
    "check",
    "covers",
    "divisible",
    "name_of",
    "only_replicated",
    "plausible",
    "rand",
    "sharded",
    "simulate",
]

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(SETTINGS, max_examples=8)
"""For tests parametrized by op: every op is checked."""
DEGREES = st.sampled_from([2, 4])
SIZES = st.sampled_from([1, 2, 3, 4, 6, 8, 12])
SMALL = st.sampled_from([1, 2, 3, 4])
SEEDS = st.integers(0, 2**16)

TESTED: set[str] = set()
"""Op names :func:`check` simulated since conftest last cleared it (at the start of each test that
declares :func:`covers`)."""


def covers(*op_names: str) -> pytest.MarkDecorator:
    """Marks a test (or a ``pytest.param``) as the property test of these op names (as
    :func:`op_name` gives them); the test must :func:`check` a node of each."""
    return pytest.mark.covers(*op_names)


def name_of(target: Any) -> str:
    """The op name of an aten overload (``"add"`` for ``aten.add.Tensor``), as :func:`op_name`."""
    return str(target._schema.name).split("::", 1)[-1]


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


def rand(gen_seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64
    )


def broadcast_shape(draw: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with some dimensions 1 and maybe some leading ones dropped."""
    out = tuple(1 if draw(st.booleans()) else s for s in shape)
    return out[draw(st.integers(0, len(out))) :]


# ---------------------------------------------------------------------------------------------
# placements of values on the simulated ranks


def _is_float(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_is_float(x) for x in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _first(v: Any) -> torch.Tensor:
    return v[0] if isinstance(v, (list, tuple)) else v


def divisible(v: Any, p: Placement, d: int) -> bool:
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
            if divisible(v, S(k, g), d):
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
        simulate(target, strategy, d, seed)
    return list(strategies)


def simulate(node: Node, st_: Strategy, d: int, seed: int) -> None:
    """Run ``node`` under strategy ``st_`` on ``d`` simulated ranks (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = node.all_input_nodes
    full_in = [_leaf(u.meta["val"]) for u in inputs]
    label = f"{node.format_node()} under {st_}"
    for u, p in zip(inputs, st_.inputs):
        assert divisible(u.meta["val"], p, d), (
            f"{label}: input {u} read as {p} is not divisible by {d}"
        )
        assert p != P or _is_float(u.meta["val"]), f"{label}: integer input read as P"
    full_env = dict(zip(inputs, full_in))
    full_out = node.target(
        *map_arg(node.args, full_env.__getitem__), **map_arg(node.kwargs, full_env.__getitem__)
    )
    assert divisible(full_out, st_.output, d), f"{label}: output {st_.output} not divisible by {d}"
    tol = _tolerance([*full_in, full_out])
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
    _close(got, full_out, f"{label}: output", tol)
    for i, u in enumerate(inputs):
        if full_grads[i] is None or not _is_float(u.meta["val"]):
            continue
        eff = grad_placement(node, u, st_.inputs[i], st_.output)
        # the ILP costs the gradient the strategy declares: it must be the one the runtime makes
        assert st_.grads[i] == eff, (
            f"{label}: gradient of {u} declared {st_.grads[i]}, runtime {eff}"
        )
        pieces = [lg[i] for lg in local_grads]
        g = _combine(pieces, eff, full_grads[i], f"{label}: gradient of {u} ({eff})")
        _close(g, full_grads[i], f"{label}: gradient of input {u} combined as {eff}", tol)


def _place_grad(g: Any, p: Placement, d: int, r: int) -> Any:
    """Rank ``r``'s piece of the output gradient ``g`` (``None`` for an integer output)."""
    if isinstance(g, (list, tuple)):
        return [_place_grad(x, p, d, r) for x in g]
    return None if g is None else shard(g, p.dim, p.groups, d, r)


_DEFAULT_TOLERANCES = {  # (rtol, atol): torch.testing.assert_close's defaults
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def _tolerance(values: list[Any]) -> dict[str, float]:
    """1e-8 for float64 values; torch.testing's default tolerance of the least precise float dtype
    when another one takes part (the parts of a partial sum are then rounded to it)."""
    dtypes = {t.dtype for v in values for t in _tensors(v) if t.is_floating_point()}
    least = max(dtypes, key=lambda t: torch.finfo(t).eps, default=torch.float64)
    if least == torch.float64:
        return {"atol": 1e-8, "rtol": 1e-8}
    rtol, atol = _DEFAULT_TOLERANCES[least]
    return {"atol": atol, "rtol": rtol}


def _close(got: Any, want: Any, what: str, tol: dict[str, float]) -> None:
    for i, (a, b) in enumerate(zip(_tensors(got), _tensors(want))):
        torch.testing.assert_close(
            a.detach(), b.detach(), **tol, msg=lambda m, i=i: f"{what} [{i}]: {m}"
        )


def sharded(strategies: list[Strategy]) -> list[Strategy]:
    return [s for s in strategies if s.label != "replicate"]


def only_replicated(strategies: list[Strategy]) -> bool:
    return not sharded(strategies)
