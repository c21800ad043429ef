"""A lower bound on the peak memory per device of any pipeline split, cheap enough to run before
the stage ILP (used by the mesh search to reject a mesh without solving it).

Every plan of a ``dp x pp x tp`` mesh runs a block graph coarsened from the (TP-adjusted) node
graph. Device ``d`` holds the parameter, gradient and optimizer state of its blocks and the
activations its blocks save, for ``f_d`` micro-batches in flight (the stage ILP's ``in_flight``,
the simulation's peak: GPipe ``m``, 1F1B ``min(p - d, m)``). Both the stage ILP and the
simulation count a parameter once on every stage that uses it and a saved value once per block
that saves it. So give each parameter to the first node that uses it and each saved value to the
first node that saves it: node ``n`` then owns state ``s_n`` and activations ``a_n`` (per
micro-batch) such that any set of nodes on a device holds at least the sum of what they own.

Relax the split to a fractional assignment ``x[n,d] >= 0``, ``sum_d x[n,d] = 1`` (no precedence,
no contiguity, no whole blocks: every real split is one). For any weights ``w_d >= 0`` summing to
1 the peak ``L`` satisfies (weak LP duality)::

    L >= sum_d w_d mem_d = sum_n sum_d x[n,d] w_d (s_n + f_d a_n) >= sum_n min_d w_d (s_n + f_d a_n)

which holds for every split, so it is a valid lower bound for every choice of ``w``. With
``w_d`` proportional to ``1 / (r + f_d)`` it is exact for a model of identical layers whose state
to activation ratio is ``r`` (the LP then spreads layers so every device peaks equally); the bound
takes the best of a few ``r`` around the model's own ratio, and of uniform weights (the average).
It is computed per schedule and micro-batch count; a mesh can fit only if one of them can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autopart.planning.graph import OpGraph
from autopart.planning.schedule import ScheduleKind, in_flight_micro_batches

__all__ = ["NodeMemory", "pipeline_memory_bound"]


@dataclass(frozen=True, slots=True)
class NodeMemory:
    """What each node of a graph owns (see the module docstring), grouped by equal values."""

    state: np.ndarray
    """Parameter + gradient + optimizer bytes owned, per distinct (state, activation) pair."""
    activation: np.ndarray
    """Saved bytes owned at the graph's batch (the traced, global one)."""
    count: np.ndarray
    """How many nodes own each pair."""
    slack_bytes: float
    """What the planner's rounding may take off (scaled graphs round each value to a byte)."""

    @classmethod
    def of(cls, og: OpGraph, state_per_byte: float, *, shard: int = 1) -> NodeMemory:
        """``og``'s nodes; ``shard`` divides every size (a bound valid for any TP plan of that
        degree: a TP rank holds at least ``1 / shard`` of each parameter and saved value)."""
        seen_params: set[str] = set()
        seen_values: set[str] = set()
        pairs: dict[tuple[float, float], int] = {}
        for n in og.nodes.values():
            params = [p for p in n.params if p not in seen_params]
            seen_params.update(params)
            values = [v for v in n.saved_from if v not in seen_values]
            seen_values.update(values)
            state = sum(og.param_bytes_by_name[p] for p in params) * state_per_byte / shard
            act = (sum(og.value_bytes_of(v) for v in values) + n.private_saved_bytes) / shard
            key = (float(state), float(act))
            pairs[key] = pairs.get(key, 0) + 1
        keys = sorted(pairs)
        # og.scaled and BlockGraph.scaled round each value, private size and block once (<= 1/2
        # byte each), TP shards floor (< 1 byte): a byte per node and value, twice, is ample.
        slack = 2.0 * (len(og.nodes) + len(seen_values) + 1)
        return cls(
            np.array([k[0] for k in keys]),
            np.array([k[1] for k in keys]),
            np.array([pairs[k] for k in keys], dtype=float),
            slack,
        )

    def with_state_scaled(self, factor: float) -> NodeMemory:
        """These nodes with every state size times ``factor`` (another optimizer or sharding of
        the training state: the state is linear in the bytes per parameter byte)."""
        return NodeMemory(self.state * factor, self.activation, self.count, self.slack_bytes)

    def without_activations(self) -> NodeMemory:
        """These nodes keeping no activations: a bound valid however many blocks recompute (a
        recomputed block keeps its inputs only, which may be next to nothing)."""
        return NodeMemory(self.state, self.activation * 0, self.count, self.slack_bytes)


def pipeline_memory_bound(
    nodes: NodeMemory, *, batch: int, dp: int, pp: int, options: Mapping[str, Sequence[int]]
) -> tuple[int, str, int]:
    """A lower bound on the peak memory per device of every split of ``nodes`` over ``pp``
    pipeline ranks, each replica running ``batch / dp`` samples as ``m`` micro-batches under one
    of ``options`` (``{schedule: [m, ...]}``): the least over the options, with the option."""
    best: tuple[int, str, int] | None = None
    for kind, counts in options.items():
        for m in counts:
            if kind not in (ScheduleKind.GPIPE, ScheduleKind.ONE_F_ONE_B):
                # chunks of a rank's stages need not peak together (and a weight gradient
                # deferred keeps them longer): count its state only
                in_flight = [0] * pp
            else:
                in_flight = [in_flight_micro_batches(kind, pp, m, d) for d in range(pp)]
            bound = _bound(nodes, in_flight, 1.0 / (dp * m), max(in_flight))
            if best is None or bound < best[0]:
                best = (bound, kind, m)
    if best is None:
        return (0, "", 0)
    return best


def _bound(nodes: NodeMemory, in_flight: Sequence[int], scale: float, most: int) -> int:
    f_values, f_count = np.unique(np.asarray(in_flight, dtype=float), return_counts=True)
    state = nodes.state
    act = nodes.activation * scale
    total_state = float(nodes.count @ state)
    total_act = float(nodes.count @ act)
    # cost[u, j]: what one node of pair u costs on a device with f_values[j] in flight
    cost = state[:, None] + act[:, None] * f_values[None, :]
    found = float(nodes.count @ cost.min(axis=1)) / len(in_flight)  # uniform weights
    if total_act > 0:
        ratio = total_state / total_act
        for r in (ratio * k for k in (0.25, 0.5, 1.0, 2.0, 4.0)):
            weight = 1.0 / (r + f_values) if r > 0 else 1.0 / np.maximum(f_values, 1e-300)
            if not np.all(np.isfinite(weight)):
                continue
            weight = weight / float(f_count @ weight)
            found = max(found, float(nodes.count @ (cost * weight[None, :]).min(axis=1)))
    slack = nodes.slack_bytes * max(1, most)
    return max(0, math.floor(found - slack))
