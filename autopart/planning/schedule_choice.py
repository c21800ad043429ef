"""Which schedules, and how many stages per rank, a request lets the planner compare.

``--schedule auto`` compares every kind torch runs (:class:`ScheduleKind`): one stage per rank
(GPipe, 1F1B), looped stages (interleaved 1F1B at 2 to :data:`MAX_STAGES_PER_RANK` stages per rank,
interleaved zero bubble at 1 to that many) and the V-shaped ones (ZBV, DualPipeV: exactly 2). A
named schedule is compared at each of its counts; ``stages_per_rank`` fixes the count. Counts that
cannot work are errors that name what would.
"""

from __future__ import annotations

from collections.abc import Sequence

from autopart.errors import AutopartError
from autopart.planning.schedule_types import SPLIT_BACKWARD, V_SHAPED, ScheduleKind

__all__ = [
    "AUTO_KINDS",
    "MAX_STAGES_PER_RANK",
    "ONE_STAGE_KINDS",
    "per_device",
    "schedule_kinds",
    "split_backward_with_dp",
    "stage_counts",
]

MAX_STAGES_PER_RANK = 4
"""The most stages per rank the search tries for looped schedules (each count is a stage solve:
the ILP grows with the stages; torchtitan and Megatron run 2 to 4 virtual stages)."""

ONE_STAGE_KINDS = (ScheduleKind.GPIPE, ScheduleKind.ONE_F_ONE_B)

AUTO_KINDS = (
    ScheduleKind.ONE_F_ONE_B,
    ScheduleKind.GPIPE,
    ScheduleKind.INTERLEAVED,
    ScheduleKind.INTERLEAVED_ZB,
    ScheduleKind.ZBV,
    ScheduleKind.DUALPIPEV,
)
"""What ``--schedule auto`` compares, in the order that breaks ties."""


def stage_counts(kind: str, stages_per_rank: int | None = None) -> tuple[int, ...]:
    """The stages per rank ``kind`` is compared at (only ``stages_per_rank`` when given, or none
    where the kind cannot run that many)."""
    kind = ScheduleKind(kind)
    if kind in ONE_STAGE_KINDS:
        counts: tuple[int, ...] = (1,)
    elif kind in V_SHAPED:
        counts = (2,)
    else:
        least = 2 if kind is ScheduleKind.INTERLEAVED else 1
        counts = tuple(range(least, MAX_STAGES_PER_RANK + 1))
    if stages_per_rank is None:
        return counts
    looped = kind in (ScheduleKind.INTERLEAVED, ScheduleKind.INTERLEAVED_ZB)
    fits = stages_per_rank in counts or (looped and stages_per_rank >= counts[0])
    return (stages_per_rank,) if fits else ()


def schedule_kinds(
    schedule: str,
    pp: int | None,
    stages_per_rank: int | None,
    dp: int | None = None,
    *,
    full_recompute: bool = False,
) -> tuple[str, ...]:
    """The kinds ``schedule`` (a kind or ``"auto"``) compares on ``pp`` pipeline ranks and ``dp``
    DDP replicas (``dp=None``: not known yet; an fsdp axis changes nothing), each able to run
    ``stages_per_rank`` stages per rank when that is given; raises :class:`AutopartError` naming
    what works where a named schedule cannot. The kinds that split the backward are left out
    under DDP (it reduces wrong gradients) and with ``full_recompute`` (torch's split backward
    would run each recomputed forward twice); FSDP2 takes them (its reduction waits for the
    step's end, after the last weight gradient)."""
    if stages_per_rank is not None and stages_per_rank < 1:
        raise AutopartError(f"stages_per_rank must be >= 1, got {stages_per_rank}.")
    if schedule == "auto":
        kinds = [k for k in AUTO_KINDS if stage_counts(k, stages_per_rank)]
        if pp is not None and pp < 2:
            kinds = [k for k in kinds if k in ONE_STAGE_KINDS]
        if (dp is not None and dp > 1) or full_recompute:
            kinds = [k for k in kinds if k not in SPLIT_BACKWARD]
        if not kinds:
            raise AutopartError(
                f"no schedule runs {stages_per_rank} stages per rank on pp={pp}: pipelines of one "
                "rank run one stage (gpipe, 1f1b); use --stages-per-rank 1 or more pipeline ranks."
            )
        return tuple(str(k) for k in kinds)
    kind = ScheduleKind(schedule)
    if kind not in ONE_STAGE_KINDS and pp is not None and pp < 2:
        raise AutopartError(
            f"the {kind} schedule needs at least 2 pipeline ranks; use --mesh pp=2 or more, or "
            "the gpipe or 1f1b schedule."
        )
    if not stage_counts(kind, stages_per_rank):
        raise AutopartError(_count_error(kind, stages_per_rank))
    if kind in SPLIT_BACKWARD and dp is not None and dp > 1:
        raise AutopartError(split_backward_with_dp(kind, dp))
    if kind in SPLIT_BACKWARD and full_recompute:
        raise AutopartError(
            f"the {kind} schedule splits the backward into input and weight gradients, and torch "
            "runs a recomputed forward again for each; use --recompute auto or none with it, or "
            "a schedule that runs the whole backward at once (gpipe, 1f1b, interleaved)."
        )
    return (str(kind),)


def split_backward_with_dp(kind: str, dp: int) -> str:
    """Why a zero-bubble schedule does not run with DDP, and what does."""
    return (
        f"the {kind} schedule computes each weight gradient apart from its backward, and torch's "
        f"DistributedDataParallel over dp={dp} replicas then reduces wrong gradients (checked on "
        "gloo); with dp > 1 use 1f1b, gpipe or interleaved, or shard the data over fsdp "
        "instead (FSDP2 takes the split backward)."
    )


def _count_error(kind: ScheduleKind, stages_per_rank: int | None) -> str:
    if kind in ONE_STAGE_KINDS:
        return (
            f"{kind} runs one stage per rank, not {stages_per_rank}: use --stages-per-rank 1, or "
            "the interleaved or interleaved-zb schedule for several stages per rank."
        )
    if kind in V_SHAPED:
        return (
            f"{kind} is V-shaped: it runs exactly two stages per rank (the first and the last on "
            f"rank 0), not {stages_per_rank}: use --stages-per-rank 2, or the interleaved or "
            "interleaved-zb schedule for other counts."
        )
    return (
        f"interleaved runs at least two stages per rank, not {stages_per_rank}: use "
        "--stages-per-rank 2 or more, or the 1f1b or interleaved-zb schedule for one."
    )


def per_device(per_stage: Sequence[float], ranks: Sequence[int]) -> list[float]:
    """Sum per pipeline rank of a per-stage figure; ``ranks[s]`` is the rank of stage ``s``."""
    out = [0.0] * (max(ranks) + 1 if ranks else 0)
    for value, rank in zip(per_stage, ranks):
        out[rank] += value
    return out
