"""Where to cut a sequence of weighted items into contiguous runs (the coarsening of
:mod:`autopart.planning.graph`). Pure functions on lists; position ``k`` means "between item ``k - 1`` and
item ``k``"."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise

import numpy as np

__all__ = [
    "IntervalCost",
    "best_split_cuts",
    "choose_cuts",
    "crossing_bytes",
    "merge_cuts",
    "min_max_split",
]

IntervalCost = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``cost(b, a)``: the cost of a run holding items ``[a, b)``, for arrays of ends ``b`` and starts
``a`` that broadcast against each other (a column of ends, a row of starts)."""

_MIN_FILL = 0.6
"""A block ends once it holds at least this fraction of the target compute (where the cut is
cheapest), never past the target itself unless one item alone exceeds it."""
_RANK_PENALTY = 0.25
"""Extra weight on a cut's crossing bytes per step below the best module-boundary rank (2)."""
_SEARCH_STEPS = 40


def crossing_bytes(
    producers: Sequence[int], last_readers: Sequence[int], nbytes: Sequence[int], n: int
) -> list[int]:
    """Bytes crossing each position ``0..n`` of a sequence of ``n`` items: tensor ``i`` is made by
    item ``producers[i]`` and last read by item ``last_readers[i]``, so it crosses the positions in
    between."""
    diff = [0] * (n + 2)
    for prod, last, b in zip(producers, last_readers, nbytes):
        if last > prod:
            diff[prod + 1] += b
            diff[last + 1] -= b
    return list(accumulate(diff))[: n + 1]


def choose_cuts(
    weights: Sequence[float], crossing: Sequence[int], rank: Sequence[int], max_blocks: int
) -> list[int]:
    """Cut positions splitting ``weights`` into at most ``max_blocks`` runs, each with positive
    weight (when the total is positive), as fine as possible: a binary search finds the smallest
    target weight for which :func:`_greedy` needs no more than ``max_blocks`` runs."""
    prefix = [0.0, *accumulate(weights)]
    total = prefix[-1]
    if max_blocks <= 1 or total <= 0:
        return []
    lo, hi = total / max_blocks, total
    best: list[int] = []
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        cuts = _greedy(prefix, crossing, rank, mid)
        if len(cuts) + 1 <= max_blocks:
            best, hi = cuts, mid
        else:
            lo = mid
        if hi - lo <= 1e-6 * hi:
            break
    return _refine(prefix, crossing, rank, best, max_blocks)


def _refine(
    prefix: Sequence[float],
    crossing: Sequence[int],
    rank: Sequence[int],
    cuts: list[int],
    max_blocks: int,
) -> list[int]:
    """Spend the blocks the greedy left unused: split the heaviest divisible run in two, until
    there are ``max_blocks`` runs or no run can be split."""
    bounds = [0, *cuts, len(prefix) - 1]
    heap = [(-(prefix[b] - prefix[a]), a, b) for a, b in pairwise(bounds)]
    heapq.heapify(heap)
    out = list(cuts)
    while heap and len(out) + 1 < max_blocks:
        _, a, b = heapq.heappop(heap)
        k = _split_point(prefix, crossing, rank, a, b)
        if k is None:
            continue
        out.append(k)
        heapq.heappush(heap, (-(prefix[k] - prefix[a]), a, k))
        heapq.heappush(heap, (-(prefix[b] - prefix[k]), k, b))
    return sorted(out)


def _split_point(
    prefix: Sequence[float], crossing: Sequence[int], rank: Sequence[int], a: int, b: int
) -> int | None:
    """Where to split run ``[a, b)``: the best-scoring position leaving at least a third of its
    weight on each side, else the most balanced one leaving weight on both sides."""
    weight = prefix[b] - prefix[a]
    inside = [k for k in range(a + 1, b) if prefix[a] < prefix[k] < prefix[b]]
    if not inside:
        return None
    balanced = [
        k for k in inside if min(prefix[k] - prefix[a], prefix[b] - prefix[k]) >= weight / 3
    ]
    if balanced:
        return min(
            balanced,
            key=lambda k: (_score(crossing, rank, k), abs(2 * prefix[k] - prefix[a] - prefix[b])),
        )
    return min(inside, key=lambda k: abs(2 * prefix[k] - prefix[a] - prefix[b]))


def _score(crossing: Sequence[int], rank: Sequence[int], k: int) -> float:
    return crossing[k] * (1 + _RANK_PENALTY * (2 - rank[k]))


def merge_cuts(weights: Sequence[float], cuts: Sequence[int], forced: Sequence[int]) -> list[int]:
    """``forced`` cuts plus those of ``cuts`` that do not leave a weightless run (a ``cut`` in the
    same weightless stretch as a forced one gives way to it)."""
    prefix = [0.0, *accumulate(weights)]
    taken = {prefix[k] for k in forced}
    merged = sorted({*forced, *(k for k in cuts if prefix[k] not in taken)})
    out: list[int] = []
    for k in merged:
        if prefix[k] > prefix[out[-1] if out else 0] and prefix[k] < prefix[-1]:
            out.append(k)
    return out


def _greedy(
    prefix: Sequence[float], crossing: Sequence[int], rank: Sequence[int], target: float
) -> list[int]:
    """Left to right: end each run at the best-scoring position whose run weight lies in
    ``[_MIN_FILL * target, target]``."""
    n = len(prefix) - 1
    total = prefix[-1]
    cuts: list[int] = []
    a = 0
    while total - prefix[a] > target:
        candidates = _candidates(prefix, a, target)
        if not candidates:
            break
        k = min(candidates, key=lambda c: (_score(crossing, rank, c), -c))
        cuts.append(k)
        a = k
    assert all(0 < c < n for c in cuts)
    return cuts


def _candidates(prefix: Sequence[float], a: int, target: float) -> range:
    """Positions ``k`` (``a < k < n``) that may end the run starting at ``a``; each leaves weight
    both before it (in the run) and after it."""
    n = len(prefix) - 1
    base = prefix[a]
    first_nonzero = bisect.bisect_right(prefix, base)  # the run [a, k) has weight once k >= this
    last_ok = bisect.bisect_right(prefix, base + target) - 1  # the run's weight stays <= target
    tail_nonzero = bisect.bisect_left(prefix, prefix[-1]) - 1  # a cut at k leaves weight after it
    hi = min(last_ok, tail_nonzero, n - 1)
    lo = max(bisect.bisect_left(prefix, base + _MIN_FILL * target), first_nonzero)
    if lo <= hi:
        return range(lo, hi + 1)
    # Nothing in the window: one item overflows the target. Cut just before it if the run already
    # holds weight, else just after it (with the weightless items around it free to go either way).
    end = last_ok if prefix[last_ok] > base else first_nonzero
    hi = min(bisect.bisect_right(prefix, prefix[end]) - 1, tail_nonzero, n - 1)
    lo = max(bisect.bisect_left(prefix, prefix[end]), first_nonzero)
    return range(lo, hi + 1)


def min_max_split(n: int, num_stages: int, cost: IntervalCost, prefix: np.ndarray) -> list[int]:
    """Split ``n`` items into ``num_stages`` non-empty contiguous runs minimizing the largest
    ``cost``: ``best[j][b]`` = the best largest cost of ``j + 1`` runs covering items ``[0, b)``.
    Ties go to the earliest cut (deterministic).

    ``prefix`` bounds the cost from below: ``cost(b, a) >= prefix[b] - prefix[a]`` (the runs'
    compute; communication only adds). A feasible split (cuts at equal shares of the total) costs
    ``bound``, so no run of an optimal split computes more than ``bound``: ``j + 1`` runs end
    within ``(j + 1) bound`` of compute from the start, and leave at most ``(p - 1 - j) bound``
    after them (:func:`_band`). Only the ends in that band are solved, each against the starts
    within ``bound`` of it, all at once (``cost`` broadcasts a column of ends against a row of
    starts). The result is the unpruned recursion's: an end or start outside the band takes part
    only in splits costing more than ``bound``."""
    p = num_stages
    bound = _feasible_bound(n, p, cost, prefix)
    best = np.full((p, n + 1), np.inf)
    start = np.zeros((p, n + 1), dtype=np.int64)
    ends = _band(prefix, bound, 0, p)
    best[0, ends] = cost(ends[:, None], np.zeros((1, 1), dtype=np.int64))[:, 0]
    for j in range(1, p):
        first_start, ends = int(ends[0]), _band(prefix, bound, j, p)
        reach = prefix[ends] - bound - 1e-9 * abs(bound) - 1e-12  # keep ties with the bound
        lo = np.maximum(first_start, np.searchsorted(prefix, reach, side="left"))
        width = max(1, int((ends - lo).max()))
        if width <= _ROW_WIDTH:
            best[j, ends], start[j, ends] = _by_rows(best[j - 1], ends, lo, width, cost)
        else:
            best[j, ends], start[j, ends] = _by_end(best[j - 1], ends, lo, cost)
    stage_of = [0] * n
    end = n
    for j in range(p - 1, -1, -1):
        first_item = int(start[j, end]) if j > 0 else 0
        stage_of[first_item:end] = [j] * (end - first_item)
        end = first_item
    return stage_of


def _band(prefix: np.ndarray, bound: float, j: int, p: int) -> np.ndarray:
    """The ends ``b`` that ``j + 1`` runs of a split into ``p`` may cover ``[0, b)`` with, each
    run computing at most ``bound``: at least ``j + 1`` items, room for the other runs' items,
    at most ``(j + 1) bound`` of compute before ``b`` and ``(p - 1 - j) bound`` after it (a
    hair more: ties with the bound are kept, whatever the rounding of the prefix sums)."""
    n = len(prefix) - 1
    first, last = j + 1, n - (p - 1 - j)
    if math.isfinite(bound):
        slack = 1e-9 * (p * abs(bound) + abs(float(prefix[-1]))) + 1e-12
        after = prefix[-1] - (p - 1 - j) * bound - slack
        first = max(first, int(np.searchsorted(prefix, after, side="left")))
        last = min(last, int(np.searchsorted(prefix, (j + 1) * bound + slack, side="right")) - 1)
    return np.arange(first, last + 1)


_ROW_WIDTH = 256
"""Windows up to this many starts are solved as one matrix (many short runs: many stages); wider
ones end by end on contiguous slices (few long runs), where a gathered matrix costs more."""


def _by_rows(
    prev: np.ndarray, ends: np.ndarray, lo: np.ndarray, width: int, cost: IntervalCost
) -> tuple[np.ndarray, np.ndarray]:
    """For every end at once: the best ``max(prev[a], cost(end, a))`` over ``lo <= a < end`` and
    the earliest ``a`` reaching it."""
    starts = lo[:, None] + np.arange(width)[None, :]
    inside = starts < ends[:, None]
    starts = np.minimum(starts, len(prev) - 1)
    values = np.maximum(prev[starts], cost(ends[:, None], starts))
    values[~inside] = np.inf
    first = np.argmin(values, axis=1)
    rows = np.arange(len(ends))
    return values[rows, first], starts[rows, first]


def _by_end(
    prev: np.ndarray, ends: np.ndarray, lo: np.ndarray, cost: IntervalCost
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_by_rows`, one end at a time."""
    values, firsts = np.full(len(ends), np.inf), np.zeros(len(ends), dtype=np.int64)
    for row, (end, a) in enumerate(zip(ends.tolist(), lo.tolist())):
        if a >= end:
            continue
        run = np.maximum(prev[a:end], cost(np.array(end), np.arange(a, end)))
        i = int(np.argmin(run))
        values[row], firsts[row] = run[i], a + i
    return values, firsts


def _feasible_bound(n: int, p: int, cost: IntervalCost, prefix: np.ndarray) -> float:
    """The largest cost of one feasible split: cuts where the compute crosses each equal share
    (moved so every run keeps at least one item)."""
    bounds, total = [0], float(prefix[-1])
    for k in range(1, p):
        cut = int(np.searchsorted(prefix, total * k / p))
        bounds.append(min(max(cut, bounds[-1] + 1), n - (p - k)))
    bounds.append(n)
    return float(np.max(cost(np.array(bounds[1:]), np.array(bounds[:-1]))))


def best_split_cuts(
    weights: Sequence[float], comm_s: Sequence[float], num_stages: int
) -> list[int]:
    """Cut positions of the contiguous split into ``num_stages`` runs with the smallest largest
    ``run weight + comm_s[start] + comm_s[end]`` (no comm before the first run or after the last):
    the stage time of :mod:`autopart.solver.cost` with ``comm_s[k]`` the time of a cut at ``k``."""
    n = len(weights)
    prefix = np.concatenate(([0.0], np.cumsum(weights)))
    comm_in, comm_out = np.array(comm_s, dtype=np.float64), np.array(comm_s, dtype=np.float64)
    comm_in[0] = comm_out[n] = 0.0
    stage_of = min_max_split(
        n, num_stages, lambda b, a: prefix[b] - prefix[a] + comm_in[a] + comm_out[b], prefix
    )
    return [k for k in range(1, n) if stage_of[k] != stage_of[k - 1]]
