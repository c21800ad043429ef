"""Pipeline schedules as data, and a simulator that turns one into a timeline.

A schedule is one ordered list of actions per device (rank). An action is (stage, forward or
backward, micro-batch) and prints as ``1F0``; stages are global indices. The builders reproduce the
compute order that ``torch.distributed.pipelining`` runs (``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``), so a simulated timeline describes the program the runtime executes.

Simulation model: a device runs its list strictly in order, one action at a time. ``F`` of stage s,
micro-batch i starts once ``F`` of stage s-1, micro-batch i has ended and its activation has crossed
the boundary (``comm_s[s-1]``); ``B`` of stage s waits for its own ``F`` and for ``B`` of stage s+1 plus
``comm_s[s]`` (the gradient crossing back). Transfers overlap compute (asynchronous send/recv), so
they delay the receiver but never occupy a device. A stage keeps ``activation_bytes[s]`` per
micro-batch from the start of its ``F`` to the end of its ``B``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from autopart._compat import StrEnum
from autopart.errors import AutopartError

__all__ = [
    "Action",
    "ActionKind",
    "Event",
    "Schedule",
    "ScheduleError",
    "ScheduleKind",
    "Timeline",
    "bubble_closed_form",
    "build_schedule",
    "format_schedule",
    "in_flight_micro_batches",
    "parse_schedule",
    "simulate",
]


class ScheduleError(AutopartError):
    """A pipeline schedule cannot be built, parsed, simulated or fitted in memory."""


class ActionKind(StrEnum):
    FORWARD = "F"
    BACKWARD = "B"


class ScheduleKind(StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"


F, B = ActionKind.FORWARD, ActionKind.BACKWARD
_ACTION = re.compile(r"(\d+)([FB])(\d+)")


@dataclass(frozen=True, slots=True)
class Action:
    """One compute step: ``Action(1, ActionKind.FORWARD, 0)`` prints and parses as ``"1F0"``."""

    stage: int
    kind: ActionKind
    micro_batch: int

    def __post_init__(self) -> None:
        if self.stage < 0 or self.micro_batch < 0:
            raise ScheduleError(f"{self!r}: stage and micro_batch must be >= 0 (they are indices)")
        object.__setattr__(self, "kind", ActionKind(self.kind))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        match = _ACTION.fullmatch(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot read {text!r} as a pipeline action: write STAGE, F (forward) or B "
                "(backward), MICRO_BATCH, e.g. '1F0' for stage 1's forward of micro-batch 0"
            )
        return cls(int(match.group(1)), ActionKind(match.group(2)), int(match.group(3)))


Schedule = tuple[tuple[Action, ...], ...]
"""One ordered tuple of actions per device (rank)."""


def format_schedule(schedule: Schedule) -> list[list[str]]:
    return [[str(action) for action in actions] for actions in schedule]


def parse_schedule(rows: Sequence[Sequence[str]]) -> Schedule:
    return tuple(tuple(Action.parse(text) for text in row) for row in rows)


def _check_counts(kind: ScheduleKind, p: int, m: int, v: int) -> None:
    if p < 1 or m < 1:
        raise ScheduleError(f"num_devices={p}, micro_batches={m}: both must be >= 1")
    if kind is not ScheduleKind.INTERLEAVED and v != 1:
        raise ScheduleError(
            f"{kind} places one stage per device, got stages_per_device={v}: pass 1, or use "
            "the 'interleaved' schedule for several stages per device"
        )
    if kind is ScheduleKind.ONE_F_ONE_B and m < p:
        raise ScheduleError(
            f"1f1b needs micro_batches >= num_devices (torch's Schedule1F1B rejects fewer), got "
            f"{m} < {p}: use at least {p} micro-batches, or the 'gpipe' schedule"
        )
    if kind is ScheduleKind.INTERLEAVED:
        if v < 2:
            raise ScheduleError(
                f"interleaved needs stages_per_device >= 2, got {v}: pass 2 or more, or use '1f1b'"
            )
        if m % max(1, m // p):
            raise ScheduleError(
                f"interleaved splits micro-batches into max(1, m // p) = {m // p} equal rounds "
                f"(torch's ScheduleInterleaved1F1B), which {m} is not: use a multiple of {p}"
            )


def build_schedule(
    kind: ScheduleKind | str, num_devices: int, micro_batches: int, stages_per_device: int = 1
) -> Schedule:
    """The per-rank compute order that ``torch.distributed.pipelining`` runs for ``kind``.

    Interleaved places stages looped: device r holds stages r, r+p, r+2p, ...
    """
    kind = ScheduleKind(kind)
    p, m, v = num_devices, micro_batches, stages_per_device
    _check_counts(kind, p, m, v)
    if kind is ScheduleKind.GPIPE:
        return tuple(
            tuple(Action(r, F, i) for i in range(m)) + tuple(Action(r, B, i) for i in range(m))
            for r in range(p)
        )
    if kind is ScheduleKind.ONE_F_ONE_B:
        return tuple(_one_f_one_b(r, p, m) for r in range(p))
    return tuple(_interleaved(r, p, m, v) for r in range(p))


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


def _interleaved_warmup(rank: int, p: int, m: int, v: int) -> int:
    per_round = m // max(1, m // p)
    return min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)


def _interleaved(rank: int, p: int, m: int, v: int) -> tuple[Action, ...]:
    # ScheduleInterleaved1F1B._calculate_single_rank_operations with its idle slots dropped: op k
    # runs the forward of step k (after warm-up, forward then backward), then the remaining backwards.
    per_round, warmup = m // max(1, m // p), _interleaved_warmup(rank, p, m, v)
    next_mb: dict[tuple[int, ActionKind], int] = defaultdict(int)

    def take(local: int, kind: ActionKind) -> Action:
        stage = local * p + rank
        next_mb[stage, kind] += 1
        return Action(stage, kind, next_mb[stage, kind] - 1)

    actions = []
    for op in range(m * v + warmup):
        if op < m * v:
            actions.append(take((op // per_round) % v, F))
        if op >= warmup:
            actions.append(take(v - 1 - ((op - warmup) // per_round) % v, B))
    return tuple(actions)


@dataclass(frozen=True, slots=True)
class Event:
    """``action`` ran on ``device`` from ``start_s`` to ``end_s`` (seconds into the step)."""

    device: int
    action: Action
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Timeline:
    """A simulated training step; per-device tuples are indexed by rank, ``max_in_flight`` by stage."""

    step_time_s: float
    events: tuple[Event, ...]
    busy_s: tuple[float, ...]
    idle_s: tuple[float, ...]
    bubble_fraction: float
    peak_memory_bytes: tuple[int, ...]
    max_in_flight: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.busy_s) == len(self.idle_s) == len(self.peak_memory_bytes):
            raise ScheduleError("busy_s, idle_s and peak_memory_bytes need one value per device")

    @property
    def num_devices(self) -> int:
        return len(self.busy_s)


def _check_schedule(schedule: Schedule) -> int:
    """The number of stages, after checking each runs F and B once per micro-batch on one device."""
    device_of: dict[int, int] = {}
    for device, action in ((d, a) for d, actions in enumerate(schedule) for a in actions):
        if device_of.setdefault(action.stage, device) != device:
            raise ScheduleError(
                f"stage {action.stage} runs on devices {device_of[action.stage]} and {device}: "
                "give all of a stage's actions to one device"
            )
    got = Counter(a for actions in schedule for a in actions)
    n, m = len(device_of), sum(a.stage == 0 and a.kind is F for a in got)
    want = {Action(s, k, i) for s in range(n) for k in ActionKind for i in range(m)}
    if n == 0 or got.keys() != want or max(got.values()) > 1:
        odd = sorted(str(a) for a in (got.keys() ^ want) | {a for a, c in got.items() if c > 1})
        raise ScheduleError(
            f"the schedule has {n} stages and {m} micro-batches but lacks or repeats {odd[:6]}: "
            "every stage 0..n-1 must run F and B exactly once for each micro-batch 0..m-1"
        )
    return n


def _per(name: str, values: Sequence[float] | None, count: int, per: str) -> tuple[float, ...]:
    if values is None:
        return (0.0,) * count
    if len(values) != count or any(not x >= 0 for x in values):
        raise ScheduleError(f"{name} needs {count} values >= 0, one per {per}; got {values!r}")
    return tuple(values)


def simulate(
    schedule: Schedule,
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    *,
    comm_s: Sequence[float] | None = None,
    activation_bytes: Sequence[int] | None = None,
    static_bytes: Sequence[int] | None = None,
) -> Timeline:
    """Run ``schedule`` on ideal devices; per-stage costs are for one micro-batch (module docstring)."""
    n, p = _check_schedule(schedule), len(schedule)
    fwd, bwd = _per("forward_s", forward_s, n, "stage"), _per("backward_s", backward_s, n, "stage")
    comm = _per("comm_s", comm_s, n - 1, "stage boundary")
    act = _per("activation_bytes", activation_bytes, n, "stage")
    static = _per("static_bytes", static_bytes, p, "device")

    end: dict[Action, float] = {}
    events: list[Event] = []
    position, free_s, busy = [0] * p, [0.0] * p, [0.0] * p
    # A device runs until its next action lacks an input, then sleeps until that input is done.
    # Start times are fixed by the inputs and the device order, so the visiting order is irrelevant.
    awake, asleep = list(range(p)), defaultdict[Action, list[int]](list)
    while awake:
        device = awake.pop()
        actions = schedule[device]
        while position[device] < len(actions):
            action = actions[position[device]]
            deps = _deps(action, comm, n)
            missing = next((dep for dep, _ in deps if dep not in end), None)
            if missing is not None:
                asleep[missing].append(device)
                break
            start_s = max([free_s[device], *(end[dep] + lag_s for dep, lag_s in deps)])
            cost_s = (fwd if action.kind is F else bwd)[action.stage]
            end[action] = free_s[device] = start_s + cost_s
            busy[device] += cost_s
            events.append(Event(device, action, start_s, start_s + cost_s))
            position[device] += 1
            awake += asleep.pop(action, [])
    stuck = [(d, a[position[d]]) for d, a in enumerate(schedule) if position[d] < len(a)]
    if stuck:
        waits = "; ".join(f"device {d} waits at {a}" for d, a in stuck)
        raise ScheduleError(
            f"the schedule deadlocks ({waits}): each device runs its list in order, so put every "
            "action after the actions it depends on (F of the previous stage, B of the next), "
            "e.g. start from build_schedule()"
        )

    step_s = max((e.end_s for e in events), default=0.0)
    idle = tuple(max(0.0, step_s - b) for b in busy)
    bubble = math.fsum(i / step_s for i in idle) / p if step_s > 0 else 0.0
    peak, in_flight = _memory(schedule, act, static, n)
    events.sort(key=lambda e: (e.device, e.start_s))
    return Timeline(step_s, tuple(events), tuple(busy), idle, min(bubble, 1.0), peak, in_flight)


def _deps(action: Action, comm: Sequence[float], n: int) -> list[tuple[Action, float]]:
    """The actions whose results ``action`` consumes, each with the transfer time after it."""
    s, i = action.stage, action.micro_batch
    if action.kind is F:
        return [(Action(s - 1, F, i), comm[s - 1])] if s > 0 else []
    return [(Action(s, F, i), 0.0)] + ([(Action(s + 1, B, i), comm[s])] if s < n - 1 else [])


def _memory(
    schedule: Schedule, act: Sequence[float], static: Sequence[float], n: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Each device runs one action at a time, so memory depends only on the order: an F allocates
    # its stage's activation when it starts and the matching B frees it when it ends.
    peak: list[int] = []
    live, most = [0] * n, [0] * n
    for device, actions in enumerate(schedule):
        held = highest = 0.0
        for a in actions:
            if a.kind is F:
                held += act[a.stage]
                live[a.stage] += 1
                highest, most[a.stage] = max(highest, held), max(most[a.stage], live[a.stage])
            else:
                held -= act[a.stage]
                live[a.stage] -= 1
        peak.append(round(static[device] + highest))
    return tuple(peak), tuple(most)


def bubble_closed_form(num_devices: int, micro_batches: int, stages_per_device: int = 1) -> float:
    """Idle fraction of a step with equal stages and free communication: (p-1)/(v*m + p-1).

    GPipe (Huang et al. 2019) and 1F1B have v = 1; interleaved 1F1B divides the fill and drain by v
    (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training ...", section 2.2.2).
    That needs m >= p. torch also runs interleaved with m < p, where a micro-batch returns to rank 0
    for its next stage before rank 0 has work: the step is (v*p + m - 1) slots of v*m busy ones, i.e.
    (v*(p-m) + m-1)/(v*p + m-1), which this returns (the two agree at m = p and for v = 1).
    """
    p, m, v = num_devices, micro_batches, stages_per_device
    full = min(m, p)
    return (v * (p - full) + full - 1) / (v * max(m, p) + full - 1)


def in_flight_micro_batches(
    kind: ScheduleKind | str,
    num_devices: int,
    micro_batches: int,
    stage_rank: int,
    stages_per_device: int = 1,
) -> int:
    """Most micro-batch activations that rank ``stage_rank`` holds at once under ``kind``.

    GPipe: m. 1F1B: min(p - rank, m). Interleaved counts (stage, micro-batch) chunks across the
    device's v stages, each holding 1/v of its layers: torch warms up with
    w = min((v-1) * m_round + 2 * (p-1-rank), v*m) forwards (m_round = m // max(1, m // p), i.e. p
    when p divides m), then alternates F before B, so the peak is min(w + 1, v*m). Once p divides m
    and v*m >= v*p + p - 1, rank 0 holds v*p + p - 1 chunks: p + (p-1)/v micro-batches' worth of
    activations, against p for 1F1B (Narayanan et al. 2021, section 2.2.2).
    """
    kind, p, m, v = ScheduleKind(kind), num_devices, micro_batches, stages_per_device
    _check_counts(kind, p, m, v)
    if not 0 <= stage_rank < p:
        raise ScheduleError(f"stage_rank={stage_rank} must lie in 0..{p - 1} (num_devices={p})")
    if kind is ScheduleKind.GPIPE:
        return m
    if kind is ScheduleKind.ONE_F_ONE_B:
        return min(p - stage_rank, m)
    return min(_interleaved_warmup(stage_rank, p, m, v) + 1, v * m)
