"""Baselines, the chain DP and the lower bound, checked against brute force."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autopart
from autopart.cost_models import DeviceSpec, get_device
from autopart.planning.cuts import best_split_cuts
from autopart.planning.graph import (
    BlockGraph,
    OpGraph,
    OpNode,
    PartitionError,
    coarsen,
    group_blocks,
)
from autopart.solver import baselines
from autopart.solver.cost import bottleneck_s, lower_bound_s, stage_times_s
from tests.random_graphs import random_dags

H100 = get_device("h100")
SLOW_LINK = dataclasses.replace(H100, link_bandwidth_bytes_per_s=1e9)
"""A slow link, so that communication matters in the random tests."""


@functools.cache
def zoo_blocks(name: str, max_blocks: int) -> BlockGraph:
    loaded = autopart.load_model(name, device="meta", batch=8, seq=128)
    gm = autopart.annotate(
        autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    )
    return coarsen(OpGraph.from_graph_module(gm, H100), max_blocks=max_blocks)


def singletons(og: OpGraph) -> BlockGraph:
    return group_blocks(og, [[name] for name in og.order])


def brute_force(bg: BlockGraph, p: int, device: DeviceSpec, *, contiguous: bool) -> float:
    """The smallest bottleneck over every valid (or every contiguous) assignment."""
    n = len(bg.blocks)
    if contiguous:
        candidates: Sequence[Sequence[int]] = [
            [sum(b >= c for c in cuts) for b in range(n)]
            for cuts in itertools.combinations(range(1, n), p - 1)
        ]
    else:
        candidates = list(itertools.product(range(p), repeat=n))
    best = float("inf")
    for stage_of in candidates:
        if len(set(stage_of)) < p or any(
            stage_of[c] < stage_of[t.producer] for t in bg.tensors for c in t.consumers
        ):
            continue
        best = min(best, bottleneck_s(bg, stage_of, p, device))
    return best


@settings(max_examples=60, deadline=None)
@given(og=random_dags(max_nodes=6), p=st.integers(1, 3))
def test_lower_bound_never_exceeds_the_true_optimum(og: OpGraph, p: int) -> None:
    bg = singletons(og)
    if p > len(bg.blocks):
        p = len(bg.blocks)
    for device in (H100, SLOW_LINK):
        optimum = brute_force(bg, p, device, contiguous=False)
        bound = lower_bound_s(bg, p, device)
        assert bound <= optimum * (1 + 1e-9)
        # the bound of a coarser view of the same nodes is the same bound (it reads the nodes)
        coarse = coarsen(og, max_blocks=3)
        if p <= len(coarse.blocks):
            assert lower_bound_s(coarse, p, device) == pytest.approx(bound)
            assert lower_bound_s(coarse, p, device) <= brute_force(
                coarse, p, device, contiguous=False
            ) * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(og=random_dags(max_nodes=9, chain=True), p=st.integers(1, 4))
def test_chain_dp_is_the_contiguous_optimum(og: OpGraph, p: int) -> None:
    bg = coarsen(og, max_blocks=len(og.order))
    assert len(bg.blocks) == len(og.order)  # positive weights: a block per node
    p = min(p, len(bg.blocks))
    for device in (H100, SLOW_LINK):
        stage_of = baselines.chain_dp(bg, p, device)
        assert stage_of == sorted(stage_of) and set(stage_of) == set(range(p))
        found = bottleneck_s(bg, stage_of, p, device)
        assert found == pytest.approx(brute_force(bg, p, device, contiguous=True), rel=1e-9)
        assert lower_bound_s(bg, p, device) <= found * (1 + 1e-9)
        for other in (baselines.equal_layers(bg, p), baselines.equal_params(bg, p)):
            assert found <= bottleneck_s(bg, other, p, device) * (1 + 1e-12)


def test_equal_layers_gpt2() -> None:
    bg = zoo_blocks("gpt2", 64)
    stage_of = baselines.equal_layers(bg, 4)
    layers_on: dict[int, set[str]] = {s: set() for s in range(4)}
    for b, s in zip(bg.blocks, stage_of):
        if b.layer is not None:
            layers_on[s].add(b.layer)
    assert layers_on == {
        s: {f"transformer.h.{i}" for i in range(3 * s, 3 * s + 3)} for s in range(4)
    }
    assert stage_of[0] == 0 and stage_of[-1] == 3  # embeddings first, ln_f and lm_head last
    assert bg.blocks[-1].name == "lm_head"
    # 5 stages of 12 layers: 3, 3, 2, 2, 2
    counts = [0] * 5
    for layer in dict.fromkeys(b.layer for b in bg.blocks if b.layer):
        counts[stage_of_layer(bg, baselines.equal_layers(bg, 5), layer)] += 1
    assert counts == [3, 3, 2, 2, 2]


def stage_of_layer(bg: BlockGraph, stage_of: Sequence[int], layer: str) -> int:
    return next(s for b, s in zip(bg.blocks, stage_of) if b.layer == layer)


def test_equal_layers_without_layers_splits_blocks_evenly() -> None:
    bg = zoo_blocks("cnn", 64)
    stage_of = baselines.equal_layers(bg, 4)
    assert stage_of == baselines.equal_blocks(bg, 4)
    sizes = [stage_of.count(s) for s in range(4)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("p", [2, 4])
def test_equal_params_balances_parameters(p: int) -> None:
    bg = zoo_blocks("gpt2", 24)
    weights = [sum(bg.param_bytes_by_name[q] for q in b.params) for b in bg.blocks]
    stage_of = baselines.equal_params(bg, p)
    assert stage_of == sorted(stage_of) and set(stage_of) == set(range(p))

    def largest(assignment: Sequence[int]) -> int:
        return max(sum(w for w, s in zip(weights, assignment) if s == k) for k in range(p))

    n = len(weights)
    brute = min(
        largest([sum(b >= c for c in cuts) for b in range(n)])
        for cuts in itertools.combinations(range(1, n), p - 1)
    )
    assert largest(stage_of) == brute


@pytest.mark.parametrize(
    ("name", "max_blocks", "p"),
    [("gpt2", 64, 4), ("llama-tiny", 64, 2), ("heavy-head", 64, 4), ("cnn", 64, 4)],
)
def test_chain_dp_beats_the_baselines_and_respects_the_bound(
    name: str, max_blocks: int, p: int
) -> None:
    bg = zoo_blocks(name, max_blocks)
    results = baselines.run_baselines(bg, p, H100)
    best = results["chain_dp"].bottleneck_s
    assert (
        best <= results["equal_layers"].bottleneck_s
        and best <= results["equal_params"].bottleneck_s
    )
    bound = lower_bound_s(bg, p, H100)
    assert bound <= best <= 1.03 * bound  # blocks fine enough for a near-optimal contiguous split
    assert results["chain_dp"].stage_times_s == tuple(
        stage_times_s(bg, results["chain_dp"].stage_of, p, H100)
    )


def test_too_many_stages_is_a_clear_error() -> None:
    og = OpGraph(
        {f"n{i}": OpNode(f"n{i}", 1.0, 1.0, 0, 8, (f"n{i - 1}",) if i else ()) for i in range(3)},
        {},
    )
    bg = coarsen(og, max_blocks=3)
    for fn in (
        lambda: baselines.chain_dp(bg, 4, H100),
        lambda: baselines.equal_layers(bg, 4),
        lambda: baselines.equal_params(bg, 4),
        lambda: lower_bound_s(bg, 4, H100),
    ):
        with pytest.raises(
            PartitionError, match=r"3 blocks into 4 pipeline stages.*at most 3 stages"
        ):
            fn()


@pytest.mark.slow
def test_llama_70b_coarsens_fast_and_near_the_bound() -> None:
    loaded = autopart.load_model("llama-70b", device="meta", batch=8, seq=128)
    gm = autopart.annotate(
        autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    )
    og = OpGraph.from_graph_module(gm, H100)
    start = time.perf_counter()
    bg = coarsen(og, max_blocks=256)
    assert time.perf_counter() - start < 5.0
    assert len(bg.blocks) <= 256
    assert len({b.layer for b in bg.blocks} - {None}) == 80
    for p in (4, 8):
        best = bottleneck_s(bg, baselines.chain_dp(bg, p, H100), p, H100)
        bound = lower_bound_s(bg, p, H100)
        assert bound <= best <= 1.02 * bound
        assert best <= bottleneck_s(bg, baselines.equal_layers(bg, p), p, H100)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    weights=st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0, 0.25, 7.5]), min_size=1, max_size=9),
)
def test_best_split_is_the_exhaustive_optimum(data: st.DataObject, weights: list[float]) -> None:
    # the pruned, vectorised recursion (a run's compute above a feasible split's cost is never
    # considered) against every placement of the cuts
    n = len(weights)
    p = data.draw(st.integers(1, n))
    comm = data.draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 4.0]), min_size=n + 1, max_size=n + 1)
    )
    prefix = [0.0, *itertools.accumulate(weights)]

    def largest(cuts: Sequence[int]) -> float:
        bounds = [0, *cuts, n]
        return max(
            prefix[b] - prefix[a] + (comm[a] if a else 0.0) + (comm[b] if b < n else 0.0)
            for a, b in itertools.pairwise(bounds)
        )

    every = list(itertools.combinations(range(1, n), p - 1))
    best = min(largest(c) for c in every)
    got = best_split_cuts(weights, comm, p)
    assert len(got) == p - 1 and got == sorted(set(got)) and largest(got) == best


def _unpruned_split(weights: Sequence[float], comm: Sequence[float], p: int) -> list[int]:
    """The recursion of ``min_max_split`` over every end and start (no bound, no band), ties to
    the earliest cut, with the same float arithmetic: the reference for the pruned one."""
    n = len(weights)
    prefix = [0.0, *itertools.accumulate(weights)]

    def cost(b: int, a: int) -> float:
        return prefix[b] - prefix[a] + (comm[a] if a else 0.0) + (comm[b] if b < n else 0.0)

    best = [[cost(b, 0) if b else float("inf") for b in range(n + 1)]]
    start = [[0] * (n + 1)]
    for j in range(1, p):
        row, first = [float("inf")] * (n + 1), [0] * (n + 1)
        for b in range(j + 1, n + 1):
            for a in range(j, b):
                value = max(best[j - 1][a], cost(b, a))
                if value < row[b]:
                    row[b], first[b] = value, a
        best.append(row)
        start.append(first)
    cuts, end = [], n
    for j in range(p - 1, 0, -1):
        end = start[j][end]
        cuts.append(end)
    return sorted(cuts)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    layer=st.lists(st.sampled_from([0.0, 1.0, 2.0, 0.25, 0.1, 3.3]), min_size=1, max_size=6),
    repeats=st.integers(1, 12),
)
def test_best_split_prunes_nothing_the_full_recursion_would_choose(
    data: st.DataObject, layer: list[float], repeats: int
) -> None:
    # equal layers tie often: the band and the window must keep the very cut the recursion over
    # every start and end picks (the earliest of equal ones), not only one as good
    weights = [w * (1 + data.draw(st.sampled_from([0.0, 0.0, 1e-3]))) for w in layer * repeats]
    n = len(weights)
    p = data.draw(st.integers(1, min(n, 12)))
    comm = data.draw(
        st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.5, 2.0]), min_size=n + 1, max_size=n + 1)
    )
    assert best_split_cuts(weights, comm, p) == _unpruned_split(weights, comm, p)
