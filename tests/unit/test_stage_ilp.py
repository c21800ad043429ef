"""Property tests of the stage ILP on random block DAGs: valid, never slower than the baselines,
optimal against brute force, and above an honest lower bound."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopart.cost_models import get_device
from autopart.errors import AutopartError
from autopart.planning.blocks import Block, BlockGraph, CrossTensor
from autopart.solver import baselines
from autopart.solver.cost import lower_bound_s, stage_times_s
from autopart.solver.stage_ilp import InfeasibleMemoryError, solve_stages

DEVICE = get_device("h100")
MIB = 1 << 20
STATE = 4.0  # parameter + gradient + two Adam states, all in the parameter's dtype


def _graph(
    weights: list[float], tensors: list[tuple[int, tuple[int, ...], int]], params: list[int]
) -> BlockGraph:
    blocks = tuple(
        Block(
            index=i,
            name=f"b{i}",
            nodes=(f"n{i}",),
            modules=(f"m.{i}",),
            forward_s=w / 3,
            backward_s=2 * w / 3,
            flops=0,
            backward_flops=0,
            param_bytes=params[i],
            params=(f"p{i}",),
            activation_bytes=MIB,
            layer=None,
        )
        for i, w in enumerate(weights)
    )
    cross = tuple(CrossTensor(f"t{j}", u, vs, nb) for j, (u, vs, nb) in enumerate(tensors))
    return BlockGraph(blocks, cross, {f"p{i}": params[i] for i in range(len(weights))})


@st.composite
def dags(draw: st.DrawFn, max_blocks: int = 7) -> tuple[BlockGraph, int]:
    n = draw(st.integers(2, max_blocks))
    weights = [draw(st.floats(1e-4, 1e-2)) for _ in range(n)]
    tensors = []
    for u in range(n - 1):
        later = list(range(u + 1, n))
        extra = draw(st.lists(st.sampled_from(later), max_size=2, unique=True))
        consumers = tuple(sorted({u + 1, *extra}))  # connected: every block feeds the next
        tensors.append((u, consumers, draw(st.integers(1, 64)) * MIB))
    params = [draw(st.integers(0, 8)) * MIB for _ in range(n)]
    p = draw(st.integers(1, min(4, n)))
    return _graph(weights, tensors, params), p


def _in_flight(p: int) -> list[int]:
    return [p - s for s in range(p)]  # 1F1B with m >= p


def _memory(bg: BlockGraph, stage_of: tuple[int, ...], p: int) -> list[float]:
    mem = [float(x) * STATE for x in bg.stage_param_bytes(stage_of, p)]
    for b, s in zip(bg.blocks, stage_of):
        mem[s] += _in_flight(p)[s] * b.activation_bytes
    return mem


def _brute_force(bg: BlockGraph, p: int) -> float:
    best = float("inf")
    for stage_of in itertools.product(range(p), repeat=len(bg.blocks)):
        if len(set(stage_of)) != p or any(
            stage_of[c] < stage_of[t.producer] for t in bg.tensors for c in t.consumers
        ):
            continue
        best = min(best, max(stage_times_s(bg, stage_of, p, DEVICE)))
    return best


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_plan_is_valid_optimal_and_above_the_lower_bound(case: tuple[BlockGraph, int]) -> None:
    bg, p = case
    sol = solve_stages(
        bg,
        p,
        DEVICE,
        in_flight=_in_flight(p),
        state_bytes_per_param_byte=STATE,
        memory_limit_bytes=None,
    )
    bg.validate(sol.stage_of, p)  # one stage per block, every stage used, no tensor flows back
    got = max(stage_times_s(bg, sol.stage_of, p, DEVICE))
    optimum = _brute_force(bg, p)
    assert got <= optimum * (1 + 1e-4)  # optimal up to the ILP's integer time units
    assert lower_bound_s(bg, p, DEVICE) <= optimum * (1 + 1e-9)
    for name in ("equal_layers", "equal_params", "chain_dp"):
        stage_of = (
            getattr(baselines, name)(bg, p)
            if name != "chain_dp"
            else baselines.chain_dp(bg, p, DEVICE)
        )
        assert got <= max(stage_times_s(bg, stage_of, p, DEVICE)) * (1 + 1e-4), name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags(), st.floats(0.3, 1.0))
def test_memory_limit_is_respected_or_the_minimum_is_reported(
    case: tuple[BlockGraph, int], frac: float
) -> None:
    bg, p = case
    total = sum(_memory(bg, tuple(0 for _ in bg.blocks), 1))  # everything on one device
    limit = int(total * frac)
    kwargs = dict(in_flight=_in_flight(p), state_bytes_per_param_byte=STATE)
    try:
        sol = solve_stages(bg, p, DEVICE, memory_limit_bytes=limit, **kwargs)  # type: ignore[arg-type]
    except InfeasibleMemoryError as err:
        assert "needs at least" in str(err) and "--memory" in str(err)
        assert err.minimum_bytes > limit - MIB  # MiB rounding
        # The minimum it names is enough.
        sol = solve_stages(bg, p, DEVICE, memory_limit_bytes=err.minimum_bytes, **kwargs)  # type: ignore[arg-type]
        assert max(_memory(bg, sol.stage_of, p)) <= err.minimum_bytes
        return
    assert max(_memory(bg, sol.stage_of, p)) <= limit


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(1e-4, 1e-2), min_size=3, max_size=30), st.integers(2, 6), st.integers(1, 64)
)
def test_ilp_matches_the_exact_chain_dp_on_chains(weights: list[float], p: int, mib: int) -> None:
    p = min(p, len(weights))
    bg = _graph(
        weights, [(i, (i + 1,), mib * MIB) for i in range(len(weights) - 1)], [0] * len(weights)
    )
    sol = solve_stages(
        bg,
        p,
        DEVICE,
        in_flight=_in_flight(p),
        state_bytes_per_param_byte=STATE,
        memory_limit_bytes=None,
    )
    dp = baselines.chain_dp(bg, p, DEVICE)
    got = max(stage_times_s(bg, sol.stage_of, p, DEVICE))
    assert got == pytest.approx(max(stage_times_s(bg, dp, p, DEVICE)), rel=1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags(), st.integers(0, 4), st.floats(0.2, 1.0))
def test_a_split_that_fits_gpipe_is_never_faster_than_1f1bs(
    case: tuple[BlockGraph, int], extra: int, frac: float
) -> None:
    # What lets the schedule search skip GPipe's solve where 1F1B's was made: at one micro-batch
    # count GPipe keeps every micro-batch in flight, 1F1B at most p - s, so every split fitting
    # GPipe fits 1F1B, and the objective does not depend on the schedule.
    bg, p = case
    m = p + extra
    limit = int(sum(_memory(bg, tuple(0 for _ in bg.blocks), 1)) * frac)
    kw = {"state_bytes_per_param_byte": STATE, "memory_limit_bytes": limit, "micro_batches": m}
    try:
        gpipe = solve_stages(bg, p, DEVICE, in_flight=[m] * p, **kw)  # type: ignore[arg-type]
    except InfeasibleMemoryError:
        return
    one_f_one_b = [min(p - s, m) for s in range(p)]
    fast = solve_stages(bg, p, DEVICE, in_flight=one_f_one_b, **kw)  # type: ignore[arg-type]
    slowest = max(stage_times_s(bg, fast.stage_of, p, DEVICE))
    assert slowest <= max(stage_times_s(bg, gpipe.stage_of, p, DEVICE)) * (1 + 1e-4)


def test_shared_parameters_live_on_every_stage_that_uses_them() -> None:
    bg = _graph([1e-3] * 4, [(i, (i + 1,), MIB) for i in range(3)], [MIB] * 4)
    blocks = list(bg.blocks)
    # Block 0 (embedding) and block 3 (head) share a tied weight of 64 MiB.
    import dataclasses

    blocks[0] = dataclasses.replace(blocks[0], params=("p0", "tied"))
    blocks[3] = dataclasses.replace(blocks[3], params=("p3", "tied"))
    bg = BlockGraph(tuple(blocks), bg.tensors, {**bg.param_bytes_by_name, "tied": 64 * MIB})
    assert dict(bg.shared_params) == {"tied": (0, 3)}
    sol = solve_stages(
        bg, 2, DEVICE, in_flight=[2, 1], state_bytes_per_param_byte=STATE, memory_limit_bytes=None
    )
    per_stage = bg.stage_param_bytes(sol.stage_of, 2)
    assert per_stage[0] >= 64 * MIB and per_stage[1] >= 64 * MIB


def test_same_inputs_same_plan() -> None:
    bg = _graph(
        [1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 2e-3], [(i, (i + 1,), MIB) for i in range(5)], [MIB] * 6
    )
    runs = {
        solve_stages(
            bg,
            3,
            DEVICE,
            in_flight=[3, 2, 1],
            state_bytes_per_param_byte=STATE,
            memory_limit_bytes=None,
        ).stage_of
        for _ in range(3)
    }
    assert len(runs) == 1


def test_falls_back_to_the_hint_when_the_solver_runs_out_of_time() -> None:
    weights = [1e-3 * (1 + (i % 5)) for i in range(60)]
    bg = _graph(weights, [(i, (i + 1,), MIB) for i in range(59)], [0] * 60)
    hint = baselines.chain_dp(bg, 6, DEVICE)
    sol = solve_stages(
        bg,
        6,
        DEVICE,
        in_flight=[1] * 6,
        state_bytes_per_param_byte=STATE,
        memory_limit_bytes=None,
        hint=hint,
        time_limit_s=1e-6,
    )
    bg.validate(sol.stage_of, 6)
    if sol.status == "HINT":
        assert list(sol.stage_of) == list(hint)
    # Whatever the solver managed, the plan is never worse than its hint.
    assert max(stage_times_s(bg, sol.stage_of, 6, DEVICE)) <= max(
        stage_times_s(bg, hint, 6, DEVICE)
    ) * (1 + 1e-12)


def _tied(tied_bytes: int) -> BlockGraph:
    """Four blocks; the first and the last share a tied embedding of ``tied_bytes``."""
    import dataclasses

    bg = _graph([1e-3] * 4, [(i, (i + 1,), MIB) for i in range(3)], [0] * 4)
    blocks = list(bg.blocks)
    blocks[0] = dataclasses.replace(blocks[0], params=("p0", "tied"))
    blocks[3] = dataclasses.replace(blocks[3], params=("p3", "tied"))
    return BlockGraph(tuple(blocks), bg.tensors, {**bg.param_bytes_by_name, "tied": tied_bytes})


def test_a_limit_below_a_tied_embedding_names_the_memory_it_needs() -> None:
    # The memory-minimising solve once capped its peak below the shared state (an assertion).
    bg = _tied(100 * MIB)
    kwargs = dict(in_flight=[2, 1], state_bytes_per_param_byte=STATE)
    hint = baselines.chain_dp(bg, 2, DEVICE)
    with pytest.raises(InfeasibleMemoryError, match=r"needs at least .*--memory") as info:
        solve_stages(bg, 2, DEVICE, memory_limit_bytes=50 * MIB, hint=hint, **kwargs)  # type: ignore[arg-type]
    err = info.value
    # Each stage holds the tied embedding's state (split 0|123 or 012|3: both stages use it).
    assert err.minimum_bytes >= STATE * 100 * MIB
    assert err.fits_bytes == err.minimum_bytes  # proven optimal on four blocks
    assert "--memory to 0.40 GiB" in str(err)  # 403 MiB, rounded up: enough as a limit


def test_a_limit_that_fits_a_tied_embedding_counts_it_on_both_stages() -> None:
    bg = _tied(100 * MIB)
    kwargs = dict(in_flight=[2, 1], state_bytes_per_param_byte=STATE)
    with pytest.raises(InfeasibleMemoryError) as info:
        solve_stages(bg, 2, DEVICE, memory_limit_bytes=50 * MIB, **kwargs)  # type: ignore[arg-type]
    limit = info.value.minimum_bytes
    sol = solve_stages(bg, 2, DEVICE, memory_limit_bytes=limit, **kwargs)  # type: ignore[arg-type]
    memory = _memory(bg, sol.stage_of, 2)
    assert min(memory) >= STATE * 100 * MIB  # the tied state on each stage
    assert max(memory) <= limit
    with pytest.raises(InfeasibleMemoryError):
        solve_stages(bg, 2, DEVICE, memory_limit_bytes=limit - MIB, **kwargs)  # type: ignore[arg-type]


def test_bad_stage_counts_are_clear_errors() -> None:
    from autopart.errors import AutopartError

    bg = _tied(MIB)
    for stages, per_device in ((0, 1), (3, 2), (2, 0)):
        with pytest.raises(AutopartError, match="stages"):
            solve_stages(
                bg,
                stages,
                DEVICE,
                in_flight=[1] * stages,
                state_bytes_per_param_byte=STATE,
                memory_limit_bytes=None,
                stages_per_device=per_device,
            )


def _device_bottleneck_by_brute_force(bg: BlockGraph, ranks: tuple[int, ...]) -> float:
    n, best = len(ranks), float("inf")
    for stage_of in itertools.product(range(n), repeat=len(bg.blocks)):
        if len(set(stage_of)) != n or any(
            stage_of[c] < stage_of[t.producer] for t in bg.tensors for c in t.consumers
        ):
            continue
        times = stage_times_s(bg, stage_of, n, DEVICE, ranks=ranks)
        best = min(best, max(sum(t for t, r in zip(times, ranks) if r == d) for d in set(ranks)))
    return best


def test_a_v_shaped_layout_is_optimal_and_hands_its_turn_over_for_free() -> None:
    # 2 devices, 4 stages in a V: device 0 runs stages 0 and 3, device 1 stages 1 and 2, whose
    # boundary is local: the optimum over the device times counts no transfer there.
    bg = _graph(
        [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],
        [(0, (1,), MIB), (1, (2,), MIB), (2, (3,), 512 * MIB), (3, (4,), MIB), (4, (5,), MIB)],
        [0] * 6,
    )
    ranks = (0, 1, 1, 0)
    solution = solve_stages(
        bg,
        4,
        DEVICE,
        in_flight=[1] * 4,
        state_bytes_per_param_byte=STATE,
        memory_limit_bytes=None,
        stages_per_device=2,
        device_of_stage=ranks,
    )
    stage_of = solution.stage_of
    boundary = bg.boundary_bytes(stage_of, 4)
    assert boundary[0] < 512 * MIB and boundary[2] < 512 * MIB  # never between devices
    times = stage_times_s(bg, stage_of, 4, DEVICE, ranks=ranks)
    device = [times[0] + times[3], times[1] + times[2]]
    assert max(device) == pytest.approx(_device_bottleneck_by_brute_force(bg, ranks), rel=1e-3)
    with pytest.raises(AutopartError, match="exactly 2"):
        solve_stages(
            bg,
            4,
            DEVICE,
            in_flight=[1] * 4,
            state_bytes_per_param_byte=STATE,
            memory_limit_bytes=None,
            stages_per_device=2,
            device_of_stage=(0, 0, 0, 1),
        )
