"""The compute order each rank runs under every schedule kind, as ``torch.distributed.pipelining``
2.13 computes it (``ScheduleGPipe``, ``Schedule1F1B``, and the ``pipeline_order`` of
``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble`` and
``ScheduleDualPipeV``), with torch's idle slots dropped and its overlapped ``F`` + ``B`` pairs
(DualPipeV) written as the two actions torch runs one after the other. ``tests/unit/test_schedule.py``
checks every kind against torch's own classes."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable

from autopart.planning.schedule_types import (
    V_SHAPED,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    ScheduleKind,
)

__all__ = ["check_counts", "rank_orders", "warmup_forwards"]

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
I, W = ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT  # noqa: E741 (torch's letters)
_LOOPED_MULTI = (ScheduleKind.INTERLEAVED, ScheduleKind.INTERLEAVED_ZB)


def check_counts(kind: ScheduleKind, p: int, m: int, v: int) -> None:
    """Raise :class:`ScheduleError`, naming what would work, unless torch runs ``kind`` on ``p``
    ranks with ``v`` stages each and ``m`` micro-batches."""
    if p < 1 or m < 1:
        raise ScheduleError(f"num_devices={p}, micro_batches={m}: both must be >= 1")
    if kind in (ScheduleKind.GPIPE, ScheduleKind.ONE_F_ONE_B) and v != 1:
        raise ScheduleError(
            f"{kind} places one stage per device, got stages_per_device={v}: pass 1, or use "
            "the 'interleaved' or 'interleaved-zb' schedule for several stages per device"
        )
    if kind in V_SHAPED and v != 2:
        raise ScheduleError(
            f"{kind} places exactly two stages on each device, in a V (torch's {kind} schedule "
            f"rejects other counts), got stages_per_device={v}: pass 2, or use 'interleaved' or "
            "'interleaved-zb' for other counts"
        )
    if kind is ScheduleKind.ONE_F_ONE_B and m < p:
        raise ScheduleError(
            f"1f1b needs micro_batches >= num_devices (torch's Schedule1F1B rejects fewer), got "
            f"{m} < {p}: use at least {p} micro-batches, or the 'gpipe' schedule"
        )
    if kind is ScheduleKind.DUALPIPEV and m < 2 * p:
        raise ScheduleError(
            f"dualpipev needs at least as many micro-batches as stages (torch's ScheduleDualPipeV "
            f"rejects fewer), got {m} < {2 * p}: use at least {2 * p} micro-batches, or the "
            "'zbv' schedule"
        )
    if kind is ScheduleKind.INTERLEAVED and v < 2:
        raise ScheduleError(
            f"interleaved needs stages_per_device >= 2, got {v}: pass 2 or more, or use '1f1b'"
        )
    if kind in _LOOPED_MULTI and m % max(1, m // p):
        raise ScheduleError(
            f"{kind} splits micro-batches into max(1, m // p) = {m // p} equal rounds "
            f"(torch's {kind} schedule), which {m} is not: use a multiple of {p}"
        )


@functools.lru_cache(maxsize=256)
def rank_orders(kind: ScheduleKind, p: int, m: int, v: int) -> Schedule:
    """Every rank's actions under ``kind`` (counts already checked); memoized (a schedule is
    tuples of frozen actions, and the mesh search simulates the same few a thousand times)."""
    if kind is ScheduleKind.GPIPE:
        return tuple(
            tuple(Action(r, F, i) for i in range(m)) + tuple(Action(r, B, i) for i in range(m))
            for r in range(p)
        )
    build: Callable[[int, int, int, int], tuple[Action, ...]] = {
        ScheduleKind.ONE_F_ONE_B: lambda r, p, m, v: _one_f_one_b(r, p, m),
        ScheduleKind.INTERLEAVED: lambda r, p, m, v: _looped(r, p, m, v, zero_bubble=False),
        ScheduleKind.INTERLEAVED_ZB: lambda r, p, m, v: _looped(r, p, m, v, zero_bubble=True),
        ScheduleKind.ZBV: lambda r, p, m, v: _zbv(r, p, m),
        ScheduleKind.DUALPIPEV: lambda r, p, m, v: _dualpipev(r, p, m),
    }[kind]
    return tuple(build(r, p, m, v) for r in range(p))


def _one_f_one_b(rank: int, p: int, m: int) -> tuple[Action, ...]:
    # Schedule1F1B._step_microbatches: p - rank warm-up forwards, then B/F pairs, then the rest B.
    # (Its _get_pipeline_order, used only for display, numbers the last rank's forwards from 1.)
    warmup = min(m, p - rank)
    actions = [Action(rank, F, i) for i in range(warmup)]
    for i in range(m):
        actions.append(Action(rank, B, i))
        if warmup + i < m:
            actions.append(Action(rank, F, warmup + i))
    return tuple(actions)


def warmup_forwards(rank: int, p: int, m: int, v: int, factor: int = 2) -> int:
    """torch's ``_get_warmup_ops``: forwards before a looped rank's first backward; ``factor`` 2 for
    interleaved 1F1B, 1 for interleaved zero bubble."""
    per_round = m // max(1, m // p)
    return min((v - 1) * per_round + factor * (p - 1 - rank), m * v)


def _looped(rank: int, p: int, m: int, v: int, *, zero_bubble: bool) -> tuple[Action, ...]:
    # torch's _get_1f1b_rank_ops with its idle slots dropped: op k runs the forward of step k
    # (after warm-up, forward then backward), then the remaining backwards. Zero bubble runs I for
    # B, and from the rank-th steady step on a W after each, oldest first; the rest W at the end.
    per_round = m // max(1, m // p)
    warmup = warmup_forwards(rank, p, m, v, factor=1 if zero_bubble else 2)
    backward = I if zero_bubble else B
    next_mb: dict[tuple[int, ActionKind], int] = defaultdict(int)

    def take(stage: int, kind: ActionKind) -> Action:
        next_mb[stage, kind] += 1
        return Action(stage, kind, next_mb[stage, kind] - 1)

    def backward_stage(op: int) -> int:
        return (v - 1 - ((op - warmup) // per_round) % v) * p + rank

    actions, done = [], []
    for op in range(m * v + warmup):
        if op < m * v:
            actions.append(take(((op // per_round) % v) * p + rank, F))
        if op >= warmup:
            actions.append(take(backward_stage(op), backward))
            done.append(backward_stage(op))
            if zero_bubble and op - warmup >= rank:
                actions.append(take(done[sum(a.kind is W for a in actions)], W))
    if zero_bubble:
        while (weights := sum(a.kind is W for a in actions)) < len(done):
            actions.append(take(done[weights], W))
    return tuple(actions)


def _zbv(rank: int, p: int, m: int) -> tuple[Action, ...]:
    # ScheduleZBVZeroBubble._calculate_single_rank_operations: planned for at least 2p - 1
    # micro-batches, then the actions of the micro-batches beyond m dropped.
    n = max(2 * p - 1, m)
    first, second = rank, 2 * p - 1 - rank
    count: dict[tuple[int, ActionKind], int] = defaultdict(int)
    actions: list[Action] = []

    def add(stage: int, *kinds: ActionKind) -> None:
        for kind in kinds:
            actions.append(Action(stage, kind, count[stage, kind]))
            count[stage, kind] += 1

    for _ in range(2 * (p - rank) - 1):
        add(first, F)
    for _ in range(rank):
        add(second, F)
        add(first, F)
    for _ in range(p - rank):
        add(second, F, I, W)
    while count[second, F] < count[first, F] or count[first, F] < n:
        if count[first, F] < n:
            add(first, F)
        add(first, I, W)
        add(second, F, I, W)
    for _ in range(rank):
        add(first, I)
        add(second, I)
    for _ in range(p - rank):
        add(first, I, W)
    while count[second, W] < count[second, I]:
        add(second, W)
    while count[first, W] < count[first, I]:
        add(first, W)
    return tuple(a for a in actions if a.micro_batch < m)


def _dualpipev(rank: int, p: int, m: int) -> tuple[Action, ...]:
    # ScheduleDualPipeV._calculate_single_rank_operations, its overlapped F + B pairs as the two
    # actions torch runs in turn. A full B takes the micro-batch count of I; each I queues its W.
    first, second = rank, 2 * p - 1 - rank
    count: dict[tuple[int, ActionKind], int] = defaultdict(int)
    pending: list[Action] = []
    actions: list[Action] = []

    def add(stage: int, kind: ActionKind) -> None:
        counted = I if kind is B else kind
        action = Action(stage, kind, count[stage, counted])
        count[stage, counted] += 1
        actions.append(action)
        if kind is I:
            pending.append(Action(stage, W, action.micro_batch))

    def weight() -> None:
        if pending:
            actions.append(pending.pop(0))

    for _ in range(2 * (p - rank - 1)):
        add(first, F)
    for _ in range(rank + 1):
        add(first, F)
        add(second, F)
    for _ in range(p - rank - 1):
        add(second, I)
        weight()
        add(second, F)
    for _ in range(m - 2 * p + rank + 1):
        add(first, F)
        add(second, B)
        add(second, F)
        add(first, B)
    for _ in range(p - rank - 1):
        add(second, B)
        add(second, F)
        add(first, B)
    split = False
    for i in range(rank + 1):  # the last micro-batches split their backward, half-way through
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        add(second, I if split else B)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        add(first, I if split else B)
    for _ in range(p - rank - 1):
        weight()
        add(first, I if split else B)
    for _ in range(rank + 1):
        weight()
    return tuple(actions)
