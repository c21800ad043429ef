from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autopart.capture.tracing import trace
from autopart.cost_models import get_device
from autopart.cost_models.compute import ComputeModel, forward_bytes, is_lookup, update_time_s
from autopart.cost_models.in_situ import GraphRun, graph_run_s
from autopart.cost_models.profiling import (
    Measurement,
    ProfileCache,
    calibrate,
    in_situ,
    profile_graph,
)
from autopart.passes.annotate import annotate, node_cost
from tests.models import TwoLayer


def _gm() -> torch.fx.GraphModule:
    return annotate(trace(TwoLayer(64, 256, 8), (torch.randn(32, 64),)))


def test_profile_measures_every_computing_node_and_caches(tmp_path: Path) -> None:
    gm = _gm()
    cache = ProfileCache(tmp_path / "profile.json")
    measured = profile_graph(gm, cache=cache, repeats=3, warmup=1)
    computing = [
        n.name for n in gm.graph.nodes if n.op == "call_function" and not node_cost(n).is_view
    ]
    assert set(computing) <= set(measured)
    assert all(m.forward_s > 0 for m in measured.values())
    linear = next(n for n in gm.graph.nodes if node_cost(n).params == ("fc1.weight", "fc1.bias"))
    assert measured[linear.name].backward_s > 0  # the weight needs a gradient
    # its weight gradients timed alone too (W of a zero-bubble schedule), within the backward
    weight = measured[linear.name].backward_weight_s
    assert weight is not None and 0 < weight <= measured[linear.name].backward_s
    assert (tmp_path / "profile.json").exists()

    # A second run reads the cache: the same numbers, nothing re-measured.
    again = profile_graph(gm, cache=ProfileCache(tmp_path / "profile.json"), repeats=3, warmup=1)
    assert again == measured


def test_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    assert ProfileCache(path).get("cpu", "x") is None


def test_calibration_fits_efficiencies_and_measured_times_override_predictions() -> None:
    gm = _gm()
    costs = {n.name: node_cost(n) for n in gm.graph.nodes}
    cpu = get_device("cpu")
    # Synthetic measurements that are exactly the roofline at 10% compute efficiency.
    measured = {}
    for name, c in costs.items():
        if c.flops:
            measured[name] = Measurement(
                1e-5 + c.flops / (cpu.peak_flops_per_s(c.dtype) * 0.1), 0.0
            )
        elif c.bytes:
            measured[name] = Measurement(1e-5, 0.0)
    fitted = calibrate(cpu, costs, measured)
    assert abs(fitted.compute_efficiency - 0.1) < 0.02
    model = ComputeModel(cpu, measured_forward_s={k: v.forward_s for k, v in measured.items()})
    name = next(iter(measured))
    assert model.forward_s(name, costs[name]) == measured[name].forward_s


class _TokenAndPosition(torch.nn.Module):
    """GPT-2's input: a token table and a position table looked up and added."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(4096, 64)
        self.wpe = torch.nn.Embedding(1024, 64)
        self.norm = torch.nn.RMSNorm(64)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.norm(self.wte(tokens) + self.wpe(positions))


def test_calibration_fits_memory_efficiency_to_the_rows_an_embedding_moves() -> None:
    tokens = torch.zeros(4, 16, dtype=torch.long)
    gm = annotate(trace(_TokenAndPosition(), (tokens, tokens)))
    costs = {n.name: node_cost(n) for n in gm.graph.nodes}
    # the two tables are lookups; the norm's scale is an elementwise op on a parameter
    lookups = [n for n, c in costs.items() if is_lookup(c)]
    assert sorted(costs[n].params[0] for n in lookups) == ["wpe.weight", "wte.weight"]
    cpu = get_device("cpu")
    # Synthetic measurements: 10 us of launch plus the roofline's bytes at 30% of the bandwidth.
    measured = {"launch_only": Measurement(1e-5, 0.0)}
    costs["launch_only"] = dataclasses.replace(costs[lookups[0]], bytes_read=0, bytes_written=0)
    for name, c in costs.items():
        if c.flops == 0 and forward_bytes(c) > 0 and not c.is_view:
            measured[name] = Measurement(
                1e-5 + forward_bytes(c) / (cpu.memory_bandwidth_bytes_per_s * 0.3), 0.0
            )
    assert len(measured) >= 4  # both lookups, the add, the norm
    fitted = calibrate(cpu, costs, measured)
    assert fitted.memory_efficiency == pytest.approx(0.3, rel=0.05)


def test_the_whole_graph_runs_on_a_copy_forward_and_backward() -> None:
    model = TwoLayer(64, 256, 8)
    gm = annotate(trace(model, (torch.randn(32, 64),)))
    run = graph_run_s(gm, torch.device("cpu"), max_bytes=1 << 30, repeats=3, warmup=1)
    assert run is not None and run.forward_s > 0 and run.backward_s > 0
    # the user's module keeps its values and gets no gradient
    assert all(p.grad is None for p in gm.parameters())
    assert torch.equal(gm.fc1.weight, model.fc1.weight)
    # a graph of meta tensors runs on random values
    with torch.device("meta"):
        meta = TwoLayer(64, 256, 8)
    meta_gm = annotate(trace(meta, (torch.randn(32, 64, device="meta"),)))
    assert graph_run_s(meta_gm, torch.device("cpu"), max_bytes=1 << 30, repeats=1, warmup=0)
    # a graph over the byte budget is not run
    assert graph_run_s(gm, torch.device("cpu"), max_bytes=1024) is None


def test_in_situ_scales_op_times_to_the_whole_graph_run() -> None:
    gm = _gm()
    costs = {n.name: node_cost(n) for n in gm.graph.nodes if n.op == "call_function"}
    measured = {n: Measurement(1e-5, 2e-5) for n, c in costs.items() if not c.is_view}
    model = ComputeModel(
        get_device("cpu"),
        measured_forward_s={n: m.forward_s for n, m in measured.items()},
        measured_backward_s={n: m.backward_s for n, m in measured.items()},
    )
    forward = sum(model.forward_s(n, c) for n, c in costs.items())
    backward = sum(model.backward_s(n, c) for n, c in costs.items())
    scaled = in_situ(measured, GraphRun(1.5 * forward, 0.5 * backward), model, costs)
    assert scaled.keys() == measured.keys()
    assert sum(m.forward_s for m in scaled.values()) == pytest.approx(1.5 * forward)
    assert sum(m.backward_s for m in scaled.values()) == pytest.approx(0.5 * backward)


def test_the_update_streams_parameters_gradients_and_state() -> None:
    cpu = get_device("cpu")
    rate = cpu.memory_bandwidth_bytes_per_s * cpu.memory_efficiency
    # SGD at one micro-batch: read the parameter and its gradient, write the parameter
    assert update_time_s(1e6, cpu, states_per_param=0, micro_batches=1) == pytest.approx(3e6 / rate)
    # Adam's two states, read and written, and the gradients divided by the micro-batch count
    assert update_time_s(1e6, cpu, states_per_param=2, micro_batches=4) == pytest.approx(9e6 / rate)


def test_a_measured_weight_gradient_time_wins_over_the_roofline_ratio() -> None:
    gm = _gm()
    linear = next(n for n in gm.graph.nodes if node_cost(n).params == ("fc1.weight", "fc1.bias"))
    cost, cpu = node_cost(linear), get_device("cpu")
    ratio = ComputeModel(cpu, measured_backward_s={linear.name: 1e-3})
    timed = ComputeModel(
        cpu,
        measured_backward_s={linear.name: 1e-3},
        measured_backward_weight_s={linear.name: 0.7e-3},
    )
    assert timed.backward_weight_s(linear.name, cost) == pytest.approx(0.7e-3)
    assert ratio.backward_weight_s(linear.name, cost) != pytest.approx(0.7e-3)
    capped = ComputeModel(
        cpu,
        measured_backward_s={linear.name: 1e-3},
        measured_backward_weight_s={linear.name: 2e-3},
    )
    assert capped.backward_weight_s(linear.name, cost) == pytest.approx(1e-3)


def test_profiling_measures_what_a_backward_holds_and_the_plan_counts_it(tmp_path: Path) -> None:
    """A 3x3 convolution's backward on this CPU holds its output's gradient and about two more
    output-sized tensors at once (its input's gradient and oneDNN's reordered copies), where the
    model counts the two gradients only; the profile measures it (kept in the cache) and the
    block graph's working set reads the measurement. A ReLU's backward holds what the model
    counts (its output's gradient and its input's)."""
    from autopart.planning.graph import OpGraph, coarsen

    class ConvReLU(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    x = torch.randn(8, 32, 64, 64, requires_grad=True)
    gm = annotate(trace(ConvReLU(), (x,)))
    measured = profile_graph(gm, cache=ProfileCache(tmp_path / "p.json"), repeats=2, warmup=1)
    out = 8 * 32 * 64 * 64 * 4
    conv = next(n.name for n in gm.graph.nodes if node_cost(n).params)
    relu = next(n.name for n in gm.graph.nodes if "relu" in n.name)
    working = {n: measured[n].backward_working_bytes for n in (conv, relu)}
    assert working[relu] == pytest.approx(2 * out, rel=0.05)
    assert working[conv] is not None and working[conv] >= 2.5 * out
    cached = ProfileCache(tmp_path / "p.json")
    assert profile_graph(gm, cache=cached, repeats=2, warmup=1) == measured

    compute = ComputeModel(
        get_device("cpu"),
        measured_backward_working_bytes={
            n: m.backward_working_bytes
            for n, m in measured.items()
            if m.backward_working_bytes is not None
        },
    )
    og = OpGraph.from_graph_module(gm, get_device("cpu"), compute=compute)
    modelled = OpGraph.from_graph_module(gm, get_device("cpu"))
    assert og.backward_working_bytes(og.nodes[conv]) == working[conv]
    # modelled: its output's gradient (its input is the model's, whose gradient is not kept)
    assert modelled.backward_working_bytes(modelled.nodes[conv]) == out
    block = coarsen(og, max_blocks=1).blocks[0]
    assert block.backward_working_bytes == max(working.values())
    # per sample: scaled with the micro-batch like every activation
    assert og.scaled(0.5).nodes[conv].measured_working_bytes == working[conv] // 2
