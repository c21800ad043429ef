"""split_stages: chained stage modules reproduce the unpartitioned model, forward and backward."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves, tree_unflatten

import autopart
from autopart.models.model_spec import load_model
from autopart.passes.split_stages import SplitError, split_stages, stage_info
from autopart.planning.planner import plan_graph
from autopart.planning.plans import Plan
from tests.models import TwoInTwoOut, TwoLayer

CASES = [
    ("mlp", 2),
    ("mlp", 4),
    ("gpt2-tiny", 2),
    ("gpt2-tiny", 4),
    ("llama-tiny", 2),
    ("llama-tiny", 4),
    ("cnn", 2),
    ("cnn", 4),
    ("two-in-two-out", 2),
    ("two-in-two-out", 4),
]


@functools.cache
def _traced(name: str) -> tuple[nn.Module, tuple[Any, ...], GraphModule]:
    if name == "two-in-two-out":
        torch.manual_seed(0)
        model: nn.Module = TwoInTwoOut()
        inputs: tuple[Any, ...] = (torch.randn(4, 8), torch.randn(4, 8))
    else:
        loaded = load_model(name, device="cpu", batch=4, seq=16)
        model, inputs = loaded.model, loaded.example_inputs
    return model, inputs, autopart.annotate(autopart.trace(model, inputs))


@functools.cache
def _plan(name: str, num_stages: int) -> Plan:
    gm = _traced(name)[2]
    return plan_graph(gm, batch=4, mesh=f"pp={num_stages}", device="h100", schedule="gpipe")


def _chain(stages: list[GraphModule], inputs: tuple[Any, ...]) -> Any:
    out = tuple(inputs)
    for stage in stages:
        out = stage(*out)
        assert isinstance(out, tuple)
    spec = stage_info(stages[-1]).output_spec
    assert spec is not None
    return tree_unflatten(list(out), spec)


def _loss(outputs: Any) -> torch.Tensor:
    return sum((leaf.float() ** 2).mean() for leaf in tree_leaves(outputs))


@pytest.mark.parametrize(("name", "num_stages"), CASES)
def test_chained_stages_match_the_model(name: str, num_stages: int) -> None:
    model, inputs, gm = _traced(name)
    stages = split_stages(gm, _plan(name, num_stages))
    assert len(stages) == num_stages

    model.zero_grad()
    expected = model(*inputs)
    _loss(expected).backward()
    got = _chain(stages, inputs)
    torch.testing.assert_close(got, expected)
    _loss(got).backward()

    for param_name, param in model.named_parameters():
        copies = [dict(s.named_parameters()).get(param_name) for s in stages]
        grads = [c.grad for c in copies if c is not None and c.grad is not None]
        assert grads, f"{param_name} got no gradient on any stage"
        assert param.grad is not None
        torch.testing.assert_close(sum(grads), param.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "num_stages"), CASES)
def test_stages_own_the_model_parameters_under_its_names(name: str, num_stages: int) -> None:
    model, _, gm = _traced(name)
    stages = split_stages(gm, _plan(name, num_stages))
    model_names = {n for n, _ in model.named_parameters()}
    held = [set(stage_info(s).param_names) for s in stages]
    for stage, names in zip(stages, held):
        assert names == {n for n, _ in stage.named_parameters()}
        assert names <= model_names
    assert set().union(*held) == model_names
    for s, stage in enumerate(stages):  # a parameter on two stages is recorded on both
        for param_name, holders in stage_info(stage).shared_params.items():
            assert s in holders
            assert all(param_name in held[h] for h in holders)
        for param_name in stage_info(stage).param_names:
            on = tuple(i for i, names in enumerate(held) if param_name in names)
            assert (len(on) > 1) == (param_name in stage_info(stage).shared_params)


@pytest.mark.parametrize(("name", "num_stages"), CASES)
def test_stage_boundaries_chain(name: str, num_stages: int) -> None:
    _, _, gm = _traced(name)
    stages = split_stages(gm, _plan(name, num_stages))
    infos = [stage_info(s) for s in stages]
    model_inputs = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert infos[0].input_names == model_inputs
    for prev, nxt in itertools.pairwise(infos):
        assert prev.output_names == nxt.input_names
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    for info in infos[:-1]:
        positions = [order[n] for n in info.output_names]
        assert positions == sorted(positions)
    assert infos[-1].output_spec is not None and all(i.output_spec is None for i in infos[:-1])


def test_tied_embedding_is_shared_between_first_and_last_stage() -> None:
    stages = split_stages(_traced("gpt2-tiny")[2], _plan("gpt2-tiny", 4))
    first, last = stage_info(stages[0]), stage_info(stages[-1])
    assert first.shared_params == {"transformer.wte.weight": (0, 3)}
    assert last.shared_params == {"transformer.wte.weight": (0, 3)}
    assert stage_info(stages[1]).shared_params == {}


def test_long_skips_pass_through_middle_stages() -> None:
    stages = split_stages(_traced("cnn")[2], _plan("cnn", 4))
    passing = [stage_info(s).passthrough_names for s in stages]
    assert any(passing[1:-1])
    for s, names in enumerate(passing):
        info = stage_info(stages[s])
        assert set(names) <= set(info.input_names) & set(info.output_names)


def test_two_outputs_come_back_as_a_tuple() -> None:
    model, inputs, gm = _traced("two-in-two-out")
    got = _chain(split_stages(gm, _plan("two-in-two-out", 2)), inputs)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got, model(*inputs))


@pytest.mark.parametrize("name", ["gpt2-tiny", "cnn"])
def test_stage_code_is_deterministic(name: str) -> None:
    gm = _traced(name)[2]
    plan = _plan(name, 4)
    first = [s.code for s in split_stages(gm, plan)]
    again = [s.code for s in split_stages(gm, Plan.from_json(plan.to_json()))]
    assert first == again


def _fx_plan(gm: GraphModule, first_stage: int) -> Plan:
    computing = [
        n.name for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
    ]
    stage_of = {n: (0 if i < first_stage else 1) for i, n in enumerate(computing)}
    return dataclasses.replace(_plan("two-in-two-out", 2), stage_of=stage_of)


def test_fx_graph_with_call_module_nodes_splits() -> None:
    model = TwoLayer()
    x = torch.randn(4, 16)
    gm = autopart.trace(model, (x,), method="fx")
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    stages = split_stages(gm, _fx_plan(gm, 2))
    assert stage_info(stages[1]).param_names == ("fc2.weight", "fc2.bias")
    torch.testing.assert_close(_chain(stages, (x,)), model(x))


def test_float_model_input_read_on_a_later_stage_is_rejected() -> None:
    model = TwoInTwoOut()  # forward(x, y, *, scale=1.0): fx keeps scale as a graph input
    gm = autopart.trace(model, (torch.randn(4, 8), torch.randn(4, 8)), method="fx")
    with pytest.raises(SplitError, match=r"node 'scale' produces a float.*on the model input"):
        split_stages(gm, _fx_plan(gm, 3))
    stages = split_stages(gm, _fx_plan(gm, 4))  # scale read on stage 0 only; its default is kept
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(_chain(stages, (x, y)), model(x, y))


# -- bad plans ------------------------------------------------------------------------------------


def _mlp_plan(**changes: Any) -> tuple[GraphModule, Plan]:
    gm = _traced("mlp")[2]
    return gm, dataclasses.replace(_plan("mlp", 2), **changes)


def test_missing_node_is_rejected() -> None:
    gm, plan = _mlp_plan()
    stage_of = dict(plan.stage_of)
    del stage_of["linear_3"]
    with pytest.raises(SplitError, match=r"have no stage \('linear_3'\).*plan this graph again"):
        split_stages(gm, dataclasses.replace(plan, stage_of=stage_of))


def test_unknown_node_is_rejected() -> None:
    gm, plan = _mlp_plan()
    with pytest.raises(SplitError, match=r"not in the graph \('nope'\)"):
        split_stages(gm, dataclasses.replace(plan, stage_of={**plan.stage_of, "nope": 0}))


def test_backward_edge_is_rejected() -> None:
    gm, plan = _mlp_plan()
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert plan.stage_of[last.name] == 1
    bad = {**plan.stage_of, last.name: 0}
    with pytest.raises(
        SplitError, match=rf"{last.name}.*on stage 0 but its input .* later stage 1"
    ):
        split_stages(gm, dataclasses.replace(plan, stage_of=bad))


def test_empty_stage_is_rejected() -> None:
    gm, plan = _mlp_plan()
    with pytest.raises(SplitError, match=r"stage\(s\) \[1\].*have no nodes"):
        split_stages(gm, dataclasses.replace(plan, stage_of=dict.fromkeys(plan.stage_of, 0)))


class _SizeAcross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        return self.fc(x).reshape(n, 2, 4)


def _size_graph_and_plan(gm: GraphModule) -> Plan:
    computing = [
        n.name for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
    ]
    stage_of = {n: (1 if n.startswith("reshape") else 0) for n in computing}
    return dataclasses.replace(_plan("mlp", 2), stage_of=stage_of)


def test_python_scalar_crossing_a_boundary_is_folded() -> None:
    model = _SizeAcross()
    x = torch.randn(4, 8)
    gm = autopart.trace(model, (x,), method="fx")
    stages = split_stages(gm, _size_graph_and_plan(gm))
    assert stage_info(stages[0]).output_names == ("fc",)
    torch.testing.assert_close(_chain(stages, (x,)), model(x))


def test_non_tensor_crossing_a_boundary_is_rejected() -> None:
    gm = torch.fx.symbolic_trace(_SizeAcross())  # no metadata: the size is not known to be an int
    with pytest.raises(SplitError, match=r"node 'size' produces a NoneType.*exchange tensors only"):
        split_stages(gm, _size_graph_and_plan(gm))
