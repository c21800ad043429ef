"""Mixture-of-experts capture and costs, in one process: the routed sizes stay symbolic in the graph
(a batch that routes differently runs the same graph correctly), the experts are charged at the
expected routing (``passes/routing.py``), predicted forward FLOPs equal ``FlopCounterMode`` on the
eager model, and the planner keeps each MoE layer on one pipeline stage."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from autopart import annotate, load_model, trace
from autopart.models.model_spec import parse_config_overrides
from autopart.passes.routing import RoutingError, moe_layers, routing_of
from autopart.planning.planner import plan_graph
from tests.distributed.test_moe import MOE_MODELS

BATCH, SEQ = 2, 8


def _load(name: str, batch: int = BATCH) -> tuple[torch.nn.Module, tuple, dict]:
    spec, config = MOE_MODELS[name]
    overrides = parse_config_overrides(config) if config else None
    loaded = load_model(spec, device="cpu", batch=batch, seq=SEQ, config=overrides)
    return loaded.model, tuple(loaded.example_inputs), dict(loaded.example_kwargs)


def _eager_flops(model: torch.nn.Module, x: tuple, kw: dict) -> int:
    # the math backend: on CPU, FlopCounterMode counts fused attention as 0 FLOPs
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*x, **kw)
    return counter.get_total_flops()


def _expert_flops(hidden: int, width: int, routed_rows: int, layers: int) -> int:
    """SwiGLU experts: gate, up and down projections of every routed row."""
    return layers * 3 * 2 * routed_rows * hidden * width


def test_plain_moe_flops_equal_the_eager_count_and_the_expected_routing() -> None:
    model, x, kw = _load("moe-tiny")
    gm = annotate(trace(model, x, kw))
    predicted = gm.meta["autopart_totals"].flops
    assert predicted == _eager_flops(model, x, kw)  # this batch, however it routed
    routing = routing_of(gm)
    assert routing is not None
    tokens, k, experts = BATCH * SEQ, 2, 4
    # 2 layers x 4 experts, each charged T*k/E tokens
    assert routing.tokens_per_expert == {f"u{i}": tokens * k // experts for i in range(8)}
    expert_nodes = [n for n in gm.graph.nodes if ".experts." in n.meta["autopart"].module]
    charged = sum(n.meta["autopart"].flops for n in expert_nodes)
    assert charged == _expert_flops(64, 64, tokens * k, layers=2)


def test_the_imbalance_factor_scales_each_expert_up_to_every_token() -> None:
    model, x, kw = _load("moe-tiny")
    mean = annotate(trace(model, x, kw))
    double = annotate(trace(model, x, kw), expert_imbalance=2.0)
    capped = annotate(trace(model, x, kw), expert_imbalance=10.0)
    tokens = BATCH * SEQ
    assert set(routing_of(double).tokens_per_expert.values()) == {2 * tokens * 2 // 4}  # type: ignore[union-attr]
    assert set(routing_of(capped).tokens_per_expert.values()) == {tokens}  # type: ignore[union-attr]
    extra = _expert_flops(64, 64, tokens * 2, layers=2)  # one more mean share for every expert
    assert double.meta["autopart_totals"].flops == mean.meta["autopart_totals"].flops + extra
    assert "imbalance 2" in routing_of(double).describe()  # type: ignore[union-attr]
    with pytest.raises(RoutingError, match="imbalance factor must be >= 1"):
        annotate(trace(model, x, kw), expert_imbalance=0.5)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_grouped_experts_flops_equal_the_eager_count_of_per_expert_loops(name: str) -> None:
    """Hugging Face's grouped expert matmuls are one opaque op; the eager per-expert loop of the
    same model (``experts_implementation="eager"``) multiplies exactly the rows each expert got."""
    pytest.importorskip("transformers")
    model, x, kw = _load(name)
    gm = annotate(trace(model, x, kw))
    assert routing_of(gm).grouped_calls > 0  # type: ignore[union-attr]
    model.set_experts_implementation("eager")
    assert gm.meta["autopart_totals"].flops == _eager_flops(model, x, kw)


def test_routed_sizes_are_not_baked_from_the_tracing_batch() -> None:
    model, x, kw = _load("moe-tiny")
    gm = trace(model, x, kw)
    other = (torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7)),)

    def counts(ids: torch.Tensor) -> list[int]:
        layer = model.model.layers[0]
        h = layer.post_attention_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64)
        indices = layer.mlp.router(h).softmax(-1).topk(2).indices
        return [int((indices == e).sum()) for e in range(4)]

    assert counts(x[0]) != counts(other[0])  # the two batches route differently
    with torch.no_grad():
        torch.testing.assert_close(gm(*other), model(*other), rtol=0, atol=0)


def test_a_pipeline_stage_keeps_each_moe_layer_whole() -> None:
    model, x, kw = _load("moe-tiny")
    gm = annotate(trace(model, x, kw))
    layers = moe_layers(gm)
    assert [layer[0].meta["autopart_module"].path for layer in layers] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    plan = plan_graph(gm, mesh="pp=4", device="h100", batch=BATCH)
    for layer in layers:
        assert len({plan.stage_of[n.name] for n in layer if n.name in plan.stage_of}) == 1


class _MaskedRows(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[x[:, 0] > 0]).sum(0)


def test_a_data_dependent_size_that_counts_no_routing_is_an_error() -> None:
    gm = trace(_MaskedRows(), (torch.randn(8, 4),))
    with pytest.raises(RoutingError, match="does not count tokens routed by torch"):
        annotate(gm)
