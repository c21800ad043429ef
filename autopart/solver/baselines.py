"""Baseline stage assignments, scored with the same objective as the stage ILP
(:mod:`autopart.solver.cost`). Each returns ``stage_of``: one stage per block, non-decreasing along
the block order.

- :func:`equal_layers`: the torchtitan / Megatron-LM default, the same number of repeated layers
  per stage (the first stage also takes what precedes the first layer, e.g. embeddings; the last
  takes what follows the last, e.g. the final norm and head).
- :func:`equal_params`: DeepSpeed's ``partition_method="parameters"``, contiguous stages with
  balanced parameter counts.
- :func:`chain_dp`: the exact optimum of the bottleneck over contiguous splits of the block order
  (a dynamic program); on chain graphs it is the true optimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.devices import DeviceSpec
from autopart.planning.cuts import best_split_cuts, min_max_split
from autopart.planning.graph import BlockGraph, PartitionError
from autopart.solver.cost import check_num_stages, stage_times_s

__all__ = [
    "Baseline",
    "chain_dp",
    "equal_blocks",
    "equal_layers",
    "equal_params",
    "evaluate",
    "run_baselines",
]


@dataclass(frozen=True, slots=True)
class Baseline:
    """A stage assignment and what it costs."""

    name: str
    stage_of: tuple[int, ...]
    stage_times_s: tuple[float, ...]
    bottleneck_s: float

    def __post_init__(self) -> None:
        if len(self.stage_times_s) == 0 or self.bottleneck_s != max(self.stage_times_s):
            raise PartitionError(
                f"Baseline {self.name!r}: bottleneck_s must be the largest stage time"
            )


def evaluate(
    bg: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    device: DeviceSpec,
    *,
    name: str = "custom",
) -> Baseline:
    """Score ``stage_of`` with :func:`~autopart.solver.cost.stage_times_s`."""
    times = stage_times_s(bg, stage_of, num_stages, device)
    return Baseline(name, tuple(stage_of), tuple(times), max(times))


def run_baselines(bg: BlockGraph, num_stages: int, device: DeviceSpec) -> dict[str, Baseline]:
    """Every baseline, scored, by name."""
    return {
        "equal_layers": evaluate(
            bg, equal_layers(bg, num_stages), num_stages, device, name="equal_layers"
        ),
        "equal_params": evaluate(
            bg, equal_params(bg, num_stages), num_stages, device, name="equal_params"
        ),
        "chain_dp": evaluate(
            bg, chain_dp(bg, num_stages, device), num_stages, device, name="chain_dp"
        ),
    }


def equal_blocks(bg: BlockGraph, num_stages: int) -> list[int]:
    """Contiguous stages whose block counts differ by at most one."""
    check_num_stages(bg, num_stages)
    n = len(bg.blocks)
    return [b * num_stages // n for b in range(n)]


def equal_layers(bg: BlockGraph, num_stages: int) -> list[int]:
    """The same number of repeated layers per stage (when they do not divide evenly, the first
    stages get one more). A block follows the layer holding most of its compute; blocks outside
    layers follow the block before them (the first stage takes what precedes the first layer).
    Falls back to :func:`equal_blocks` when there are fewer repeated layers than stages."""
    check_num_stages(bg, num_stages)
    layers = list(dict.fromkeys(b.layer for b in bg.blocks if b.layer is not None))
    if len(layers) < num_stages:
        return equal_blocks(bg, num_stages)
    per_stage, extra = divmod(len(layers), num_stages)
    stage_of_layer: dict[str, int] = {}
    for s in range(num_stages):
        start = s * per_stage + min(s, extra)
        for layer in layers[start : start + per_stage + (s < extra)]:
            stage_of_layer[layer] = s
    stage_of: list[int] = []
    current = 0
    for b in bg.blocks:
        if b.layer is not None:
            current = max(current, stage_of_layer[b.layer])
        stage_of.append(current)
    empty = sorted(set(range(num_stages)) - set(stage_of))
    if empty:
        raise PartitionError(
            f"equal_layers left stages {empty} without a block: the blocks span several layers each. "
            "Coarsen with a larger max_blocks (at least a block per layer) or use fewer stages."
        )
    return stage_of


def equal_params(bg: BlockGraph, num_stages: int) -> list[int]:
    """Contiguous stages minimizing the largest stage's parameter bytes. As DeepSpeed counts a tied
    layer at each position it appears, a shared parameter counts in full for every block using it."""
    check_num_stages(bg, num_stages)
    weights = [sum(bg.param_bytes_by_name[p] for p in b.params) for b in bg.blocks]
    prefix = np.concatenate(([0.0], np.cumsum(np.asarray(weights, dtype=np.float64))))
    return min_max_split(len(weights), num_stages, lambda b, a: prefix[b] - prefix[a], prefix)


def chain_dp(bg: BlockGraph, num_stages: int, device: DeviceSpec) -> list[int]:
    """The contiguous split of the block order with the smallest bottleneck of
    :func:`~autopart.solver.cost.stage_times_s` (exact; O(n^2 p) with n blocks). For a contiguous
    split the bytes at a boundary depend only on where it cuts: ``bg.cut_bytes()``."""
    check_num_stages(bg, num_stages)
    comm_s = [p2p_time_s(x, device) for x in bg.cut_bytes()]
    cuts = best_split_cuts([b.forward_s + b.backward_s for b in bg.blocks], comm_s, num_stages)
    return [sum(b >= c for c in cuts) for b in range(len(bg.blocks))]
