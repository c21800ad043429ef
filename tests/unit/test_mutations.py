"""In-place writes: which nodes must share a stage, plans that keep them together, a clear error
for a plan that does not, and stages that reproduce the eager model's outputs and buffer updates
in one process."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from autopart.capture.tracing import trace
from autopart.passes.annotate import annotate
from autopart.passes.mutations import mutation_groups, written_inputs
from autopart.passes.split_stages import SplitError, split_stages
from autopart.planning.graph import OpGraph
from autopart.planning.planner import plan_graph
from autopart.runtime.stage_io import value_metas
from tests.models import batchnorm_cnn, hf_resnet, inplace_residual


def _groups(gm: GraphModule) -> list[list[str]]:
    return [[n.name for n in g] for g in mutation_groups(gm)]


def _node(gm: GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_groups_hold_the_maker_the_writers_and_earlier_readers_of_a_written_tensor() -> None:
    model, x = inplace_residual()
    gm = trace(model.train(), x)
    assert _groups(gm) == [
        # y = block(h); y += h; h = y.relu_(): the next block reads the result after the writes
        ["linear_1", "add_", "relu_"],
        ["linear_2", "add__1", "relu__1"],
        ["linear_3", "add__2", "relu__2"],
        # weights /= weights.sum(): the sum reads them before the write
        ["pow_1", "sum_1", "div_"],
        # mixed[:, :half] = ...; mixed[:, half:].copy_(...): views of the fresh tensor, written
        ["zeros_like", "slice_2", "copy_", "slice_3", "copy__1"],
    ]
    # the no_grad block that updates the running mean writes the buffer through its subgraph
    (update,) = [n for n in gm.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    assert [n.name for n in written_inputs(update)] == ["feature_mean"]


class _StaleRead(nn.Module):
    """A view taken before an in-place write and read after it, and a buffer read after it is
    written: every node that touches either is tied to the writer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        first = y[:, 0]  # a view of y, read after the write below
        z = torch.tanh(y)
        y.mul_(2)
        self.count.add_(1)
        return first + z.sum(-1) + self.count.sum()


def test_a_view_read_after_the_write_and_every_reader_of_a_written_buffer_are_tied() -> None:
    gm = trace(_StaleRead(), (torch.randn(3, 4),))
    (activation, buffer) = _groups(gm)
    assert activation == ["linear", "select", "tanh", "mul_"]  # not the add that reads it after
    # a buffer outlives the step: its reader after the write is tied to it too
    assert buffer == ["add_", "sum_2"]


def test_graphs_without_in_place_writes_have_no_groups() -> None:
    model, x = batchnorm_cnn()
    gm = trace(model.eval(), x)  # eval BatchNorm only reads its running statistics
    assert not _groups(gm) and not any(written_inputs(n) for n in gm.graph.nodes)
    train = trace(model.train(), x)
    written = {w.name for n in train.graph.nodes for w in written_inputs(n)}
    assert {"features_1_running_mean", "features_1_num_batches_tracked"} <= written


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_plans_never_cut_a_group(stages: int) -> None:
    model, x = inplace_residual()
    gm = annotate(trace(model.train(), x))
    plan = plan_graph(gm, batch=8, mesh={"pp": stages}, device="cpu", micro_batches=1)
    for group in mutation_groups(gm):
        assert len({plan.stage_of[n.name] for n in group}) == 1, group
    kept = [
        n.name for n in OpGraph.from_graph_module(gm, _cpu()).nodes.values() if n.keep_with_previous
    ]
    assert "add_" in kept and "linear_1" not in kept  # a group's first node may start a stage
    split_stages(gm, plan)


def _cpu() -> Any:
    from autopart.cost_models import get_device

    return get_device("cpu")


def test_a_plan_that_cuts_a_group_is_a_clear_error() -> None:
    model, x = inplace_residual()
    gm = annotate(trace(model.train(), x))
    plan = plan_graph(gm, batch=8, mesh={"pp": 2}, device="cpu", micro_batches=1)
    order = [n.name for n in gm.graph.nodes if n.name in plan.stage_of]
    cut = order.index("add_")  # linear_1 on stage 0, its in-place residual add on stage 1
    stage_of = {name: int(i >= cut) for i, name in enumerate(order)}
    with pytest.raises(SplitError, match=r"node 'add_'.*writes a tensor in place.*stages \[0, 1\]"):
        split_stages(gm, dataclasses.replace(plan, stage_of=stage_of))


@pytest.mark.parametrize("factory", [batchnorm_cnn, inplace_residual, hf_resnet])
def test_chained_stages_update_buffers_as_the_eager_model(factory: Any) -> None:
    model, x = factory()
    model.train()
    eager = copy.deepcopy(model)
    gm = annotate(trace(model, x))
    stages = split_stages(
        gm, plan_graph(gm, batch=8, mesh={"pp": 2}, device="cpu", micro_batches=1)
    )
    assert all(dict(s.named_buffers()) for s in stages) or factory is inplace_residual
    for _ in range(2):  # the second run reads what the first wrote
        out: Any = x
        for stage in stages:
            out = stage(*out)
        want = eager(*x)
        torch.testing.assert_close(out[0], getattr(want, "logits", want))
    buffers = dict(eager.named_buffers())
    held = {n: b for s in stages for n, b in s.named_buffers()}
    assert set(held) == set(buffers)
    for name, b in held.items():
        torch.testing.assert_close(b, buffers[name], msg=name)


def test_measuring_a_graph_does_not_count_as_a_step() -> None:
    model, x = batchnorm_cnn()
    gm = trace(model.train(), x)
    before = {n: b.clone() for n, b in gm.named_buffers()}
    value_metas(gm, list(x))
    for n, b in gm.named_buffers():
        assert torch.equal(b, before[n]), n
