"""Planning on measured times (``profile=``, ``--profile``): measurements reach the planner, are
cached by signature, dtype and device, scaled to the whole graph's run, and the plan says it was
profiled. No timing assertions: the measurements the planner sees are written into the cache by the
tests, and the whole graph's run is the tests' too (:func:`_graph_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autopart.capture.tracing import trace
from autopart.cli.main import main
from autopart.cost_models import get_device, profiling
from autopart.cost_models.in_situ import GraphRun
from autopart.cost_models.profiling import (
    Measurement,
    ProfileCache,
    local_device_key,
    profile_key,
    profiled_compute,
)
from autopart.errors import AutopartError
from autopart.passes.annotate import annotate, node_cost
from autopart.planning.loss import loss_times_s
from autopart.planning.planner import plan_graph
from autopart.planning.plans import Plan


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 64))  # a head of its own signature


def _gm(dtype: torch.dtype = torch.float32) -> torch.fx.GraphModule:
    model = _model().to(dtype)
    return annotate(trace(model, (torch.randn(8, 16, dtype=dtype),)))


def _measured(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op.startswith("call_") and not node_cost(n).is_view]


def _head(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return _measured(gm)[-1]  # the last linear


@pytest.fixture(autouse=True)
def _graph_run(monkeypatch: pytest.MonkeyPatch) -> list[GraphRun | None]:
    """The whole graph's run that profiling scales the op times to: none (the cached times stand)
    unless a test puts one in the list."""
    runs: list[GraphRun | None] = [None]
    monkeypatch.setattr(profiling, "graph_run_s", lambda *_a, **_k: runs[0])
    return runs


def _fill_cache(path: Path, gm: torch.fx.GraphModule, head_s: float) -> dict[str, Measurement]:
    """Write a measurement for every op signature of ``gm``: 1 ms forward and 2 ms backward, the
    head ``head_s`` and twice that."""
    cache = ProfileCache(path)
    key = local_device_key(torch.device("cpu"))
    times = {}
    for n in _measured(gm):
        m = Measurement(head_s, 2 * head_s) if n is _head(gm) else Measurement(1e-3, 2e-3)
        cache.put(key, profile_key(n), m)
        times[n.name] = m
    cache.save()
    return times


def test_profile_reaches_the_planner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    gm = _gm()
    times = _fill_cache(tmp_path / "profile.json", gm, head_s=0.05)
    options = {"mesh": "pp=2", "device": "cpu", "micro_batches": 1, "schedule": "gpipe"}
    modelled = plan_graph(gm, batch=8, **options)
    profiled = plan_graph(gm, batch=8, profile=True, **options)
    assert modelled.profile_s is None and profiled.profile_s is not None
    # One micro-batch of the traced batch: the stages' times are the cached ones, summed, and the
    # loss's on the outputs (measured and cached too: planning/loss.py)
    ((loss_forward, loss_backward),) = loss_times_s(gm, get_device("cpu"), profile=True)[0].values()
    forward = sum(st.forward_s for st in profiled.stages)
    assert forward == pytest.approx(sum(m.forward_s for m in times.values()) + loss_forward)
    backward = sum(st.backward_s for st in profiled.stages)
    cached = sum(m.backward_s for m in times.values() if m.backward_s)
    assert backward == pytest.approx(cached + loss_backward)
    # The slow head gets a stage to itself; on the cost model it is a layer like the others.
    assert profiled.stage_of != modelled.stage_of
    head = _head(gm).name
    assert [n for n, s in profiled.stage_of.items() if s == 1] == [head]
    again = Plan.from_json(profiled.to_json())
    assert again.profile_s == profiled.profile_s
    assert "profile_s" not in json.loads(modelled.to_json())


def test_op_times_are_scaled_to_the_whole_graph_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _graph_run: list[GraphRun | None]
) -> None:
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    gm = _gm()
    times = _fill_cache(tmp_path / "profile.json", gm, head_s=0.05)
    forward = sum(m.forward_s for m in times.values())
    backward = sum(m.backward_s for m in times.values())
    _graph_run[0] = GraphRun(2 * forward, backward / 2)  # what op-by-op timing missed, or added
    options = {"mesh": "pp=2", "device": "cpu", "micro_batches": 1, "schedule": "gpipe"}
    plan = plan_graph(gm, batch=8, profile=True, **options)
    # the loss, one op, is measured on its own (planning/loss.py), not scaled to a whole run
    ((loss_forward, loss_backward),) = loss_times_s(gm, get_device("cpu"), profile=True)[0].values()
    assert sum(st.forward_s for st in plan.stages) == pytest.approx(2 * forward + loss_forward)
    assert sum(st.backward_s for st in plan.stages) == pytest.approx(backward / 2 + loss_backward)


def test_fixed_part_of_a_measured_node_is_paid_per_micro_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    gm = _gm()
    _fill_cache(tmp_path / "profile.json", gm, head_s=0.05)
    compute, _ = profiled_compute(gm, get_device("cpu"))
    head = _head(gm)
    fixed = compute.fixed_s(head.name, node_cost(head))
    assert 0 < fixed < 0.05  # calibrated launch + weight reads, never the whole measurement
    for m in (2, 4):
        plan = plan_graph(gm, batch=8, mesh="pp=2", device="cpu", micro_batches=m, profile=True)
        last = plan.stages[plan.stage_of[head.name]]
        others = sum(1e-3 for n in _measured(gm) if plan.stage_of[n.name] == last.index) - 1e-3
        lower = fixed + (0.05 - fixed) / m + others / m
        assert last.forward_s >= lower * (1 - 1e-9)


def test_cache_keys_hold_dtype_and_device(tmp_path: Path) -> None:
    single, double = _gm(torch.float32), _gm(torch.float64)
    assert profile_key(_head(single)) != profile_key(_head(double))
    cache = ProfileCache(tmp_path / "profile.json")
    cpu = local_device_key(torch.device("cpu"))
    cache.put(cpu, profile_key(_head(single)), Measurement(1.0, 2.0))
    assert cache.get(cpu, profile_key(_head(double))) is None
    assert cache.get("cuda:Some GPU:torch0", profile_key(_head(single))) is None
    assert cache.get(cpu, profile_key(_head(single))) == Measurement(1.0, 2.0)


def test_profiling_a_gpu_model_without_a_gpu_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to profile")
    with pytest.raises(AutopartError, match="--device cpu"):
        plan_graph(_gm(), batch=8, mesh="pp=2", device="h100", profile=True)


def test_cli_plan_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    argv = ["plan", "mlp", "--mesh", "pp=2", "--device", "cpu", "--profile"]
    assert main([*argv, "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile_s"] >= 0
    assert (tmp_path / "profile.json").exists()
    assert main(argv) == 0
    assert "planned on measured times" in capsys.readouterr().out
    assert main(["plan", "mlp", "--mesh", "pp=2", "--profile"]) == 2  # h100 on a CPU machine
    assert "--device cpu" in capsys.readouterr().err
