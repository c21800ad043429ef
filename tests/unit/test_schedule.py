from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.pipelining import schedules as torch_schedules

from autopart.planning.gantt import render_svg
from autopart.planning.schedule import (
    Action,
    ActionKind,
    ScheduleError,
    ScheduleKind,
    bubble_closed_form,
    build_schedule,
    format_schedule,
    in_flight_micro_batches,
    parse_schedule,
    simulate,
)

F, B = ActionKind.FORWARD, ActionKind.BACKWARD


# torch's schedules, driven without a process group ------------------------------------------------


class _FakeStage:
    """Just enough of a PipelineStage for torch's schedules to run or compute their order."""

    def __init__(self, index: int, group_size: int, num_stages: int) -> None:
        self.stage_index, self.group_size, self.num_stages = index, group_size, num_stages
        self.group_rank = index % group_size
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.ran: list[str] = []

    def forward_one_chunk(self, mb: int, *args: Any, **kwargs: Any) -> None:
        self.ran.append(f"{self.stage_index}F{mb}")

    def backward_one_chunk(self, mb: int, *args: Any, **kwargs: Any) -> None:
        self.ran.append(f"{self.stage_index}B{mb}")

    def __getattr__(self, name: str) -> Any:  # get_*_ops, perform_reduce_grad, ...
        return lambda *args, **kwargs: []


def _torch_single_stage_run(kind: ScheduleKind, p: int, m: int) -> list[list[str]]:
    """What ScheduleGPipe / Schedule1F1B actually execute (their _step_microbatches) on each rank."""
    cls = {"gpipe": torch_schedules.ScheduleGPipe, "1f1b": torch_schedules.Schedule1F1B}[kind]
    order = []
    for rank in range(p):
        stage = _FakeStage(rank, p, p)
        schedule = cls(stage, m)  # type: ignore[arg-type]
        schedule._initialize_stage = lambda *args, **kwargs: None  # type: ignore[method-assign]
        schedule._step_microbatches()
        order.append(stage.ran)
    return order


def _torch_interleaved_order(p: int, m: int, v: int) -> list[list[str]]:
    compute = (torch_schedules.FORWARD, torch_schedules.FULL_BACKWARD)
    order = []
    for rank in range(p):
        stages = [_FakeStage(rank + k * p, p, p * v) for k in range(v)]
        schedule = torch_schedules.ScheduleInterleaved1F1B(stages, m)  # type: ignore[arg-type]
        actions = schedule.pipeline_order[rank]
        order.append([str(a) for a in actions if a is not None and a.computation_type in compute])
    return order


# actions as data ---------------------------------------------------------------------------------


@given(st.integers(0, 10_000), st.sampled_from(list(ActionKind)), st.integers(0, 10_000))
def test_action_str_parse_round_trip(stage: int, kind: ActionKind, micro_batch: int) -> None:
    action = Action(stage, kind, micro_batch)
    assert Action.parse(str(action)) == action


def test_action_prints_like_torch() -> None:
    assert str(Action(1, F, 0)) == "1F0"
    assert str(Action(1, F, 0)) == str(torch_schedules._Action.from_str("1F0"))


@pytest.mark.parametrize("text", ["", "1X0", "F0", "1F", "-1F0", "1f0", "1F0x"])
def test_action_parse_errors_name_the_format(text: str) -> None:
    with pytest.raises(ScheduleError, match=r"e\.g\. '1F0'"):
        Action.parse(text)


# builders ----------------------------------------------------------------------------------------


def test_pinned_orders_p2_m4() -> None:
    assert format_schedule(build_schedule("gpipe", 2, 4))[0] == [
        *["0F0", "0F1", "0F2", "0F3"],
        *["0B0", "0B1", "0B2", "0B3"],
    ]
    assert format_schedule(build_schedule("1f1b", 2, 4)) == [
        ["0F0", "0F1", "0B0", "0F2", "0B1", "0F3", "0B2", "0B3"],
        ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"],
    ]
    assert format_schedule(build_schedule("interleaved", 2, 4, 2)) == [
        [
            *["0F0", "0F1", "2F0", "2F1", "0F2", "2B0", "0F3", "2B1"],
            *["2F2", "0B0", "2F3", "0B1", "2B2", "2B3", "0B2", "0B3"],
        ],
        [
            *["1F0", "1F1", "3F0", "3B0", "3F1", "3B1", "1F2", "1B0"],
            *["1F3", "1B1", "3F2", "3B2", "3F3", "3B3", "1B2", "1B3"],
        ],
    ]


@pytest.mark.parametrize("kind", [ScheduleKind.GPIPE, ScheduleKind.ONE_F_ONE_B])
@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 2), (2, 5), (3, 4), (4, 8), (4, 11)])
def test_single_stage_orders_match_what_torch_runs(kind: ScheduleKind, p: int, m: int) -> None:
    assert format_schedule(build_schedule(kind, p, m)) == _torch_single_stage_run(kind, p, m)


@pytest.mark.parametrize(
    ("p", "m", "v"), [(2, 2, 2), (2, 4, 2), (2, 3, 3), (3, 6, 2), (4, 3, 2), (4, 8, 2), (4, 10, 3)]
)
def test_interleaved_order_matches_torch_pipeline_order(p: int, m: int, v: int) -> None:
    assert format_schedule(build_schedule("interleaved", p, m, v)) == _torch_interleaved_order(
        p, m, v
    )


@pytest.mark.parametrize(("p", "m"), [(4, 9), (4, 13), (3, 7), (2, 5)])
def test_interleaved_rejects_what_torch_rejects(p: int, m: int) -> None:
    with pytest.raises(ValueError, match="rounds"):
        _torch_interleaved_order(p, m, 2)
    with pytest.raises(ScheduleError, match=f"use a multiple of {p}"):
        build_schedule("interleaved", p, m, 2)


def test_schedule_round_trips_through_strings() -> None:
    schedule = build_schedule("interleaved", 3, 6, 2)
    assert parse_schedule(format_schedule(schedule)) == schedule


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("1f1b", 4, 3), "micro_batches >= num_devices.*at least 4 micro-batches"),
        (("gpipe", 0, 3), "must be >= 1"),
        (("gpipe", 2, 0), "must be >= 1"),
        (("1f1b", 2, 4, 2), "pass 1, or use the 'interleaved'"),
        (("interleaved", 2, 4, 1), "stages_per_device >= 2"),
        (("pipedream", 2, 4), "pipedream"),
    ],
)
def test_build_errors(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_schedule(*args)


# simulation --------------------------------------------------------------------------------------

GRID = [(p, m) for p in range(1, 9) for m in range(p, 4 * p + 1)]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_bubble_equals_closed_form(kind: str) -> None:
    # Equal stages, backward = 2 x forward, free comm: the step is (m + p - 1) * (f + b) exactly,
    # for 1F1B too: its critical path is the first forward wave, m (f + b) on the last stage, and
    # the last backward wave.
    for p, m in GRID:
        timeline = simulate(build_schedule(kind, p, m), [1.0] * p, [2.0] * p)
        assert timeline.step_time_s == pytest.approx((m + p - 1) * 3.0, abs=1e-9)
        assert timeline.bubble_fraction == pytest.approx(bubble_closed_form(p, m), abs=1e-9)


def test_interleaved_bubble_equals_closed_form() -> None:
    # Holds wherever torch accepts m >= p; for m < p (which torch also runs) the extra idle time of
    # a micro-batch waiting to come back around is part of the closed form too.
    for p in range(1, 7):
        for v in (2, 3, 4):
            for m in range(1, 3 * p + 1):
                if m % max(1, m // p):
                    continue
                n = p * v
                timeline = simulate(build_schedule("interleaved", p, m, v), [1.0] * n, [2.0] * n)
                expected = bubble_closed_form(p, m, v)
                assert timeline.bubble_fraction == pytest.approx(expected, abs=1e-9), (p, m, v)
    assert bubble_closed_form(4, 8, 2) == 3 / 19


def test_in_flight_per_stage() -> None:
    for p, m in GRID:
        gpipe = simulate(build_schedule("gpipe", p, m), [1.0] * p, [2.0] * p)
        one_f_one_b = simulate(build_schedule("1f1b", p, m), [1.0] * p, [2.0] * p)
        assert gpipe.max_in_flight == (m,) * p
        assert one_f_one_b.max_in_flight == tuple(min(p - s, m) for s in range(p))
        for s in range(p):
            assert in_flight_micro_batches("gpipe", p, m, s) == m
            assert in_flight_micro_batches("1f1b", p, m, s) == min(p - s, m)


def test_interleaved_in_flight_formula_matches_simulation() -> None:
    for p, m, v in [(2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 2, 2), (4, 10, 2), (1, 3, 2)]:
        n = p * v
        # one byte per (stage, micro-batch) activation makes peak memory the in-flight chunk count
        timeline = simulate(
            build_schedule("interleaved", p, m, v), [1.0] * n, [2.0] * n, activation_bytes=[1] * n
        )
        expected = tuple(in_flight_micro_batches("interleaved", p, m, r, v) for r in range(p))
        assert timeline.peak_memory_bytes == expected
    assert in_flight_micro_batches("interleaved", 4, 8, 0, 2) == 2 * 4 + 4 - 1
    assert in_flight_micro_batches("interleaved", 4, 4, 0, 2) == 2 * 4  # every chunk, v*m


def test_comm_delays_and_memory() -> None:
    schedule = build_schedule("1f1b", 2, 2)
    timeline = simulate(
        schedule,
        [1.0, 1.0],
        [2.0, 2.0],
        comm_s=[0.5],
        activation_bytes=[100, 10],
        static_bytes=[1000, 2000],
    )
    starts = {str(e.action): e.start_s for e in timeline.events}
    assert starts["1F0"] == 1.5  # 0F0 ends at 1, plus 0.5 to cross the boundary
    assert starts["0B0"] == 1.5 + 1 + 2 + 0.5  # after 1B0 and the gradient's transfer
    assert timeline.peak_memory_bytes == (1000 + 2 * 100, 2000 + 10)
    assert timeline.busy_s == (6.0, 6.0)
    assert all(b + i == timeline.step_time_s for b, i in zip(timeline.busy_s, timeline.idle_s))


def test_deadlock_is_detected() -> None:
    # rank 0 waits for the gradient of micro-batch 0 before sending any forward to rank 1.
    bad = parse_schedule([["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]])
    with pytest.raises(ScheduleError, match=r"deadlocks.*device 0 waits at 0B0"):
        simulate(bad, [1.0, 1.0], [1.0, 1.0])


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([["0F0", "0B0"], ["0F1", "0B1"]], "stage 0 runs on devices 0 and 1"),
        ([["0F0", "0B0", "0F0"]], "repeats"),
        ([["0F0", "0B0", "2F0", "2B0"]], "lacks or repeats"),
        ([["0F0"]], "lacks"),
    ],
)
def test_malformed_schedules_are_rejected(rows: list[list[str]], match: str) -> None:
    schedule = parse_schedule(rows)
    with pytest.raises(ScheduleError, match=match):
        simulate(schedule, [1.0] * 3, [1.0] * 3)


def test_cost_lengths_are_checked() -> None:
    with pytest.raises(ScheduleError, match="comm_s needs 1"):
        simulate(build_schedule("gpipe", 2, 2), [1.0, 1.0], [1.0, 1.0], comm_s=[0.1, 0.1])


# choosing ----------------------------------------------------------------------------------------


# gantt -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "v"), [("1f1b", 1), ("interleaved", 2)])
def test_svg_is_valid_deterministic_and_draws_every_action(kind: str, v: int) -> None:
    schedule = build_schedule(kind, 4, 8, v)
    n = 4 * v
    timeline = simulate(schedule, [1e-3] * n, [2e-3] * n, comm_s=[1e-4] * (n - 1))
    names = [f"stage<{s}>" for s in range(n)]
    svg = render_svg(timeline, title="demo & test", stage_names=names)
    assert svg == render_svg(timeline, title="demo & test", stage_names=names)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.get("class") == "action"]
    assert len(bars) == sum(len(actions) for actions in schedule) == len(timeline.events)
    assert len([r for r in root.iter(f"{ns}rect") if r.get("class") == "idle"]) == 4
    texts = [t.text or "" for t in root.iter(f"{ns}text")]
    assert any("bubble" in t and "demo & test" in t for t in texts)
    assert any(t.endswith(" ms") for t in texts)
    assert any("stage<0>" in t for t in texts)


def test_svg_rejects_wrong_stage_names() -> None:
    timeline = simulate(build_schedule("gpipe", 2, 2), [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ScheduleError, match="one name per stage"):
        render_svg(timeline, stage_names=["only one"])
