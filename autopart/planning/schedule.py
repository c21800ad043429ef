"""Pipeline schedules as data, and a simulator that turns one into a timeline.

A schedule is one ordered list of actions per device (rank). An action is (stage, kind,
micro-batch) and prints as ``1F0``; stages are global indices. Kinds: ``F`` forward, ``B`` the
whole backward, or the backward split as zero-bubble schedules run it, ``I`` (input gradients, sent
to the previous stage) then later ``W`` (weight gradients). The builders reproduce the compute order
that ``torch.distributed.pipelining`` runs for every kind (:mod:`autopart.planning.pipeline_orders`),
so a simulated timeline describes the program the runtime executes.

Simulation model: a device runs its list strictly in order, one action at a time. ``F`` of stage s,
micro-batch i starts once ``F`` of stage s-1, micro-batch i has ended and its activation has crossed
the boundary (``comm_s[s-1]``); ``B`` or ``I`` of stage s waits for its own ``F`` and for ``B`` or
``I`` of stage s+1 plus ``comm_s[s]`` (the gradient crossing back); ``W`` waits for its ``I``. A
boundary between two stages of one device costs nothing (torch hands the tensor over locally, as
V-shaped schedules do at their turn). Transfers overlap compute (asynchronous send/recv), so they
delay the receiver but never occupy a device. The runtime's own cost per action
(``action_overhead_s``) occupies the device before each action's work and counts as idle time. ``I`` takes ``backward_s - backward_weight_s`` and
``W`` ``backward_weight_s``, except on the first stage, where torch's ``I`` computes nothing (there
is no input gradient to send) and its ``W`` runs the whole backward.

Memory: a stage keeps ``activation_bytes[s]`` per micro-batch from the start of its ``F`` to the
end of its ``B``, or of its ``W``: torch's split backward keeps the autograd graph, and with it the
saved activations, until the weight gradients are computed; between ``I`` and ``W`` it also keeps
the output gradients of the nodes with weights (``weight_grad_bytes[s]``). While a ``B`` or ``I``
runs it also holds ``working_bytes[s]`` (the gradients in flight), on top of what it keeps.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from autopart.planning.pipeline_orders import check_counts, rank_orders, warmup_forwards
from autopart.planning.schedule_types import (
    SPLIT_BACKWARD,
    V_SHAPED,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    ScheduleKind,
    format_schedule,
    parse_schedule,
    stage_ranks,
)

__all__ = [
    "SPLIT_BACKWARD",
    "V_SHAPED",
    "Action",
    "ActionKind",
    "Deferred",
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
    "stage_ranks",
]

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
I, W = ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT  # noqa: E741 (torch's letters)


def build_schedule(
    kind: ScheduleKind | str, num_devices: int, micro_batches: int, stages_per_device: int = 1
) -> Schedule:
    """The per-rank compute order that ``torch.distributed.pipelining`` runs for ``kind``; which
    rank holds which stage is :func:`stage_ranks` (looped, or V-shaped)."""
    kind = ScheduleKind(kind)
    check_counts(kind, num_devices, micro_batches, stages_per_device)
    return rank_orders(kind, num_devices, micro_batches, stages_per_device)


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


def _check_schedule(schedule: Schedule) -> tuple[int, dict[int, int]]:
    """The number of stages and each stage's device, after checking that every stage runs on one
    device, and runs for each micro-batch ``F`` once and either ``B`` once or ``I`` and ``W``."""
    device_of: dict[int, int] = {}
    for device, action in ((d, a) for d, actions in enumerate(schedule) for a in actions):
        if device_of.setdefault(action.stage, device) != device:
            raise ScheduleError(
                f"stage {action.stage} runs on devices {device_of[action.stage]} and {device}: "
                "give all of a stage's actions to one device"
            )
    got = Counter(a for actions in schedule for a in actions)
    n, m = len(device_of), sum(a.stage == 0 and a.kind is F for a in got)
    split = {(a.stage, a.micro_batch) for a in got if a.kind is I}
    want = {
        Action(s, k, i)
        for s in range(n)
        for i in range(m)
        for k in ((F, I, W) if (s, i) in split else (F, B))
    }
    if n == 0 or got.keys() != want or max(got.values()) > 1:
        odd = sorted(str(a) for a in (got.keys() ^ want) | {a for a, c in got.items() if c > 1})
        raise ScheduleError(
            f"the schedule has {n} stages and {m} micro-batches but lacks or repeats {odd[:6]}: "
            "every stage 0..n-1 must run, for each micro-batch 0..m-1, F exactly once and either "
            "B once or I and W once each"
        )
    return n, device_of


def _per(name: str, values: Sequence[float] | None, count: int, per: str) -> tuple[float, ...]:
    if values is None:
        return (0.0,) * count
    if len(values) != count or any(not x >= 0 for x in values):
        raise ScheduleError(f"{name} needs {count} values >= 0, one per {per}; got {values!r}")
    return tuple(values)


@dataclass(frozen=True, slots=True)
class _Costs:
    """Per-stage seconds of each kind of action, and per-boundary transfer seconds."""

    seconds: dict[ActionKind, tuple[float, ...]]
    comm: tuple[float, ...]
    device_of: dict[int, int]

    def of(self, action: Action) -> float:
        return self.seconds[action.kind][action.stage]

    def lag(self, boundary: int) -> float:
        """Transfer time across ``boundary`` (none between two stages of one device)."""
        local = self.device_of[boundary] == self.device_of[boundary + 1]
        return 0.0 if local else self.comm[boundary]


def _costs(
    n: int,
    device_of: dict[int, int],
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    backward_weight_s: Sequence[float] | None,
    comm_s: Sequence[float] | None,
) -> _Costs:
    fwd, bwd = _per("forward_s", forward_s, n, "stage"), _per("backward_s", backward_s, n, "stage")
    weight = _per("backward_weight_s", backward_weight_s, n, "stage")
    if any(w > b * (1 + 1e-9) for w, b in zip(weight, bwd)):
        raise ScheduleError(
            f"backward_weight_s {weight!r} exceeds backward_s {bwd!r} on some stage: it is the "
            "weight-gradient part of the backward"
        )
    # torch's first stage has no input gradient to compute: its I is empty, its W the whole backward
    inputs = tuple(0.0 if s == 0 else b - w for s, (b, w) in enumerate(zip(bwd, weight)))
    weights = (bwd[0], *weight[1:]) if n else ()
    seconds = {F: fwd, B: bwd, I: inputs, W: weights}
    return _Costs(seconds, _per("comm_s", comm_s, n - 1, "stage boundary"), device_of)


def simulate(
    schedule: Schedule,
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    *,
    backward_weight_s: Sequence[float] | None = None,
    comm_s: Sequence[float] | None = None,
    activation_bytes: Sequence[int] | None = None,
    weight_grad_bytes: Sequence[int] | None = None,
    static_bytes: Sequence[int] | None = None,
    working_bytes: Sequence[int] | None = None,
    action_overhead_s: float = 0.0,
    tail_s: float = 0.0,
    cores: float | None = None,
    deferred: Deferred | None = None,
) -> Timeline:
    """Run ``schedule`` on ideal devices; per-stage costs are for one micro-batch (module docstring).
    ``backward_weight_s`` (default 0) is the part of ``backward_s`` that ``W`` runs.
    ``action_overhead_s`` is the pipeline runtime's own cost per action (``DeviceSpec.
    pipeline_action_s``): it occupies the device before each action's work, is not work (it
    counts in the bubble), and delays what waits on the action. ``tail_s`` is what the step does
    after the pipeline drains (the gradient sync and the optimizer step): the step ends that much
    after its last action, and like the per-action cost it is not pipeline work. ``cores``: the
    cores the devices share (CPU ranks on one host; ``None``: one per device): while more devices
    are busy than there are cores, each runs at ``cores / busy`` of its speed (the operating
    system's time sharing, as a fluid), its actions and their runtime cost alike.
    ``working_bytes[s]``: what a ``B`` or ``I`` of stage ``s`` holds while it runs, on top of
    what is kept (the gradients in flight; module docstring). ``deferred``: the training state
    held only from a stage's first backward on (:class:`Deferred`)."""
    for name, value in (("action_overhead_s", action_overhead_s), ("tail_s", tail_s)):
        if not value >= 0:
            raise ScheduleError(f"{name} must be >= 0 seconds, got {value!r}")
    (n, device_of), p = _check_schedule(schedule), len(schedule)
    costs = _costs(n, device_of, forward_s, backward_s, backward_weight_s, comm_s)
    act = _per("activation_bytes", activation_bytes, n, "stage")
    grads = _per("weight_grad_bytes", weight_grad_bytes, n, "stage")
    static = _per("static_bytes", static_bytes, p, "device")
    working = _per("working_bytes", working_bytes, n, "stage")
    if deferred is not None:
        for name in ("deferred", "forward", "first_backward"):
            _per(f"deferred.{name}", getattr(deferred, name), n, "stage")
    run = _Run(schedule, costs, n, action_overhead_s)
    if cores is not None and not cores > 0:
        raise ScheduleError(f"cores must be > 0 (or None: a core per device), got {cores!r}")
    if cores is None:
        run.in_order()
    else:
        run.sharing(cores)
    stuck = [(d, a[run.position[d]]) for d, a in enumerate(schedule) if run.position[d] < len(a)]
    if stuck:
        waits = "; ".join(f"device {d} waits at {a}" for d, a in stuck)
        raise ScheduleError(
            f"the schedule deadlocks ({waits}): each device runs its list in order, so put every "
            "action after the actions it depends on (F of the previous stage, B or I of the "
            "next, I before its W), e.g. start from build_schedule()"
        )
    events, busy = run.events, run.busy

    step_s = max((e.end_s for e in events), default=0.0) + tail_s
    idle = tuple(max(0.0, step_s - b) for b in busy)
    bubble = math.fsum(i / step_s for i in idle) / p if step_s > 0 else 0.0
    held_bytes = _Held(act, grads, static, working, deferred or Deferred.none(n, working))
    peak, in_flight = _memory(schedule, held_bytes, n)
    events.sort(key=lambda e: (e.device, e.start_s))
    return Timeline(step_s, tuple(events), tuple(busy), idle, min(bubble, 1.0), peak, in_flight)


class _Run:
    """One simulated step: every device's events and busy seconds, and how far each got."""

    def __init__(self, schedule: Schedule, costs: _Costs, n: int, overhead_s: float) -> None:
        self.schedule, self.costs, self.n, self.overhead_s = schedule, costs, n, overhead_s
        self.gradient_of = {
            (a.stage, a.micro_batch): a for row in schedule for a in row if a.kind in (B, I)
        }
        p = len(schedule)
        self.end: dict[Action, float] = {}
        self.events: list[Event] = []
        self.position, self.busy = [0] * p, [0.0] * p

    def _ready_s(self, action: Action, free_s: float) -> float | None:
        """When ``action`` may start on a device free at ``free_s`` (``None``: an input is not
        done yet)."""
        deps = _deps(action, self.costs, self.gradient_of, self.n)
        if any(dep not in self.end for dep, _ in deps):
            return None
        return max([free_s, *(self.end[dep] + lag_s for dep, lag_s in deps)])

    def _done(self, device: int, action: Action, start_s: float, end_s: float) -> None:
        self.end[action] = end_s
        self.busy[device] += end_s - start_s
        self.events.append(Event(device, action, start_s, end_s))
        self.position[device] += 1

    def in_order(self) -> None:
        """A core per device: a device runs until its next action lacks an input, then sleeps
        until that input is done. Start times are fixed by the inputs and the device order, so
        the visiting order is irrelevant."""
        free_s = [0.0] * len(self.schedule)
        awake, asleep = list(range(len(self.schedule))), defaultdict[Action, list[int]](list)
        while awake:
            device = awake.pop()
            actions = self.schedule[device]
            while self.position[device] < len(actions):
                action = actions[self.position[device]]
                ready_s = self._ready_s(action, free_s[device])
                if ready_s is None:
                    missing = next(
                        d
                        for d, _ in _deps(action, self.costs, self.gradient_of, self.n)
                        if d not in self.end
                    )
                    asleep[missing].append(device)
                    break
                start_s = ready_s + self.overhead_s
                free_s[device] = start_s + self.costs.of(action)
                self._done(device, action, start_s, free_s[device])
                awake += asleep.pop(action, [])

    def sharing(self, cores: float) -> None:
        """``cores`` shared by the devices: time advances from one change to the next (an action
        or its runtime cost ends, a waiting action's input arrives); in between, each of the
        ``k`` busy devices progresses at ``min(1, cores / k)``."""
        p, now = len(self.schedule), 0.0
        ready: list[float | None] = [None] * p  # when the device's next action may start
        left = [[0.0, 0.0] for _ in range(p)]  # its runtime cost and its work still to run
        start = [0.0] * p

        def arm(device: int) -> None:
            actions = self.schedule[device]
            if self.position[device] >= len(actions):
                ready[device] = None
                return
            action = actions[self.position[device]]
            ready[device] = at = self._ready_s(action, now)
            left[device] = [self.overhead_s, self.costs.of(action)]
            if at is not None and self.overhead_s == 0:
                start[device] = at  # no runtime cost to run first: the work starts when ready

        for device in range(p):
            arm(device)
        while True:
            armed = [(d, r) for d, r in enumerate(ready) if r is not None]
            busy = [d for d, r in armed if r <= now]
            waiting = [r for _, r in armed if r > now]
            if not busy and not waiting:
                return
            rate = min(1.0, cores / len(busy)) if busy else 1.0
            step = min(
                [w - now for w in waiting] + [(left[d][0] or left[d][1]) / rate for d in busy]
            )
            now += step
            for d in busy:
                phase = 0 if left[d][0] > 0 else 1
                left[d][phase] = max(0.0, left[d][phase] - step * rate)
                if phase == 0 and left[d][0] <= 1e-15 * max(1.0, now):
                    left[d][0], start[d] = 0.0, now
                if phase == 1 and left[d][1] <= 1e-15 * max(1.0, now):
                    self._done(d, self.schedule[d][self.position[d]], start[d], now)
                    arm(d)
            for d in range(p):
                if ready[d] is None:
                    arm(d)


def _deps(
    action: Action, costs: _Costs, gradient_of: dict[tuple[int, int], Action], n: int
) -> list[tuple[Action, float]]:
    """The actions whose results ``action`` consumes, each with the transfer time after it."""
    s, i = action.stage, action.micro_batch
    if action.kind is F:
        return [(Action(s - 1, F, i), costs.lag(s - 1))] if s > 0 else []
    if action.kind is W:
        return [(Action(s, I, i), 0.0)]
    deps = [(Action(s, F, i), 0.0)]
    if s < n - 1:
        deps.append((gradient_of[s + 1, i], costs.lag(s)))
    return deps


@dataclass(frozen=True, slots=True)
class Deferred:
    """Per stage, training state a device holds only from the stage's first backward on
    (:func:`autopart.planning.stage_memory.deferred_state`: FSDP2's unsharded gradients, and
    layers resharded after forward): ``deferred`` is held from the end of the stage's first
    backward (``B`` or ``I``) on, and is left out of the device's static bytes; a forward holds
    ``forward`` more while it runs; the stage's first backward holds ``first_backward`` on top
    of what is kept, in place of its working set."""

    deferred: Sequence[float]
    forward: Sequence[float]
    first_backward: Sequence[float]

    @classmethod
    def none(cls, n: int, working: Sequence[float]) -> Deferred:
        """Nothing deferred: the first backward like the others."""
        return cls([0.0] * n, [0.0] * n, working)


@dataclass(frozen=True, slots=True)
class _Held:
    """The byte counts :func:`simulate` was given, per stage (``static``: per device)."""

    act: Sequence[float]
    grads: Sequence[float]
    static: Sequence[float]
    working: Sequence[float]
    deferred: Deferred


def _memory(
    schedule: Schedule, held_bytes: _Held, n: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Each device runs one action at a time, so memory depends only on the order: an F allocates
    # its stage's activation when it starts, the matching B (or W) frees it when it ends, and a B
    # or I holds its working gradients while it runs; an I (on a stage that computes one) holds
    # the output gradients its W needs. State held from a stage's first backward on: Deferred.
    act, grads, working = held_bytes.act, held_bytes.grads, held_bytes.working
    later = held_bytes.deferred
    peak: list[int] = []
    live, most = [0] * n, [0] * n
    backed: set[int] = set()  # stages whose first backward has run
    for device, actions in enumerate(schedule):
        held = highest = 0.0
        for a in actions:
            kept = grads[a.stage] if a.stage > 0 else 0.0
            if a.kind is not F and a.kind is not W:
                first = a.stage not in backed
                extra = later.first_backward[a.stage] if first else working[a.stage]
                highest = max(highest, held + extra)
                held += later.deferred[a.stage] if first else 0.0
                backed.add(a.stage)
            if a.kind is F:
                held += act[a.stage]
                highest = max(highest, held + later.forward[a.stage])
                live[a.stage] += 1
                most[a.stage] = max(most[a.stage], live[a.stage])
            elif a.kind is I:
                held += kept
            else:
                held -= act[a.stage] + (kept if a.kind is W else 0.0)
                live[a.stage] -= 1
            highest = max(highest, held)
        peak.append(round(held_bytes.static[device] + highest))
    return tuple(peak), tuple(most)


def bubble_closed_form(
    num_devices: int,
    micro_batches: int,
    stages_per_device: int = 1,
    kind: ScheduleKind | str = ScheduleKind.ONE_F_ONE_B,
) -> float:
    """Idle fraction of a step with equal stages and free communication: (p-1)/(v*m + p-1).

    GPipe (Huang et al. 2019) and 1F1B have v = 1; interleaved 1F1B divides the fill and drain by v
    (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training ...", section 2.2.2).
    That needs m >= p. torch also runs interleaved with m < p, where a micro-batch returns to rank 0
    for its next stage before rank 0 has work: the step is (v*p + m - 1) slots of v*m busy ones, i.e.
    (v*(p-m) + m-1)/(v*p + m-1), which this returns (the two agree at m = p and for v = 1).

    The kinds that split the backward (:data:`SPLIT_BACKWARD`) are given for equal forward, input-
    gradient and weight-gradient times (Qi et al. 2024, "Zero Bubble Pipeline Parallelism": ZB-H1
    idles (p-1)(T_F + T_B - T_W) per device, T_B the input gradient): a device works 3vm of them
    and idles p-1, so (p-1)/(3vm + p-1). torch's orders reach it for interleaved zero bubble once
    m >= p, for ZBV once m >= 2p - 1 and for DualPipeV at every count it runs (m >= 2p).
    """
    p, m, v = num_devices, micro_batches, stages_per_device
    if ScheduleKind(kind) in SPLIT_BACKWARD:
        return (p - 1) / (3 * v * m + p - 1)
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
    activations, against p for 1F1B (Narayanan et al. 2021, section 2.2.2). The zero-bubble kinds
    hold a chunk from its F to its W (the autograd graph lives until then): counted on the
    schedule itself.
    """
    kind, p, m, v = ScheduleKind(kind), num_devices, micro_batches, stages_per_device
    check_counts(kind, p, m, v)
    if not 0 <= stage_rank < p:
        raise ScheduleError(f"stage_rank={stage_rank} must lie in 0..{p - 1} (num_devices={p})")
    if kind is ScheduleKind.GPIPE:
        return m
    if kind is ScheduleKind.ONE_F_ONE_B:
        return min(p - stage_rank, m)
    if kind is ScheduleKind.INTERLEAVED:
        return min(warmup_forwards(stage_rank, p, m, v) + 1, v * m)
    schedule = rank_orders(kind, p, m, v)
    ones = [1.0] * (p * v)
    nothing = [0.0] * (p * v)
    held = _Held(ones, nothing, [0.0] * p, nothing, Deferred.none(p * v, nothing))
    return _memory(schedule, held, p * v)[0][stage_rank]
