"""Property tests of the pointwise sharding rule (``passes/tp/rules/_pointwise_ops.py``): every op
name of ``POINTWISE``, by the one-process simulation of ``tests/_tp_rule_check.py`` (degrees 2 and
4, forward and backward, every strategy against the unsharded op).

Each :class:`Case` is one overload with its inputs drawn in the op's domain (``log`` on positive
values, ``acos`` inside (-1, 1), a divisor away from 0, small integers where equality matters): one
input keeps the output's shape and the others may broadcast against it (size-1 or missing leading
dimensions). The cases are grouped by what they exercise: unary float ops, ops with scalar
arguments, binary and ternary ops with broadcasting, comparisons and logic (no gradient), dtype
casts, values that do not depend on the input, copies. Every case must offer a split of the output
whenever the degree divides one of its dimensions, and a case marked ``partial`` must keep partial
sums (the ops linear in their partial input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autopart.passes.tp.placements import P, R, Strategy
from autopart.passes.tp.placements import shard as S
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
    name_of,
    only_replicated,
    rand,
)

aten = torch.ops.aten
f32, f64, i64 = torch.float32, torch.float64, torch.int64

# ---------------------------------------------------------------------------------------------
# input domains: (seed, shape) -> tensor

Maker = Callable[[int, Sequence[int]], torch.Tensor]


def _uniform(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=f64)


def normal(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return rand(seed, *shape)


def positive(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return _uniform(seed, shape) * 2 + 0.5


def unit(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Inside (-0.9, 0.9): acos, asin, tan, a lerp weight."""
    return (_uniform(seed, shape) * 2 - 1) * 0.9


def nonzero(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """At least 0.5 away from 0: a divisor, a reciprocal."""
    return positive(seed, shape) * torch.where(_uniform(seed + 7, shape) > 0.5, 1.0, -1.0)


def above_minus_one(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return _uniform(seed, shape) * 3 - 0.9


def small_ints(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Floats from {-2, ..., 2}, so that comparisons are sometimes equal."""
    return torch.floor(_uniform(seed, shape) * 5) - 2


def with_nans(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return torch.where(_uniform(seed + 7, shape) > 0.7, torch.nan, normal(seed, shape))


def ints(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return torch.floor(_uniform(seed, shape) * 16 - 8).to(i64)


def bools(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return _uniform(seed, shape) > 0.5


def single(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return normal(seed, shape).to(f32)


def scalar(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """A 0-dimensional tensor (a fill value), whatever the shape."""
    return normal(seed, ())


# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    """``target(*before, *inputs, *extra, **kwargs)`` with its tensor inputs drawn by ``inputs``."""

    target: Any
    inputs: tuple[Maker, ...] = (normal,)
    extra: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    before: tuple[Any, ...] = ()
    whole: int | None = None
    """The input that has the output's shape (``None``: drawn); the others may broadcast."""
    partial: bool = False
    """A strategy keeps partial sums (the op is linear in its partial input(s))."""
    label: str = ""

    def param(self) -> Any:
        name = f"{self.target}{'-' + self.label if self.label else ''}"
        return pytest.param(self, id=name, marks=covers(name_of(self.target)))


def _cases(cases: list[Case]) -> Any:
    return pytest.mark.parametrize("case", [c.param() for c in cases])


def run(case: Case, d: int, data: Any, seed: int) -> list[Strategy]:
    """Check ``case`` on drawn shapes; every case splits an output dimension the degree divides."""
    shape = data.draw(st.lists(SIZES, min_size=1, max_size=3), label="shape")
    shaped = [i for i, make in enumerate(case.inputs) if make is not scalar]
    whole = case.whole if case.whole is not None else data.draw(st.sampled_from(shaped))
    tensors = [
        make(seed + i, shape if i == whole else broadcast_shape(data.draw, tuple(shape)))
        for i, make in enumerate(case.inputs)
    ]
    args = [*case.before, *(In(i) for i in range(len(tensors))), *case.extra]
    _, node, _ = build(case.target, tensors, args, dict(case.kwargs))
    found = check(node, d, seed=seed, groups=(1, 3))  # grouped splits: a fused QKV's parts
    splits = {s.output for s in found if s.label == "shard"}
    for k, size in enumerate(shape):
        if size % d == 0:
            assert S(k) in splits, f"{node.format_node()}: no split of output dimension {k}"
    if case.partial:
        assert any(s.output == P for s in found), f"{node.format_node()} loses partial sums"
    return found


# ---------------------------------------------------------------------------------------------
# one float tensor


UNARY_FLOAT = [
    Case(aten.abs.default),
    Case(aten.acos.default, (unit,)),
    Case(aten.asin.default, (unit,)),
    Case(aten.atan.default),
    Case(aten.ceil.default),
    Case(aten.cos.default),
    Case(aten.cosh.default),
    Case(aten.erf.default),
    Case(aten.exp.default),
    Case(aten.expm1.default),
    Case(aten.floor.default),
    Case(aten.gelu.default),
    Case(aten.hardsigmoid.default),
    Case(aten.hardswish.default),
    Case(aten.log.default, (positive,)),
    Case(aten.log1p.default, (above_minus_one,)),
    Case(aten.log2.default, (positive,)),
    Case(aten.mish.default),
    Case(aten.neg.default, partial=True),
    Case(aten.reciprocal.default, (nonzero,)),
    Case(aten.relu.default),
    Case(aten.round.default),
    Case(aten.rsqrt.default, (positive,)),
    Case(aten.sigmoid.default),
    Case(aten.sign.default),
    Case(aten.silu.default),
    Case(aten.sin.default),
    Case(aten.sinh.default),
    Case(aten.sqrt.default, (positive,)),
    Case(aten.square.default),
    Case(aten.tan.default, (unit,)),
    Case(aten.tanh.default),
]


@_cases(UNARY_FLOAT)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_unary_float(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


SCALAR_ARGS = [
    Case(aten.add.Tensor, extra=(1.5,)),
    Case(aten.add.Scalar, extra=(1.5,)),
    Case(aten.sub.Tensor, extra=(0.5,)),
    Case(aten.sub.Scalar, extra=(0.5,)),
    Case(aten.mul.Tensor, extra=(2.5,), partial=True),
    Case(aten.mul.Scalar, extra=(2.5,), partial=True),
    Case(aten.div.Tensor, extra=(4.0,), partial=True),
    Case(aten.div.Scalar, extra=(4.0,), partial=True),
    Case(aten.div.Scalar_mode, extra=(0.5,), kwargs=(("rounding_mode", "floor"),)),
    Case(aten.pow.Tensor_Scalar, extra=(2,)),
    Case(aten.pow.Tensor_Scalar, (positive,), extra=(0.5,), label="sqrt"),
    Case(aten.pow.Scalar, before=(2.0,)),
    Case(aten.clamp.default, extra=(-0.5, 0.5)),
    Case(aten.clamp_min.default, extra=(-0.2,)),
    Case(aten.clamp_max.default, extra=(0.2,)),
    Case(aten.leaky_relu.default, extra=(0.1,)),
    Case(aten.elu.default, extra=(0.5,)),
    Case(aten.hardtanh.default, extra=(-0.5, 0.5)),
    Case(aten.softplus.default, extra=(2.0, 1.0)),
    Case(aten.gelu.default, kwargs=(("approximate", "tanh"),), label="tanh"),
    Case(aten.round.decimals, kwargs=(("decimals", 1),)),
    Case(aten.fmod.Scalar, extra=(0.7,)),
    Case(aten.remainder.Scalar, extra=(0.7,)),
]


@_cases(SCALAR_ARGS)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_scalar_arguments(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


# ---------------------------------------------------------------------------------------------
# several tensors, broadcast


BINARY = [
    Case(aten.add.Tensor, (normal, normal), partial=True),
    Case(aten.add.Tensor, (normal, normal), kwargs=(("alpha", 2.0),), partial=True, label="alpha"),
    Case(aten.add.Tensor, (normal, ints), label="int"),
    Case(aten.sub.Tensor, (normal, normal), partial=True),
    Case(aten.sub.Tensor, (normal, normal), kwargs=(("alpha", 0.5),), partial=True, label="alpha"),
    Case(aten.mul.Tensor, (normal, normal), partial=True),
    Case(aten.mul.Tensor, (ints, normal), partial=True, label="int"),
    Case(aten.div.Tensor, (normal, nonzero), partial=True),
    Case(aten.div.Tensor_mode, (normal, nonzero), kwargs=(("rounding_mode", "trunc"),)),
    Case(aten.maximum.default, (normal, normal)),
    Case(aten.minimum.default, (normal, normal)),
    Case(aten.pow.Tensor_Tensor, (positive, normal)),
    Case(aten.fmod.Tensor, (normal, nonzero)),
    Case(aten.remainder.Tensor, (normal, nonzero)),
    Case(aten.clamp_min.Tensor, (normal, normal)),
    Case(aten.clamp_max.Tensor, (normal, normal)),
    Case(aten.lerp.Scalar, (normal, normal), extra=(0.25,)),
]
TERNARY = [
    Case(aten.where.self, (bools, normal, normal)),
    Case(aten.masked_fill.Scalar, (normal, bools), extra=(-1.0,), whole=0),
    Case(aten.masked_fill.Tensor, (normal, bools, scalar), whole=0),
    Case(aten.addcmul.default, (normal, normal, normal), kwargs=(("value", 0.5),)),
    Case(aten.addcdiv.default, (normal, normal, nonzero), kwargs=(("value", 0.5),)),
    Case(aten.lerp.Tensor, (normal, normal, unit)),
    # torch's clamp.Tensor backward fails when self broadcasts against min / max
    Case(aten.clamp.Tensor, (normal, normal, normal), whole=0),
]


@_cases(BINARY + TERNARY)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_broadcasting(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


@covers("add")
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


# ---------------------------------------------------------------------------------------------
# boolean and integer results: no gradient


COMPARISONS_AND_LOGIC = [
    Case(aten.eq.Tensor, (small_ints, small_ints)),
    Case(aten.eq.Scalar, (small_ints,), extra=(1.0,)),
    Case(aten.ne.Tensor, (small_ints, small_ints)),
    Case(aten.ge.Tensor, (small_ints, small_ints)),
    Case(aten.gt.Tensor, (small_ints, small_ints)),
    Case(aten.le.Tensor, (small_ints, small_ints)),
    Case(aten.lt.Tensor, (small_ints, small_ints)),
    Case(aten.lt.Scalar, (small_ints,), extra=(0.0,)),
    Case(aten.isnan.default, (with_nans,)),
    Case(aten.logical_not.default, (bools,)),
    Case(aten.logical_and.default, (bools, small_ints)),
    Case(aten.logical_or.default, (bools, bools)),
    Case(aten.bitwise_not.default, (ints,)),
    Case(aten.bitwise_and.Tensor, (ints, ints)),
    Case(aten.bitwise_and.Scalar, (ints,), extra=(3,)),
    Case(aten.bitwise_or.Tensor, (ints, ints)),
    Case(aten.bitwise_xor.Tensor, (ints, ints)),
    Case(aten.__and__.Tensor, (bools, bools)),
    Case(aten.__or__.Tensor, (bools, bools)),
    Case(aten.__xor__.Tensor, (ints, ints)),
]


@_cases(COMPARISONS_AND_LOGIC)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_comparisons_and_logic(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


# ---------------------------------------------------------------------------------------------
# dtype casts (partial sums cast part by part: compared at the lower precision)


CASTS = [
    Case(aten.to.dtype, extra=(f32,), partial=True, label="float32"),
    Case(aten.to.dtype, extra=(f64,), partial=True, label="same"),
    Case(aten.to.dtype, (single,), extra=(f64,), partial=True, label="upcast"),
    Case(aten.to.dtype, extra=(i64,), label="int64"),
    Case(aten.to.dtype_layout, kwargs=(("dtype", f32),), partial=True),
    Case(aten.to.other, (normal, single), whole=0),
    Case(aten._to_copy.default, partial=True),
    Case(aten._to_copy.default, kwargs=(("dtype", f32),), partial=True, label="float32"),
    Case(aten._to_copy.default, (ints,), kwargs=(("dtype", f64),), label="from-int"),
    Case(aten.type_as.default, (normal, single), whole=0),
    Case(aten.type_as.default, (normal, ints), whole=0, label="int"),
    Case(aten.type_as.default, (ints, normal), whole=0, label="from-int"),
]


@_cases(CASTS)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_casts(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


# ---------------------------------------------------------------------------------------------
# values that do not depend on the input's, copies


CONSTANTS_AND_COPIES = [
    Case(aten.zeros_like.default),
    Case(aten.ones_like.default),
    Case(aten.ones_like.default, kwargs=(("dtype", i64),), label="int64"),
    Case(aten.full_like.default, extra=(3.0,)),
    Case(aten.fill.Scalar, extra=(2.0,)),
    Case(aten.fill.Tensor, (normal, scalar), whole=0),
    Case(aten.clone.default, partial=True),
    Case(aten.contiguous.default, partial=True),
    Case(aten.alias.default, partial=True),
    Case(aten.detach.default),
    Case(aten.lift_fresh_copy.default),
    Case(aten.dropout.default, extra=(0.0, True)),
    Case(aten.dropout.default, extra=(0.5, False), label="eval"),
]


@_cases(CONSTANTS_AND_COPIES)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_constants_and_copies(case: Case, d: int, data: Any, seed: int) -> None:
    run(case, d, data, seed)


@contextmanager
def _uninitialized_memory_filled() -> Iterator[None]:
    """``empty_like`` then fills integers with their largest value (torch's deterministic mode)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@_cases(
    [
        Case(aten.empty_like.default, (ints,)),
        Case(aten.empty_like.default, kwargs=(("dtype", i64),), label="float-to-int64"),
    ]
)
@FEW
@given(d=DEGREES, data=st.data(), seed=SEEDS)
def test_empty_like(case: Case, d: int, data: Any, seed: int) -> None:
    assert torch.utils.deterministic.fill_uninitialized_memory
    with _uninitialized_memory_filled():
        run(case, d, data, seed)


@covers("native_dropout")
@FEW
@given(d=DEGREES, shape=st.lists(SIZES, min_size=1, max_size=3), train=st.booleans(), seed=SEEDS)
def test_native_dropout_runs_replicated(d: int, shape: list[int], train: bool, seed: int) -> None:
    """Its output is a pair (values, mask) that ``getitem`` cannot pass a split through: the rule
    offers nothing, so the op runs replicated (checked, with p=0, like every other rule)."""
    _, node, _ = build(aten.native_dropout.default, [rand(seed, *shape)], [In(0), 0.0, train])
    assert only_replicated(check(node, d, seed=seed))
