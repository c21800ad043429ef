"""What ``autopart run`` measures on each rank: wall times of steps and of each stage's actions,
the last step as a timeline, and the first step's peak memory.

Times come from ``time.perf_counter`` (Linux's monotonic clock, the same in every process of one
machine, so the ranks' events line up on one axis). A stage's forward is timed by hooks on its
module (its kernels alone); its forward, backward and weight-gradient *chunks* (torch's
``PipelineStage`` methods, which the schedules call once per micro-batch) by wrapping them: their
sum is the rank's busy time, and the chunks of the last step are its measured timeline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from autopart.planning.schedule import Action, ActionKind, Event, Timeline

__all__ = [
    "RankSummary",
    "StepClock",
    "after_first",
    "measured_timeline",
    "stage_chunk_s",
    "timeline_from_json",
    "timeline_to_json",
]


@dataclass(frozen=True, slots=True)
class RankSummary:
    """One rank's measurements, gathered to rank 0."""

    forward_s: dict[int, float]
    """Median forward seconds per micro-batch of each local stage."""
    backward_s: dict[int, float]
    idle_fraction: float
    peak_memory_bytes: int
    step_start_s: float
    """When the last step started (``perf_counter``)."""
    events: tuple[tuple[int, str, float, float], ...]
    """The last step's chunks: (stage, action such as ``1F0``, start, end)."""


@dataclass(slots=True)
class StepClock:
    """Wall times of one rank's training: every step, and each local stage's forward and backward
    chunks (one per micro-batch)."""

    forward_s: dict[int, list[float]] = field(default_factory=dict)
    backward_s: dict[int, list[float]] = field(default_factory=dict)
    weight_s: dict[int, list[float]] = field(default_factory=dict)
    """Weight-gradient chunks (zero-bubble schedules run them apart from the backward)."""
    loss_s: list[float] = field(default_factory=list)
    """The loss's forward per micro-batch, on the last stage's rank: counted in that stage's
    forward, as the plan counts it (:mod:`autopart.planning.loss`)."""
    last_stage: int = -1
    busy: list[float] = field(default_factory=list)
    """This rank's forward + backward time in the current step."""
    events: list[tuple[int, str, float, float]] = field(default_factory=list)
    """The current step's chunks (stage, action, start, end)."""
    step_s: list[float] = field(default_factory=list)
    step_start_s: float = 0.0
    idle: list[float] = field(default_factory=list)
    """Per step: the fraction of the step outside this rank's forward and backward work."""
    peak_memory_bytes: int = 0

    @classmethod
    def attach(cls, program: Any) -> StepClock:
        clock = cls()
        for stage in program.local_stages:
            _time_forward(stage.module, clock.forward_s.setdefault(stage.index, []))
            clock.backward_s.setdefault(stage.index, [])
            clock.weight_s.setdefault(stage.index, [])
            _time_chunks(stage.pipeline_stage, stage.index, clock)
        clock.last_stage = program.plan.num_stages - 1
        if any(stage.index == clock.last_stage for stage in program.local_stages):
            program.time_loss(clock.loss_s)
        return clock

    def start_step(self) -> None:
        self.busy.clear()
        self.events.clear()
        self.step_start_s = time.perf_counter()

    def end_step(self) -> None:
        self.step_s.append(time.perf_counter() - self.step_start_s)
        self.idle.append(max(0.0, 1.0 - sum(self.busy) / self.step_s[-1]))

    def summary(self) -> RankSummary:
        """Medians over the steps after the first where there are several (module docstring)."""
        loss = statistics.median(self.loss_s) if self.loss_s else 0.0
        return RankSummary(
            {
                i: (statistics.median(v) if v else 0.0) + (loss if i == self.last_stage else 0.0)
                for i, v in self.forward_s.items()
            },
            {i: _backward_s(v, self.weight_s[i]) for i, v in self.backward_s.items()},
            statistics.median(after_first(self.idle)),
            self.peak_memory_bytes,
            self.step_start_s,
            tuple(self.events),
        )


def after_first(values: list[float]) -> list[float]:
    """The measurements after the first (warm-up) one, where there are several."""
    return values[1:] if len(values) > 1 else values


def _backward_s(backward: list[float], weight: list[float]) -> float:
    """A stage's backward time per micro-batch: the median chunk, or where weight gradients ran
    apart (in W chunks after some of the B chunks), the mean of both over the micro-batches."""
    if not backward:
        return 0.0
    if not weight:
        return statistics.median(backward)
    return (sum(backward) + sum(weight)) / len(backward)


def _time_forward(stage: torch.nn.Module, sink: list[float]) -> None:
    """Record the wall time of every forward call of ``stage`` (one call per micro-batch)."""
    started: list[float] = []
    stage.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    stage.register_forward_hook(lambda *_: sink.append(time.perf_counter() - started.pop()))


def _time_chunks(stage: Any, index: int, clock: StepClock) -> None:
    """Record the time a ``PipelineStage`` spends in each forward, backward and weight-gradient
    chunk (its work on one micro-batch, without waiting for its neighbours): ``clock.busy`` and
    ``clock.events`` get all, ``backward_s`` the backward chunks, ``weight_s`` the weight-gradient
    ones. Wraps the instance's methods, which torch's schedules call per micro-batch (the chunk
    id, their first argument, is the micro-batch)."""

    def timed(
        method: Callable[..., Any], kind: Callable[..., ActionKind], sink: list[float] | None
    ) -> Callable[..., Any]:
        def run(chunk: int, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(chunk, *args, **kwargs)
            finally:
                end = time.perf_counter()
                clock.busy.append(end - start)
                action = Action(index, kind(*args, **kwargs), chunk)
                clock.events.append((index, str(action), start, end))
                if sink is not None:
                    sink.append(end - start)

        return run

    def backward_kind(loss: Any = None, full_backward: bool = True, *_: Any, **__: Any) -> Any:
        return ActionKind.BACKWARD if full_backward else ActionKind.BACKWARD_INPUT

    stage.forward_one_chunk = timed(
        stage.forward_one_chunk, lambda *_, **__: ActionKind.FORWARD, None
    )
    stage.backward_one_chunk = timed(
        stage.backward_one_chunk, backward_kind, clock.backward_s[index]
    )
    stage.backward_weight_one_chunk = timed(
        stage.backward_weight_one_chunk,
        lambda *_, **__: ActionKind.BACKWARD_WEIGHT,
        clock.weight_s[index],
    )


def measured_timeline(
    summaries: Sequence[RankSummary], device_of: Sequence[int], step_s: float
) -> Timeline:
    """The last measured step as a :class:`Timeline`: each stage's chunks from the first rank that
    ran it (one replica), on its pipeline device ``device_of[stage]``, timed from the earliest
    rank's step start; ``step_s`` long. Peak memory per device is the measured one."""
    zero = min(s.step_start_s for s in summaries)
    owner: dict[int, int] = {}  # stage -> the first rank that ran it
    peaks = [0] * (max(device_of) + 1)
    for rank, summary in enumerate(summaries):
        for stage in summary.forward_s:
            owner.setdefault(stage, rank)
            peaks[device_of[stage]] = max(peaks[device_of[stage]], summary.peak_memory_bytes)
    events = [
        Event(device_of[stage], Action.parse(action), start - zero, end - zero)
        for rank, summary in enumerate(summaries)
        for stage, action, start, end in summary.events
        if owner[stage] == rank
    ]
    flat = sorted(events, key=lambda e: (e.device, e.start_s))
    p = len(peaks)
    busy = [sum(e.end_s - e.start_s for e in flat if e.device == d) for d in range(p)]
    idle = tuple(max(0.0, step_s - b) for b in busy)
    bubble = sum(i / step_s for i in idle) / p if step_s > 0 else 0.0
    return Timeline(
        step_s,
        tuple(flat),
        tuple(busy),
        idle,
        min(bubble, 1.0),
        tuple(peaks),
        (0,) * len(device_of),
    )


def stage_chunk_s(timeline: Timeline, num_stages: int) -> tuple[list[float], list[float]]:
    """Per stage, the forward and the backward seconds per micro-batch of ``timeline``'s chunks, as
    :class:`StepClock` measures them (a backward split into ``I`` and ``W``: both, per ``I``). On
    ranks that share cores (:func:`autopart.planning.schedule.simulate`'s ``cores``) a chunk
    takes longer than its stage's work."""
    forward: list[list[float]] = [[] for _ in range(num_stages)]
    backward: list[list[float]] = [[] for _ in range(num_stages)]
    weight: list[list[float]] = [[] for _ in range(num_stages)]
    for e in timeline.events:
        kind, seconds = e.action.kind, e.end_s - e.start_s
        if kind is ActionKind.FORWARD:
            forward[e.action.stage].append(seconds)
        elif kind is ActionKind.BACKWARD_WEIGHT:
            weight[e.action.stage].append(seconds)
        else:
            backward[e.action.stage].append(seconds)
    return (
        [statistics.median(f) if f else 0.0 for f in forward],
        [_backward_s(b, w) for b, w in zip(backward, weight)],
    )


def timeline_to_json(timeline: Timeline) -> dict[str, Any]:
    """A timeline as JSON values: events as ``[device, "1F0", start_s, end_s]``."""
    return {
        "step_time_s": timeline.step_time_s,
        "bubble_fraction": timeline.bubble_fraction,
        "busy_s": list(timeline.busy_s),
        "idle_s": list(timeline.idle_s),
        "peak_memory_bytes": list(timeline.peak_memory_bytes),
        "stages": len(timeline.max_in_flight),
        "events": [[e.device, str(e.action), e.start_s, e.end_s] for e in timeline.events],
    }


def timeline_from_json(raw: dict[str, Any]) -> Timeline:
    """The inverse of :func:`timeline_to_json` (``max_in_flight`` is not kept: zeros)."""
    return Timeline(
        raw["step_time_s"],
        tuple(Event(d, Action.parse(a), s, e) for d, a, s, e in raw["events"]),
        tuple(raw["busy_s"]),
        tuple(raw["idle_s"]),
        raw["bubble_fraction"],
        tuple(raw["peak_memory_bytes"]),
        (0,) * raw["stages"],
    )
