"""Mixture-of-experts models train on pp=2, tp=2 and pp=2 x tp=2 exactly as one process does: on
spawned gloo ranks, the compiled program's losses, every parameter and every persistent buffer after
two SGD steps equal the unpartitioned model's on the same micro-batches (rtol 1e-5, float32).

Three MoE forms: the zoo's ``moe-tiny`` (plain PyTorch, ``torch.topk`` + ``torch.where`` +
``index_add``: per-expert token counts are unbacked symbolic sizes), and ``transformers``' Mixtral
(top-2 of 4 experts, with ``output_router_logits``: the load-balancing loss of every micro-batch
is added to the task loss as the model adds it) and DeepSeek-V3 (a dense first layer, then 8
routed experts in 4 groups with grouped top-k, a shared expert, and the aux-loss-free balancing
bias as a buffer), both with their grouped expert matmuls. On tp, every expert splits as a dense
MLP does (gate and up column-parallel, down row-parallel; HF's fused gate-up in two groups, so its
later chunk still cuts gate from up), the experts' partial outputs added up before one all-reduce
per layer; ``verify`` checks the sharded program against one process on the way.
One spawn of 2 ranks runs the six cases
of pp=2 and tp=2, one of 4 ranks the three of pp=2 x tp=2 (see :mod:`tests._mesh_cases`). The
models are small (2 layers, hidden 32, 8 tokens per sample: what they exercise does not need
more), so the file runs in about 2 minutes on 2 cores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.runtime.launch import training_batch
from tests._mesh_cases import Case, assert_trained_like, reference, results
from tests.models import FAST_LINK

transformers = pytest.importorskip("transformers")

STEPS = 2
MICRO_BATCHES = 4
AUX_COEF = 0.02
SEQ = 8
IMBALANCE = 1.5
"""Planned with this expert imbalance factor: the option reaches both graphs the program plans
(the whole batch's and the micro-batch's), and the program still trains as one process does."""
_ATTN = "hidden_size=32,num_attention_heads=2,num_key_value_heads=2,vocab_size=64"
MOE_MODELS = {
    "moe-tiny": ("moe-tiny", None),
    "mixtral": (
        "hf:mixtral",
        f"num_hidden_layers=2,{_ATTN},intermediate_size=32,num_local_experts=4,"
        "num_experts_per_tok=2,output_router_logits=true",
    ),
    "deepseek_v3": (
        "hf:deepseek_v3",
        f"num_hidden_layers=2,{_ATTN},intermediate_size=64,moe_intermediate_size=16,"
        "n_routed_experts=8,num_experts_per_tok=2,n_group=4,topk_group=2,n_shared_experts=1,"
        "first_k_dense_replace=1,q_lora_rank=8,kv_lora_rank=8,qk_rope_head_dim=4,"
        "qk_nope_head_dim=4,v_head_dim=8",
    ),
}
MESHES = ("pp=2", "tp=2", "pp=2,tp=2")


def moe_setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    """(model, inputs, keyword inputs, target, loss): cross-entropy, plus the router's
    load-balancing loss times ``AUX_COEF`` where the model returns one."""
    spec, config = MOE_MODELS[name]
    overrides = parse_config_overrides(config) if config else None
    loaded = load_model(spec, device="cpu", batch=8, seq=SEQ, config=overrides, seed=seed)
    loaded.model.train()
    target, task_loss = training_batch(loaded, seed)
    aux = config is not None and "output_router_logits=true" in config
    loss_fn = _with_aux_loss(task_loss) if aux else task_loss
    return loaded.model, tuple(loaded.example_inputs), dict(loaded.example_kwargs), target, loss_fn


def _with_aux_loss(task_loss: Callable[[Any, Any], torch.Tensor]) -> Any:
    def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:
        return task_loss(output, target) + AUX_COEF * output.aux_loss

    return loss_fn


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime
    from autopart.planning.request import PlanRequest

    model, x, kw, target, loss_fn = moe_setup(name)
    tp = "tp" in mesh
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        request=PlanRequest(expert_imbalance=IMBALANCE),
        schedule=schedule,
        micro_batches=MICRO_BATCHES,
        device=FAST_LINK,
        verify=tp,
    )
    optimizer = torch.optim.SGD(list(program.parameters()), lr=0.1)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    plan = program.plan
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "sharding": dict(plan.tp.sharding) if plan.tp is not None else {},
        "placements": dict(plan.tp.placements) if plan.tp is not None else {},
        "stage_modules": [list(s.modules) for s in plan.stages],
        "experts": plan.experts,
    }


CASES: list[Case] = [
    (name, mesh, "1f1b" if i % 2 else "gpipe", "sgd")
    for mesh in MESHES
    for i, name in enumerate(MOE_MODELS)
]


@pytest.fixture(scope="module")
def moe_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_moe_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        90.0,
        keep_going=True,  # one model's failure must not hide the others'
        by_world=True,  # pp=2 and tp=2 in one spawn of 2 ranks
    )


@pytest.mark.distributed
@pytest.mark.timeout(600)  # one spawn per world size runs its meshes' cases on the first case
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_moe_matches_the_unpartitioned_model(
    moe_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = moe_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    if name == "moe-tiny":  # per-expert token counts, charged at the factor asked for
        assert f"imbalance {IMBALANCE:g}" in got["experts"]
    else:  # grouped expert matmuls: every routed row, whatever the factor
        assert "grouped expert matmuls" in got["experts"]
    if "tp" in mesh:  # attention and dense matmuls really split
        assert "col" in got["sharding"].values() and "row" in got["sharding"].values()
    if "tp" in mesh:  # and each expert's matmuls (Megatron's col / row), in every MoE form
        experts = {k: v for k, v in got["placements"].items() if "mlp_experts_" in k}
        if name == "moe-tiny":  # 2 layers of 4 experts of 3 Linear weights [out, in]
            assert len(experts) == 2 * 4 * 3
            split = {w: "S(1)" if "down_proj" in w else "S(0)" for w in experts}
        else:  # stacked weights: gate-up [E, 2F, H] (two groups), down [E, H, F]
            assert {w.rsplit("mlp_experts_", 1)[1] for w in experts} == {
                "gate_up_proj",
                "down_proj",
            }
            split = {w: "S(2)" if "down_proj" in w else "S(1,groups=2)" for w in experts}
        assert experts == split
    want = reference(
        moe_setup, lambda p, _: torch.optim.SGD(p, lr=0.1), name, opt, MICRO_BATCHES, STEPS
    )
    assert_trained_like(got, want)
