"""A TP plan is applied only where the proven rules offer its placements at the shapes of the graph
that runs: the micro-batch graph of the same model passes, a plan for another graph, another
batch size's grouping or a tampered placement is an error naming the node."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from autopart.capture.tracing import trace
from autopart.errors import ShardError
from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.passes.annotate import annotate
from autopart.passes.tp.check import check_tp_plan
from autopart.planning.plans import TPSection
from autopart.solver.tp_ilp import megatron_plan, solve_tp
from tests.models import FAST_LINK, HF_CONFIGS


def _hf(name: str, batch: int) -> GraphModule:
    config = parse_config_overrides(HF_CONFIGS[name])
    loaded = load_model(name, device="cpu", batch=batch, seq=16, config=config, seed=0)
    return annotate(trace(loaded.model, loaded.example_inputs, dict(loaded.example_kwargs)))


@pytest.mark.parametrize("name", ["hf:gpt2", "hf:llama"])
def test_a_plan_holds_on_its_micro_batch_graph(name: str) -> None:
    full, micro = _hf(name, 8), _hf(name, 2)
    tp = TPSection.from_tp_plan(solve_tp(full, 2, device=FAST_LINK))
    assert {"col", "row"} <= set(tp.sharding.values())
    check_tp_plan(full, tp)
    check_tp_plan(micro, tp)


def test_a_plan_for_another_model_names_the_first_node_it_does_not_place() -> None:
    gpt2, llama = _hf("hf:gpt2", 8), _hf("hf:llama", 8)
    tp = TPSection.from_tp_plan(megatron_plan(gpt2, 2))
    with pytest.raises(ShardError, match="made for another graph"):
        check_tp_plan(llama, tp)


def test_a_placement_no_rule_offers_is_rejected() -> None:
    gm = _hf("hf:gpt2", 8)
    tp = TPSection.from_tp_plan(solve_tp(gm, 2, device=FAST_LINK))
    sdpa = next(n for n in tp.placements if n.startswith("scaled_dot_product_attention"))
    assert tp.placements[sdpa] == "S(1)"  # split on the heads
    wrong = dataclasses.replace(tp, placements={**tp.placements, sdpa: "S(2)"})  # on the queries
    with pytest.raises(ShardError, match=rf"node '{sdpa}' .* as S\(2\).*no sharding rule allows"):
        check_tp_plan(gm, wrong)


class _MergedHeads(nn.Module):
    """Per-head scores laid out as (batch x heads, query, key), as ALiBi attention does."""

    def __init__(self, hidden: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q = self.qk(x).view(b, s, self.heads, h // self.heads).transpose(1, 2)
        scores = q @ q.transpose(-1, -2)  # (b, heads, s, s)
        return scores.reshape(b * self.heads, s, s).softmax(-1)


def test_a_merge_grouped_by_one_batch_size_is_rejected_at_another() -> None:
    """``(b, heads) -> b * heads`` with the heads split is ``S(0, groups=b)`` only at that ``b``:
    a plan that says so for the full batch must not be applied to a micro-batch."""
    model = _MergedHeads()
    full = annotate(trace(model, (torch.randn(4, 8, 16),), {}))
    micro = annotate(trace(model, (torch.randn(2, 8, 16),), {}))
    tp = TPSection.from_tp_plan(solve_tp(full, 2, device=FAST_LINK))
    merge = "reshape"  # (4, heads 4, 8, 8) -> (16, 8, 8)
    assert full.graph.find_nodes(op="call_function", target=torch.ops.aten.reshape.default)
    grouped = {**tp.placements, merge: "S(0,groups=4)"}
    reads = {
        k: {u: ("S(0,groups=4)" if u == merge else p) for u, p in v.items()}
        for k, v in tp.input_placements.items()
    }
    wrong = dataclasses.replace(tp, placements=grouped, input_placements=reads)
    with pytest.raises(ShardError, match=r"node 'reshape' .*no sharding rule allows"):
        check_tp_plan(micro, wrong)
