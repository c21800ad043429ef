"""What a plan and the CLI say about a mixture of experts, in one process: the expert imbalance
factor is a planning option (PlanRequest, ``--expert-imbalance``) that reaches the annotation, the
plan states how it costed the experts (and an older plan file is unchanged), ``autopart inspect``
shows one row per MoE layer's experts, and ``split_stages`` refuses a plan that cuts an MoE
layer; and that on TP every expert of the three MoE forms splits its matmuls, never its tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from autopart import annotate, load_model, trace
from autopart.cli.inspection import inspect_rows, inspect_summary
from autopart.cli.main import main
from autopart.errors import AutopartError
from autopart.passes.routing import RoutingError, expert_groups, moe_layers, routing_of
from autopart.passes.split_stages import SplitError, split_stages
from autopart.planning.mesh_search import search_mesh
from autopart.planning.planner import plan, plan_graph
from autopart.planning.plans import Plan
from autopart.planning.request import PlanRequest

BATCH, SEQ, TOKENS, K, EXPERTS = 2, 8, 16, 2, 4  # the zoo's moe-tiny: top-2 of 4 experts


def _moe(imbalance: float = 1.0) -> tuple[torch.fx.GraphModule, object]:
    loaded = load_model("moe-tiny", device="cpu", batch=BATCH, seq=SEQ)
    gm = trace(loaded.model, tuple(loaded.example_inputs), dict(loaded.example_kwargs))
    return annotate(gm, expert_imbalance=imbalance), loaded


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, float("nan"), float("inf"), "2", True])
def test_the_imbalance_factor_is_a_checked_planning_option(bad: object) -> None:
    assert PlanRequest(expert_imbalance=1.5).expert_imbalance == 1.5
    assert PlanRequest(expert_imbalance=2).expert_imbalance == 2.0
    with pytest.raises(AutopartError, match="imbalance factor must be >= 1 and finite"):
        PlanRequest(expert_imbalance=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("mesh", ["pp=2", "auto"])
def test_the_plan_states_how_it_costed_the_experts_and_round_trips(mesh: str) -> None:
    loaded = load_model("moe-tiny", device="cpu", batch=BATCH, seq=SEQ)
    made = plan(
        loaded.model, tuple(loaded.example_inputs), mesh=mesh, devices=2, expert_imbalance=1.5
    )
    share = TOKENS * K // EXPERTS  # 8 tokens: the mean share; x1.5 = 12
    assert made.experts == routing_of(_moe(1.5)[0]).describe()  # type: ignore[union-attr]
    assert "imbalance 1.5 = 12 tokens" in made.experts and f"= {share}" not in made.experts
    again = Plan.from_json(made.to_json())
    assert again.experts == made.experts and again == made


def test_a_plan_without_experts_writes_the_file_it_always_wrote() -> None:
    loaded = load_model("mlp", device="cpu", batch=BATCH)
    made = plan(loaded.model, tuple(loaded.example_inputs), mesh="pp=2")
    assert made.experts == "" and "experts" not in made.to_dict()
    assert Plan.from_json(made.to_json()) == made


def test_planning_a_graph_costed_at_another_imbalance_is_an_error() -> None:
    gm, _ = _moe(1.0)
    with pytest.raises(RoutingError, match=r"costed at imbalance 1, but the plan asks for 2"):
        plan_graph(gm, mesh="pp=2", batch=BATCH, expert_imbalance=2.0)
    with pytest.raises(RoutingError, match=r"costed at imbalance 1, but the plan asks for 2"):
        search_mesh(gm, devices=2, batch=BATCH, expert_imbalance=2.0)


def test_cli_plan_takes_the_imbalance_and_prints_how_experts_were_costed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", "moe-tiny", "--batch", "2", "--seq", "8", "--expert-imbalance", "2"]
    assert main([*argv, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "imbalance 2 = 16 tokens" in doc["experts"]
    assert main(argv) == 0
    assert "experts: 8 per-expert token counts" in capsys.readouterr().out
    assert main([*argv[:-1], "0.9"]) == 2
    assert "imbalance factor must be >= 1" in capsys.readouterr().err


def test_cli_inspect_takes_the_imbalance(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inspect", "moe-tiny", "--batch", "2", "--seq", "8", "--format", "json"]
    assert main([*argv, "--expert-imbalance", "1.5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "imbalance 1.5 = 12 tokens" in doc["experts"]
    assert [(g["module"], g["experts"]) for g in doc["expert_groups"]] == [
        ("model.layers.0.mlp.experts.*", EXPERTS),
        ("model.layers.1.mlp.experts.*", EXPERTS),
    ]
    assert main([*argv, "--expert-imbalance", "0"]) == 2


@pytest.mark.parametrize("by", ["node", "module"])
def test_inspect_shows_one_row_per_moe_layers_experts(by: str) -> None:
    gm, _ = _moe()
    rows = inspect_rows(gm, by=by)
    grouped = [r for r in rows if "experts" in r]
    assert [(r["module"], r["experts"]) for r in grouped] == [
        ("model.layers.0.mlp.experts.*", EXPERTS),
        ("model.layers.1.mlp.experts.*", EXPERTS),
    ]
    assert not [r for r in rows if ".experts." in r["module"] and "experts" not in r]
    # the router is no expert's: it keeps its own row
    assert any(r["module"] == "model.layers.0.mlp.router" for r in rows)
    totals = gm.meta["autopart_totals"]
    assert sum(r["flops"] for r in rows) == totals.flops  # nothing lost, nothing counted twice
    assert sum(r["param_bytes"] for r in rows) == totals.param_bytes
    groups = expert_groups(gm)
    expert_nodes = {n.name for g in groups for n in g.nodes}
    per_node = {r["name"] for r in inspect_rows(gm, by="node") if "experts" not in r}
    assert not expert_nodes & per_node
    layer = moe_layers(gm)[0]
    assert {n.name for n in groups[0].nodes} <= {n.name for n in layer}
    # each expert's 19 ops (mask, where, gather, SwiGLU, weighting, scatter-back) and the zeros
    # the first scatter adds into
    assert len(groups[0].nodes) == 19 * EXPERTS + 1


def test_inspect_summary_lists_the_expert_groups() -> None:
    gm, loaded = _moe()
    doc = inspect_summary(loaded, gm)
    assert doc["experts"] == routing_of(gm).describe()  # type: ignore[union-attr]
    assert len(doc["nodes"]) == len(gm.graph.nodes)  # JSON keeps every node


def test_split_stages_refuses_a_plan_that_cuts_an_moe_layer() -> None:
    gm, _ = _moe()
    good = plan_graph(gm, mesh="pp=2", batch=BATCH)
    layer = moe_layers(gm)[0]
    cut = layer[len(layer) // 2]  # the second half of layer 0's MoE on stage 1, and all after
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stage_of = {name: int(order[name] >= order[cut.name]) for name in good.stage_of}
    bad = dataclasses.replace(good, stage_of=stage_of)
    with pytest.raises(SplitError, match=r"cuts the mixture-of-experts layer 'model\.layers\.0"):
        split_stages(gm, bad)
    assert len(split_stages(gm, good)) == 2


_HF_MOE = {
    "hf:mixtral": "num_local_experts=4,num_experts_per_tok=2,intermediate_size=32",
    "hf:deepseek_v3": "n_routed_experts=8,num_experts_per_tok=2,n_group=4,topk_group=2,"
    "first_k_dense_replace=1,moe_intermediate_size=16,intermediate_size=64,q_lora_rank=8,"
    "kv_lora_rank=8,qk_rope_head_dim=4,qk_nope_head_dim=4,v_head_dim=8",
}


@pytest.mark.parametrize("spec", ["moe-tiny", *_HF_MOE])
def test_tp_splits_each_experts_matmuls_never_its_tokens(spec: str) -> None:
    # on a nearly free link the TP ILP splits every expert as a dense MLP: gate / up columns
    # (a fused gate-up in two groups, so the later chunk still gets its halves), down rows
    from autopart.models.model_spec import parse_config_overrides
    from tests.models import FAST_LINK

    if spec.startswith("hf:"):
        pytest.importorskip("transformers")
    base = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,num_key_value_heads=2"
    config = (
        parse_config_overrides(f"{base},vocab_size=64,{_HF_MOE[spec]}") if spec in _HF_MOE else None
    )
    loaded = load_model(spec, device="cpu", batch=BATCH, seq=SEQ, config=config)
    request = PlanRequest(mesh="tp=2", device=FAST_LINK)
    made = plan(loaded.model, tuple(loaded.example_inputs), mesh="tp=2", request=request)
    assert made.tp is not None
    experts = {k: v for k, v in made.tp.placements.items() if "mlp_experts" in k}
    assert experts and len(set(experts.values())) == 2
    for weight, placement in experts.items():
        if spec == "moe-tiny":  # Linear weights [out, in]
            assert placement == ("S(1)" if "down_proj" in weight else "S(0)"), weight
        else:  # stacked [E, 2F, H] gate-up and [E, H, F] down
            assert placement == ("S(2)" if "down_proj" in weight else "S(1,groups=2)"), weight
