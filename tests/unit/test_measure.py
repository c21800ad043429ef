"""Measured costs: the alpha-beta fit on synthetic timings, the cache, the simulator's cost per
action and its fit, the CPU memory counter, the measured timeline; and measuring on a one-rank
group in this process."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.comm_fit import (
    AlphaBeta,
    CommCache,
    CommFits,
    cached_device,
    comm_key,
    fit_alpha_beta,
    measured_device,
)
from autopart.cost_models.devices import get_device
from autopart.cost_models.peak_memory import held_bytes, measure_peak
from autopart.errors import AutopartError
from autopart.planning.gantt import render_comparison
from autopart.planning.schedule import ScheduleError, build_schedule, simulate
from autopart.runtime.measure import fit_action_overhead_s, measured_or_table
from autopart.runtime.step_clock import (
    RankSummary,
    measured_timeline,
    stage_chunk_s,
    timeline_from_json,
    timeline_to_json,
)

pytestmark = pytest.mark.timeout(60)

SIZES = [1 << 12, 1 << 16, 1 << 20, 1 << 22]


def test_alpha_beta_fit_recovers_exact_timings() -> None:
    times = [250e-6 + n / 2e9 for n in SIZES]
    fit = fit_alpha_beta(SIZES, times)
    assert fit.alpha_s == pytest.approx(250e-6, rel=1e-9)
    assert fit.beta_bytes_per_s == pytest.approx(2e9, rel=1e-9)


def test_alpha_beta_fit_averages_noise() -> None:
    rng = random.Random(0)
    sizes = [n for n in SIZES for _ in range(20)]
    times = [1e-3 + n / 1e9 + rng.gauss(0, 2e-5) for n in sizes]
    fit = fit_alpha_beta(sizes, times)
    assert fit.alpha_s == pytest.approx(1e-3, rel=0.05)
    assert fit.beta_bytes_per_s == pytest.approx(1e9, rel=0.01)


def test_alpha_beta_fit_clamps_a_negative_latency_and_refuses_bad_timings() -> None:
    assert fit_alpha_beta([100, 200], [0.5e-6, 2e-6]).alpha_s == 0.0
    with pytest.raises(AutopartError, match="two distinct sizes"):
        fit_alpha_beta([100, 100], [1.0, 2.0])
    with pytest.raises(AutopartError, match="do not get slower"):
        fit_alpha_beta([100, 200], [2.0, 1.0])


def _fits(key: str) -> CommFits:
    return CommFits(key, AlphaBeta(1e-3, 2e9), {"all_reduce": AlphaBeta(2e-3, 1e9)}, 5e-4)


def test_cache_round_trip_and_measured_device(tmp_path: object) -> None:
    path = f"{tmp_path}/comm.json"
    cache = CommCache(path)
    cache.put(_fits(comm_key("gloo", 2, "cpu")))
    cache.save()
    again = CommCache(path).get("gloo:world2:cpu")
    assert again == _fits("gloo:world2:cpu")
    spec = cached_device(get_device("cpu"), 2, CommCache(path))
    assert spec == measured_device(get_device("cpu"), again)
    assert p2p_time_s(1 << 20, spec) == pytest.approx(1e-3 + (1 << 20) / 2e9)
    assert spec.pipeline_action_s == 5e-4
    with pytest.raises(AutopartError, match="autopart run MODEL --mesh pp=4"):
        cached_device(get_device("cpu"), 4, CommCache(path))


def test_gpu_entries_are_found_by_the_device_name(tmp_path: object) -> None:
    cache = CommCache(f"{tmp_path}/comm.json")
    cache.put(_fits(comm_key("nccl", 8, "cuda:NVIDIA_H100_80GB_HBM3")))
    assert cached_device(get_device("h100"), 8, cache).link_latency_s == 1e-3
    with pytest.raises(AutopartError, match="no measured communication for h200"):
        cached_device(get_device("h200"), 8, cache)


def test_a_corrupt_cache_is_ignored(tmp_path: object) -> None:
    path = f"{tmp_path}/comm.json"
    with open(path, "w") as f:
        f.write("{not json")
    assert CommCache(path).get("gloo:world2:cpu") is None


def test_action_overhead_occupies_the_device_and_counts_as_idle() -> None:
    m, f, b, o = 4, 1.0, 2.0, 0.25
    timeline = simulate(build_schedule("gpipe", 1, m), [f], [b], action_overhead_s=o)
    assert timeline.step_time_s == pytest.approx(m * (f + b) + 2 * m * o)
    assert timeline.busy_s == (pytest.approx(m * (f + b)),)
    assert timeline.bubble_fraction == pytest.approx(2 * m * o / timeline.step_time_s)
    with pytest.raises(ScheduleError, match="action_overhead_s"):
        simulate(build_schedule("gpipe", 1, 1), [f], [b], action_overhead_s=-1.0)


def test_the_tail_ends_the_step_after_the_last_action_and_counts_as_idle() -> None:
    m, f, b, tail = 4, 1.0, 2.0, 0.5
    timeline = simulate(build_schedule("gpipe", 1, m), [f], [b], tail_s=tail)
    assert max(e.end_s for e in timeline.events) == pytest.approx(m * (f + b))
    assert timeline.step_time_s == pytest.approx(m * (f + b) + tail)
    assert timeline.bubble_fraction == pytest.approx(tail / timeline.step_time_s)
    with pytest.raises(ScheduleError, match="tail_s"):
        simulate(build_schedule("gpipe", 1, 1), [f], [b], tail_s=-1.0)


@pytest.mark.parametrize("world", [2, 4])
def test_action_overhead_fit_recovers_the_simulated_overhead(world: int) -> None:
    m, f, b, comm, o = 8, 30e-6, 60e-6, 1e-3, 1.5e-3
    step = simulate(
        build_schedule("1f1b", world, m),
        [f] * world,
        [b] * world,
        comm_s=[comm] * (world - 1),
        action_overhead_s=o,
    ).step_time_s
    assert fit_action_overhead_s(step, world, m, f, b, comm) == pytest.approx(o, rel=1e-6)
    assert fit_action_overhead_s(step / 100, world, m, f, b, comm) == 0.0


def test_cpu_peak_memory_counts_parameters_gradients_and_saved_activations() -> None:
    # y = x @ W with W 1000 x 1000 fp32 (4 MB): backward makes W.grad (4 MB); forward keeps y
    # (10 x 1000: 40 kB) and the loss (4 B); backward's ones-like gradient of the loss (4 B) and
    # the gradient of y (40 kB). So the peak is W + W.grad + y + grad_y + two scalars.
    weight = torch.nn.Parameter(torch.randn(1000, 1000))
    x = torch.randn(10, 1000)
    with measure_peak(torch.device("cpu"), [weight]) as peak:
        y = x @ weight
        y.sum().backward()
        del y
    assert peak.start_bytes == 4_000_000
    assert peak.peak_bytes == 4_000_000 + 4_000_000 + 40_000 + 40_000 + 8


def test_cpu_peak_memory_is_the_highest_point_not_the_total() -> None:
    with measure_peak(torch.device("cpu")) as peak:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        del a
        b = torch.empty(1 << 19, dtype=torch.uint8)
        del b
    assert peak.peak_bytes == 1 << 20


def test_held_bytes_counts_a_shared_storage_once() -> None:
    w = torch.zeros(100, 10)
    assert held_bytes([w, w, w[3], w.t()]) == 4000


def test_measured_timeline_and_its_json_round_trip() -> None:
    def rank(stage: int, start: float, peak: int) -> RankSummary:
        events = (
            (stage, f"{stage}F0", start + 0.1, start + 0.2),
            (stage, f"{stage}B0", start + 0.4, start + 0.6),
        )
        return RankSummary({stage: 0.1}, {stage: 0.2}, 0.5, peak, start, events)

    timeline = measured_timeline([rank(0, 10.0, 100), rank(1, 10.05, 200)], [0, 1], 1.0)
    assert [str(e.action) for e in timeline.events] == ["0F0", "0B0", "1F0", "1B0"]
    assert timeline.events[2].start_s == pytest.approx(0.15)
    assert timeline.busy_s == (pytest.approx(0.3), pytest.approx(0.3))
    assert timeline.bubble_fraction == pytest.approx(0.7)
    assert timeline.peak_memory_bytes == (100, 200)
    assert timeline_from_json(timeline_to_json(timeline)) == timeline
    svg = render_comparison(timeline, timeline, title="t")
    assert svg.count("<svg ") == 3 and "t predicted" in svg and "t measured" in svg


def test_one_rank_measures_the_pipeline_runtime_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one rank in this process: nothing to send and no collective to time, only the runtime's
    # cost per action (the retry and the fall-back on two ranks: tests/distributed/test_measure.py)
    import torch.distributed as dist

    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1)
    try:
        spec, source = measured_or_table(get_device("cpu"), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert source == "measured" and spec.sources[-1] == "measured: gloo:world1:cpu"
    fits = CommCache(tmp_path / "comm.json").get("gloo:world1:cpu")
    assert fits is not None and fits.collectives == {} and fits.pipeline_action_s >= 0
    assert spec.pipeline_action_s == max(fits.pipeline_action_s, 1e-9)


@pytest.mark.parametrize("kind", ["1f1b", "zbv"])
def test_simulated_chunks_are_the_stage_costs_unless_ranks_share_cores(kind: str) -> None:
    f, b, w = [1.0, 2.0, 1.5, 0.5], [2.0, 4.0, 3.0, 1.0], [1.0, 2.0, 1.0, 0.5]
    v = 2 if kind == "zbv" else 1
    n, p = 2 * v, 2
    schedule = build_schedule(kind, p, 4, v)
    plain = simulate(schedule, f[:n], b[:n], backward_weight_s=w[:n])
    forward, backward = stage_chunk_s(plain, n)
    assert forward == pytest.approx(f[:n])
    assert backward == pytest.approx(b[:n])  # I and W together, per micro-batch
    shared = simulate(schedule, f[:n], b[:n], backward_weight_s=w[:n], cores=1)
    forward, backward = stage_chunk_s(shared, n)
    assert all(s >= c - 1e-9 for s, c in zip(forward + backward, f[:n] + b[:n]))
    assert sum(forward + backward) > sum(f[:n] + b[:n])


def test_cpu_ranks_share_the_hosts_cores() -> None:
    from autopart.planning.mesh_plan import pipeline_device

    cpu, h100 = get_device("cpu"), get_device("h100")
    assert cpu.shared_cores == 2
    # one pipeline of dp=2 x pp x tp=2 ranks: its devices (2 ranks each) beside another replica
    assert pipeline_device(cpu, pp=2, tp=2, replicas=2).shared_cores == pytest.approx(0.5)
    assert pipeline_device(h100, pp=2, tp=2, replicas=2).shared_cores is None
