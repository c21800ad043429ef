"""The loss's time (autopart/planning/loss.py): the runtime runs it on the last stage's outputs,
so the planner charges torch's cross-entropy on them, forward and backward, on the output node;
and the run report counts the loss's forward in the last stage's forward, as the plan does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopart import annotate, trace
from autopart.cost_models import get_device
from autopart.planning.graph import OpGraph
from autopart.planning.loss import loss_times_s
from autopart.planning.mesh_plan import op_graph_of, planning_setup
from autopart.planning.request import PlanRequest


class _Head(torch.nn.Module):
    """A small trunk and a wide head: the logits are (4, 32, 4096)."""

    def __init__(self, width: int = 64, vocab: int = 4096) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


def _gm() -> torch.fx.GraphModule:
    return annotate(trace(_Head(), (torch.zeros(4, 32, dtype=torch.long),)))


def test_the_loss_is_charged_on_the_logits_node() -> None:
    gm, spec = _gm(), get_device("h100")
    times, spent = loss_times_s(gm, spec)
    (name,) = times
    out = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert name == out.name and spent == 0.0
    forward, backward = times[name]
    logits = 4 * 32 * 4096 * 4
    # memory-bound: at least one read of the logits forward; backward reads and writes them
    assert forward >= logits / spec.memory_bandwidth_bytes_per_s
    assert backward >= 2 * logits / spec.memory_bandwidth_bytes_per_s
    plain = OpGraph.from_graph_module(gm, spec)
    og, _ = op_graph_of(gm, planning_setup(PlanRequest(device="h100")), lambda _: None)
    assert og.nodes[name].forward_s == pytest.approx(plain.nodes[name].forward_s + forward)
    assert og.nodes[name].backward_s == pytest.approx(plain.nodes[name].backward_s + backward)
    others = [n for n in og.nodes if n != name]
    assert all(og.nodes[n].forward_s == plain.nodes[n].forward_s for n in others)


def test_no_loss_is_charged_on_an_output_without_a_class_dimension() -> None:
    class Scalar(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).sum(-1)  # one value per sample

    gm = annotate(trace(Scalar(), (torch.randn(4, 8),)))
    assert loss_times_s(gm, get_device("h100"))[0] == {}


def test_profiling_measures_the_loss_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))  # a cache of its own
    gm, spec = _gm(), get_device("cpu")
    modelled, _ = loss_times_s(gm, spec)
    measured, spent = loss_times_s(gm, spec, profile=True)
    assert spent > 0 and measured.keys() == modelled.keys()
    ((forward, backward),) = measured.values()
    assert forward > 0 and backward > 0


def test_the_run_report_counts_the_loss_in_the_last_stages_forward() -> None:
    """StepClock adds the loss's forward (timed by the program, one per micro-batch) to the last
    stage's forward; the other stages' stay their module's."""
    from types import SimpleNamespace

    from autopart.runtime.step_clock import StepClock

    class Chunks:
        def forward_one_chunk(self, *_: object, **__: object) -> None: ...
        def backward_one_chunk(self, *_: object, **__: object) -> None: ...
        def backward_weight_one_chunk(self, *_: object, **__: object) -> None: ...

    stages = [
        SimpleNamespace(index=k, module=torch.nn.Identity(), pipeline_stage=Chunks())
        for k in (0, 1)
    ]
    sinks: list[list[float]] = []
    program = SimpleNamespace(
        local_stages=stages, plan=SimpleNamespace(num_stages=2), time_loss=sinks.append
    )
    clock = StepClock.attach(program)
    (sink,) = sinks
    clock.start_step()
    for stage in stages:
        stage.module(torch.zeros(1))
    sink.append(0.5)
    clock.end_step()
    summary = clock.summary()
    assert summary.forward_s[1] == pytest.approx(clock.forward_s[1][0] + 0.5)
    assert summary.forward_s[0] == pytest.approx(clock.forward_s[0][0])


def test_a_tensor_parallel_share_keeps_the_loss_whole() -> None:
    """TP shares a node's own time over the ranks; the loss on its output runs on the whole
    outputs on every rank, so it stays whole, on the cost model as when measured."""
    from autopart.solver.tp_costs import tp_costs
    from autopart.solver.tp_ilp import solve_tp

    with torch.device("meta"):  # planned on meta tensors: a head the TP ILP splits
        model = _Head(width=2048, vocab=32768)
    gm = annotate(trace(model, (torch.zeros(8, 1024, dtype=torch.long, device="meta"),)))
    spec = get_device("h100")
    times, _ = loss_times_s(gm, spec)
    ((name, (loss_forward, loss_backward)),) = times.items()
    plain = OpGraph.from_graph_module(gm, spec)
    tp = solve_tp(gm, 2)
    assert name in tp_costs(plain, gm, tp).sharded  # the head splits by its vocabulary
    without = tp_costs(plain, gm, tp).op_graph.nodes[name]
    with_loss = tp_costs(plain.with_added_time(times), gm, tp).op_graph.nodes[name]
    assert with_loss.forward_s == pytest.approx(without.forward_s + loss_forward)
    assert with_loss.backward_s == pytest.approx(without.backward_s + loss_backward)
    # per sample: scaled with the micro-batch like the rest
    half = plain.with_added_time(times).scaled(0.5).nodes[name]
    assert half.loss_forward_s == pytest.approx(loss_forward / 2)
