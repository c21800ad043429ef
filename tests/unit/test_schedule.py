from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.pipelining import _utils as torch_utils
from torch.distributed.pipelining import schedules as torch_schedules

from autopart.planning.gantt import render_svg
from autopart.planning.schedule import (
    V_SHAPED,
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
    stage_ranks,
)
from autopart.runtime.weight_grads import stages_keeping_weight_grads, weight_grads_split_off

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
V = tuple(str(k) for k in V_SHAPED)


# torch's schedules, driven without a process group ------------------------------------------------


class _FakeStage:
    """Just enough of a PipelineStage for torch's schedules to run or compute their order."""

    def __init__(self, index: int, group_size: int, num_stages: int, rank: int = -1) -> None:
        self.stage_index, self.group_size, self.num_stages = index, group_size, num_stages
        self.group_rank = index % group_size if rank < 0 else rank
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


_MULTI = {
    "interleaved": torch_schedules.ScheduleInterleaved1F1B,
    "interleaved-zb": torch_schedules.ScheduleInterleavedZeroBubble,
    "zbv": torch_schedules.ScheduleZBVZeroBubble,
    "dualpipev": torch_schedules.ScheduleDualPipeV,
}


def _torch_pipeline_order(kind: str, p: int, m: int, v: int) -> list[list[str]]:
    """The compute actions of a multi-stage schedule's ``pipeline_order`` (what its runtime executes),
    idle slots dropped and DualPipeV's overlapped F + B pairs as the two actions it runs in turn."""
    ranks = torch_utils.generate_stage_to_rank_mapping(p, p * v, style="v" if kind in V else "loop")
    order = []
    for rank in range(p):
        stages = [_FakeStage(s, p, p * v, rank) for s in range(p * v) if ranks[s] == rank]
        schedule = _MULTI[kind](stages, m)  # type: ignore[arg-type]
        row = []
        for action in schedule.pipeline_order[rank]:
            for a in (action.sub_actions or (action,)) if action is not None else ():
                if a.computation_type.value in "FBIW":
                    row.append(str(a))
        order.append(row)
    return order


def _torch_interleaved_order(p: int, m: int, v: int) -> list[list[str]]:
    return _torch_pipeline_order("interleaved", p, m, v)


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


ZB_GRID = [
    (kind, p, m, v)
    for kind, counts in (("interleaved-zb", (1, 2, 3)), ("zbv", (2,)), ("dualpipev", (2,)))
    for p in range(1, 6)
    for m in range(1, 3 * p + 2)
    for v in counts
]


@pytest.mark.parametrize(("kind", "p", "m", "v"), ZB_GRID)
def test_split_backward_orders_match_torch_pipeline_order(
    kind: str, p: int, m: int, v: int
) -> None:
    # Every count torch accepts gives its order; every count it rejects is rejected here too,
    # with a message that names what works.
    try:
        want = _torch_pipeline_order(kind, p, m, v)
    except ValueError:
        with pytest.raises(ScheduleError, match="use"):
            build_schedule(kind, p, m, v)
        return
    assert format_schedule(build_schedule(kind, p, m, v)) == want


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 6), (4, 8), (2, 2)])
def test_interleaved_with_more_stages_per_rank_matches_torch(p: int, m: int) -> None:
    for v in (3, 4):
        assert format_schedule(build_schedule("interleaved", p, m, v)) == _torch_interleaved_order(
            p, m, v
        )


def test_pinned_zero_bubble_orders_p2_m4() -> None:
    assert format_schedule(build_schedule("zbv", 2, 4, 2))[0] == [
        *["0F0", "0F1", "0F2", "3F0", "3I0", "3W0", "3F1", "3I1", "3W1", "0F3", "0I0", "0W0"],
        *["3F2", "3I2", "3W2", "0I1", "0W1", "3F3", "3I3", "3W3", "0I2", "0W2", "0I3", "0W3"],
    ]
    assert format_schedule(build_schedule("dualpipev", 2, 4, 2))[1] == [
        *["1F0", "2F0", "1F1", "2F1", "1F2", "2B0", "2F2", "1B0", "1F3", "2B1", "2F3", "1B1"],
        *["2B2", "1B2", "2I3", "1I3", "2W3", "1W3"],
    ]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_v_shaped_stage_ranks_match_torch(p: int) -> None:
    want = torch_utils.generate_stage_to_rank_mapping(p, 2 * p, style="v")
    assert stage_ranks("zbv", p, 2) == tuple(want[s] for s in range(2 * p))
    assert stage_ranks("dualpipev", p, 2)[0] == stage_ranks("dualpipev", p, 2)[-1] == 0
    assert stage_ranks("interleaved-zb", p, 3) == tuple(s % p for s in range(3 * p))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("zbv", 2, 4, 1), "exactly two stages on each device.*pass 2"),
        (("dualpipev", 2, 4, 3), "exactly two stages on each device.*pass 2"),
        (("dualpipev", 4, 6, 2), "at least 8 micro-batches, or the 'zbv' schedule"),
        (("interleaved-zb", 4, 9, 2), "use a multiple of 4"),
        (("1f1b", 2, 4, 2), "'interleaved' or 'interleaved-zb'"),
    ],
)
def test_split_backward_build_errors_name_what_works(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        build_schedule(*args)


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


def test_split_backward_bubble_equals_closed_form() -> None:
    # equal F, I and W: each device idles p - 1 of them (ZB-H1's (p-1)(T_F + T_B - T_W))
    for kind, threshold, counts in (
        ("interleaved-zb", lambda p: p, (1, 2, 3)),
        ("zbv", lambda p: 2 * p - 1, (2,)),
        ("dualpipev", lambda p: 2 * p, (2,)),
    ):
        for p in range(1, 7):
            for v in counts:
                for m in range(threshold(p), 4 * p + 1):
                    if kind == "interleaved-zb" and m % max(1, m // p):
                        continue
                    n = p * v
                    schedule = build_schedule(kind, p, m, v)
                    timeline = simulate(schedule, [1.0] * n, [2.0] * n, backward_weight_s=[1.0] * n)
                    assert timeline.step_time_s == pytest.approx(3 * v * m + p - 1), (kind, p, m)
                    expected = bubble_closed_form(p, m, v, kind)
                    assert timeline.bubble_fraction == pytest.approx(expected, abs=1e-9)
    # a third of 1F1B's idle time, as the zero-bubble paper's ZB-H1
    assert bubble_closed_form(4, 8, 1, "interleaved-zb") == 3 / 27
    assert bubble_closed_form(4, 8) == 3 / 11


@pytest.mark.parametrize(("f", "i", "w"), [(1.0, 1.0, 0.5), (1.0, 2.0, 1.0), (2.0, 1.5, 0.5)])
def test_interleaved_zero_bubble_step_is_zb_h1s(f: float, i: float, w: float) -> None:
    # ZB-H1 (Qi et al. 2024, section 3.1): v m (T_F + T_B + T_W) of work and (p-1)(T_F + T_B - T_W)
    # of bubble per device, with T_B the input gradient, for W no longer than B and m >= p
    for p, m, v in [(2, 4, 1), (4, 8, 1), (4, 8, 2), (3, 9, 3), (6, 6, 2)]:
        n = p * v
        schedule = build_schedule("interleaved-zb", p, m, v)
        timeline = simulate(schedule, [f] * n, [i + w] * n, backward_weight_s=[w] * n)
        assert timeline.step_time_s == pytest.approx(v * m * (f + i + w) + (p - 1) * (f + i - w))


def test_weight_gradients_keep_activations_until_they_run() -> None:
    # one byte per (stage, micro-batch): peak memory counts the chunks alive; F to W for a split
    # backward, F to B otherwise
    rows = [["0F0", "0F1", "0I0", "0I1", "0W0", "0W1"], ["1F0", "1I0", "1F1", "1I1", "1W0", "1W1"]]
    split = simulate(
        parse_schedule(rows),
        [1.0, 1.0],
        [2.0, 2.0],
        backward_weight_s=[1.0, 1.0],
        activation_bytes=[1, 1],
        weight_grad_bytes=[10, 10],
    )
    # stage 0's I computes nothing (it sends no input gradient), so it keeps no output gradients;
    # stage 1 keeps two micro-batches' activations and output gradients until its Ws
    assert split.peak_memory_bytes == (2, 2 + 20)
    assert split.max_in_flight == (2, 2)
    whole = parse_schedule([["0F0", "0F1", "0B0", "0B1"], ["1F0", "1B0", "1F1", "1B1"]])
    assert simulate(whole, [1.0] * 2, [2.0] * 2, activation_bytes=[1, 1]).max_in_flight == (2, 1)
    starts = {str(e.action): (e.start_s, e.end_s) for e in split.events}
    assert starts["0I0"][1] - starts["0I0"][0] == 0.0  # the first stage's I is empty ...
    assert starts["0W0"][1] - starts["0W0"][0] == 2.0  # ... its W runs the whole backward
    assert starts["1W0"][1] - starts["1W0"][0] == 1.0


def test_v_shaped_stages_hand_over_locally_and_share_rank_0() -> None:
    # zbv on 2 ranks: stages 0 and 3 on rank 0, stages 1 and 2 on rank 1; the 1 -> 2 boundary is
    # on one rank, so a slow link there costs nothing
    schedule = build_schedule("zbv", 2, 4, 2)
    cheap = simulate(schedule, [1.0] * 4, [2.0] * 4, comm_s=[0.5, 0.0, 0.5])
    slow_turn = simulate(schedule, [1.0] * 4, [2.0] * 4, comm_s=[0.5, 100.0, 0.5])
    assert slow_turn.step_time_s == cheap.step_time_s
    # activations of the first and the last stage both count on rank 0
    act = simulate(schedule, [1.0] * 4, [2.0] * 4, activation_bytes=[1, 0, 0, 100])
    assert act.peak_memory_bytes[0] >= 100 + 1 and act.peak_memory_bytes[1] == 0
    assert in_flight_micro_batches("zbv", 2, 4, 0, 2) == 4


def test_split_backward_schedules_need_matching_i_and_w() -> None:
    with pytest.raises(ScheduleError, match="either B once or I and W once"):
        simulate(parse_schedule([["0F0", "0I0"]]), [1.0], [1.0])
    with pytest.raises(ScheduleError, match="exceeds backward_s"):
        simulate(build_schedule("gpipe", 1, 1), [1.0], [1.0], backward_weight_s=[2.0])


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


# torch's split backward ------------------------------------------------------------------------


class _EmbedAfterMasks(torch.nn.Module):
    """A stage whose inputs need no gradient (a mask, token ids): torch's split backward would find
    no weight gradient for its embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, mask: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids) * mask) + hidden


def test_stages_whose_weights_miss_torchs_split_keep_them_with_the_input_gradients() -> None:
    stage = torch.fx.symbolic_trace(_EmbedAfterMasks())
    # only the mask and the ids: the embedding and the projection would get no gradient
    assert not weight_grads_split_off(stage, [False, False, False])
    # the mask meets the embedding's path at the product, and everything after it
    assert weight_grads_split_off(stage, [True, False, False])
    # hidden meets the path of both (through the projection) at the add
    assert weight_grads_split_off(stage, [False, False, True])
    keep = stages_keeping_weight_grads(
        {0: stage, 1: stage, 2: stage}, {0: [False] * 3, 1: [False, False, True], 2: [False] * 3}
    )
    assert keep == [2]  # the first stage runs its whole backward in W anyway


_SHARED_KINDS = [
    (ScheduleKind.GPIPE, 1),
    (ScheduleKind.ONE_F_ONE_B, 1),
    (ScheduleKind.INTERLEAVED, 2),
    (ScheduleKind.INTERLEAVED_ZB, 1),
    (ScheduleKind.ZBV, 2),
    (ScheduleKind.DUALPIPEV, 2),
]


@given(
    st.sampled_from(_SHARED_KINDS),
    st.integers(2, 4),
    st.integers(1, 3),
    st.lists(st.floats(0.0, 5.0), min_size=24, max_size=24),
    st.floats(0.0, 0.5),
)
def test_time_sharing_with_a_core_per_device_is_the_plain_simulation(
    kind_v: tuple[ScheduleKind, int], p: int, rounds: int, costs: list[float], overhead: float
) -> None:
    kind, v = kind_v
    m = 2 * p * rounds  # a count every kind runs
    n = p * v
    fwd, bwd = costs[:n], [b + w for b, w in zip(costs[8 : 8 + n], costs[16 : 16 + n])]
    weight = costs[16 : 16 + n]
    comm = costs[1:n]
    schedule = build_schedule(kind, p, m, v)
    common = {"backward_weight_s": weight, "comm_s": comm, "action_overhead_s": overhead}
    plain = simulate(schedule, fwd, bwd, **common)
    for cores in (p, p + 0.5):
        shared = simulate(schedule, fwd, bwd, cores=cores, **common)
        assert shared.step_time_s == pytest.approx(plain.step_time_s, rel=1e-9, abs=1e-12)
        for a, b in zip(shared.events, plain.events):
            assert a.action == b.action and a.device == b.device
            assert a.start_s == pytest.approx(b.start_s, rel=1e-9, abs=1e-12)
            assert a.end_s == pytest.approx(b.end_s, rel=1e-9, abs=1e-12)


def test_devices_sharing_cores_run_at_their_share() -> None:
    # two devices, one core: while both are busy each runs at half speed
    schedule = build_schedule("gpipe", 2, 4)
    f, b = [1.0, 1.0], [2.0, 2.0]
    plain = simulate(schedule, f, b)
    shared = simulate(schedule, f, b, cores=1)
    work = 4 * (sum(f) + sum(b))
    assert shared.step_time_s >= work - 1e-9  # one core does all of the work, one piece at a time
    assert shared.step_time_s > plain.step_time_s
    # 0F0 runs alone at full speed; 0F1 then shares the core with 1F0
    first = {str(e.action): e for e in shared.events}
    assert first["0F0"].end_s == pytest.approx(1.0)
    assert first["1F0"].end_s - first["1F0"].start_s == pytest.approx(2.0)
    assert first["0F1"].end_s - first["0F1"].start_s == pytest.approx(2.0)
    assert sum(shared.busy_s) > sum(plain.busy_s)  # a chunk's wall time is stretched
    with pytest.raises(ScheduleError, match="cores"):
        simulate(schedule, f, b, cores=0)
