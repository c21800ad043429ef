"""The lower bound of :func:`autopart.solver.cost.lower_bound_s`, on plain lists: items (nodes) in
topological order with weights (compute seconds), and edges (tensors) between positions.

Why the bound holds is argued in ``lower_bound_s``'s docstring; this module computes it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise

import numpy as np

__all__ = ["chain_relaxation_s", "separators"]

_MAX_POINTS = 1 << 15
"""A segment with more distinct down-set weights than this is treated as fluid (see below)."""
_FLUID_POINTS = 1 << 12
_SEARCH_STEPS = 100
_TOLERANCE = 1e-5


def separators(n: int, edges: Sequence[tuple[int, int]]) -> list[int]:
    """Positions of the items comparable with every other item (each one an ancestor or a
    descendant): every down-set either contains all items up to a separator or none from it on."""
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        assert u < v, "edges must follow the topological order"
        preds[v].append(u)
        succs[u].append(v)
    anc = [0] * n
    for v in range(n):
        mask = 1 << v
        for u in preds[v]:
            mask |= anc[u]
        anc[v] = mask
    desc = [0] * n
    for v in range(n - 1, -1, -1):
        mask = 1 << v
        for w in succs[v]:
            mask |= desc[w]
        desc[v] = mask
    return [v for v in range(n) if anc[v].bit_count() + desc[v].bit_count() - 1 == n]


def chain_relaxation_s(
    weights: Sequence[float],
    edges: Sequence[tuple[int, int]],
    tensors: Sequence[tuple[int, int, int]],
    num_stages: int,
    boundary_s: Callable[[int], float],
    floor_s: float,
) -> float:
    """The smallest ``T`` for which breakpoints (weights of down-sets, relaxed to the subset sums
    of each segment between consecutive separators) admit ``num_stages`` stages, each with compute
    plus the communication of the boundaries it touches at most ``T``; at least ``floor_s``.

    ``tensors`` are ``(producer, last reader, nbytes)``; ``boundary_s(nbytes)`` is the least time of
    a boundary known to carry ``nbytes``: the tensors crossing every down-set of a region (made up
    to its left separator, read at or after its right one).

    A segment with too many subset sums is treated as fluid: its breakpoints are snapped down to a
    grid of step ``delta``, which moves every stage's compute by less than ``delta``, so ``delta``
    is subtracted from the result to keep it a lower bound.
    """
    n = len(weights)
    prefix = [0.0, *accumulate(weights)]
    total = prefix[-1]
    if num_stages <= 1 or total <= 0:
        return max(total, floor_s)
    seps = separators(n, edges)
    bounds = [-1, *seps, n]
    forced = _forced_bytes(bounds, tensors)
    values: list[np.ndarray] = []
    comms: list[np.ndarray] = []
    delta = 2e-12 * total  # merged near-duplicates (see _subset_sums) and rounding of the sums
    for i, (left, right) in enumerate(pairwise(bounds)):
        seg = [w for w in weights[left + 1 : right] if w > 0]
        sums = _subset_sums(seg, total)
        if sums is None:  # fluid
            sums = np.linspace(0.0, sum(seg), _FLUID_POINTS + 1)
            delta = max(delta, sum(seg) / _FLUID_POINTS)
        values.append(prefix[left + 1] + sums)  # everything up to the left separator, plus a subset
        comms.append(np.full(len(sums), boundary_s(forced[i])))
    value, comm = np.concatenate(values), np.concatenate(comms)
    order = np.lexsort((comm, value))  # by value, then the cheapest boundary first
    value, comm = value[order], comm[order]
    first = np.concatenate(([True], np.diff(value) > 0))
    value, comm = value[first], comm[first]
    lo, hi = floor_s, total + 2 * float(comm.max())
    if _feasible(value, comm, total, num_stages, lo):
        return floor_s
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        if _feasible(value, comm, total, num_stages, mid):
            hi = mid
        else:
            lo = mid
        if (
            hi - lo <= _TOLERANCE * hi
        ):  # lo stays a valid bound; the gap reads at most this much high
            break
    return max(floor_s, lo - delta)


def _forced_bytes(bounds: Sequence[int], tensors: Sequence[tuple[int, int, int]]) -> list[int]:
    """Bytes crossing every down-set of each region ``i`` (between ``bounds[i]`` and
    ``bounds[i + 1]``): tensors made at or before its left separator and read at or after its
    right one."""
    diff = [0] * len(bounds)
    for prod, last, nbytes in tensors:
        first_region = bisect.bisect_left(bounds, prod)
        last_region = bisect.bisect_right(bounds, last) - 2
        if first_region <= last_region:
            diff[first_region] += nbytes
            diff[last_region + 1] -= nbytes
    return list(accumulate(diff))[: len(bounds) - 1]


def _feasible(value: np.ndarray, comm: np.ndarray, total: float, p: int, t: float) -> bool:
    """Whether ``p`` stages of at most ``t`` each can cover ``[0, total]`` ending at breakpoints:
    a stage from ``y`` to ``x`` takes ``x - y + comm(y) + comm(x)`` (the first stage has no
    ``comm(y)``, the last no ``comm(x)``). ``reach[i]``: some stage sequence ends at ``value[i]``."""
    reach = value + comm <= t
    for _ in range(p - 2):
        best_start = np.maximum.accumulate(np.where(reach, value - comm, -np.inf))
        reach = best_start >= value + comm - t
        if not reach.any():
            return False
    return bool(np.any(reach & (value - comm >= total - t)))


def _subset_sums(weights: Sequence[float], total: float) -> np.ndarray | None:
    """Distinct sums of subsets of ``weights`` (values closer than 1e-12 of the total merged down),
    or ``None`` when there are more than ``_MAX_POINTS``."""
    sums = np.zeros(1)
    tol = 1e-12 * total
    for w in weights:
        sums = np.unique(np.concatenate([sums, sums + w]))
        keep = np.concatenate([[True], np.diff(sums) > tol])
        sums = sums[keep]
        if len(sums) > _MAX_POINTS:
            return None
    return sums
