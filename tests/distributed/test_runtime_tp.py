"""Tensor parallelism in the generated program: the TP rewrite of a stage in one process (local
shards, local shapes, where the collectives go), and the runtime on spawned gloo ranks against the
unpartitioned model (the same loss, and the same parameters after two optimizer steps) for tp=2,
pp=2 x tp=2 and dp=2 x pp=2 x tp=2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.fx import GraphModule

from autopart.capture.tracing import trace
from autopart.errors import ShardError
from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.passes.annotate import annotate
from autopart.passes.split_stages import split_stages
from autopart.passes.tp import shard as tp_pass
from autopart.passes.tp.local import local_shape, shard_tensor, unshard_tensor
from autopart.passes.tp.shard import TP_META_KEY, shard_tp
from autopart.planning.planner import plan_graph
from autopart.planning.plans import TPSection, parse_mesh
from autopart.runtime.launch import training_batch
from autopart.solver.tp_ilp import megatron_plan, solve_tp
from tests._mesh_cases import (
    SELECTIVE,
    Case,
    Setup,
    assert_trained_like,
    recompute_request,
    recomputed_blocks,
    recomputes,
    reference,
    results,
)
from tests.models import FAST_LINK, HF_CONFIGS

STEPS = 2
MODELS = {
    "mlp": ("mlp", None),
    "hf:gpt2": ("hf:gpt2", HF_CONFIGS["hf:gpt2"]),  # fused QKV (groups=3), tied embeddings
    "hf:llama": ("hf:llama", HF_CONFIGS["hf:llama"]),  # GQA: 4 query heads, 2 key/value heads
    # 3 heads on 2 TP ranks: attention falls back to replication, the MLP still splits
    "gpt2-3-heads": (
        "hf:gpt2",
        "n_layer=2,n_embd=48,n_head=3,vocab_size=512,n_positions=64,"
        "resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
    ),
}


def _setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, Any], torch.Tensor, Any]:
    spec, config = MODELS[name]
    overrides = parse_config_overrides(config) if config else None
    loaded = load_model(spec, device="cpu", batch=8, seq=16, config=overrides, seed=seed)
    model = loaded.model
    model.train()
    target, loss_fn = training_batch(loaded, seed)
    return model, loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


# ---------------------------------------------------------------------------------------------
# the pass, in one process


@functools.cache
def _graph(name: str) -> tuple[GraphModule, tuple[torch.Tensor, ...]]:
    model, x, kw, _, _ = _setup(name)
    return annotate(trace(model, x, kw)), x


def _calls(gm: GraphModule, fn: Any) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def test_megatron_gpt2_block_has_two_forward_all_reduces() -> None:
    gm, _ = _graph("hf:gpt2")
    tp = TPSection.from_tp_plan(megatron_plan(gm, 2))
    sharded = shard_tp(gm, tp, 1, "tp")
    modules = {
        n.name: n.meta["autopart_module"].path
        for n in gm.graph.nodes
        if "autopart_module" in n.meta
    }
    reduced = [n.args[0].name for n in _calls(sharded, tp_pass.tp_all_reduce)]
    for block in ("transformer.h.0", "transformer.h.1"):  # attention's c_proj and the MLP's c_proj
        inside = [p for p in reduced if modules.get(p, "").startswith(block)]
        assert len(inside) == 2, (block, reduced)
    # Megatron's f: each block's two column-parallel inputs all-reduce their gradient once
    assert len(_calls(sharded, tp_pass.tp_copy)) == 4
    assert not _calls(sharded, tp_pass.tp_all_gather)
    # the fused QKV projection: rank 1's share of q, k and v, biases of row-parallel layers whole
    params = dict(sharded.named_parameters())
    assert params["transformer.h.0.attn.c_attn.weight"].shape == (64, 96)
    assert params["transformer.h.0.attn.c_attn.bias"].shape == (96,)
    assert params["transformer.h.0.attn.c_proj.weight"].shape == (32, 64)
    assert params["transformer.h.0.attn.c_proj.bias"].shape == (64,)
    assert params["transformer.h.0.mlp.c_fc.weight"].shape == (64, 128)
    full = dict(gm.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    q, k, v = full.detach().split(64, dim=1)
    mine = params["transformer.h.0.attn.c_attn.weight"].detach()
    torch.testing.assert_close(mine, torch.cat([q[:, 32:], k[:, 32:], v[:, 32:]], dim=1))
    info = sharded.meta[TP_META_KEY]
    assert info.param_placements["transformer.h.0.attn.c_attn.weight"] == "S(1,groups=3)"
    # shape arguments are local: (batch, seq, 2 of the 4 heads, head_dim)
    views = {n.name: n.args[1] for n in sharded.graph.nodes if n.name in ("view_2", "view_3")}
    assert views == {"view_2": [8, 16, 96], "view_3": [8, 16, 2, 16]}
    # the unsharded graph is untouched
    assert dict(gm.named_parameters())["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)


def test_row_parallel_bias_is_added_by_rank_zero_only() -> None:
    gm, _ = _graph("hf:gpt2")
    tp = TPSection.from_tp_plan(megatron_plan(gm, 2))
    for rank in (0, 1):
        sharded = shard_tp(gm, tp, rank, "tp")
        biases = _calls(sharded, tp_pass.tp_partial_bias)
        assert len(biases) == 4 and all(n.args[2] is (rank == 0) for n in biases)


def test_vocabulary_parallel_embedding_is_a_masked_lookup() -> None:
    weight = torch.randn(8, 3)
    ids = torch.tensor([[0, 3, 4, 7]])
    parts = [
        tp_pass.tp_vocab_embedding(shard_tensor(weight, "S(0)", r, 2), ids, 4 * r) for r in range(2)
    ]
    torch.testing.assert_close(parts[0] + parts[1], torch.nn.functional.embedding(ids, weight))
    assert parts[0][0, 2].abs().sum() == 0  # id 4 lives on rank 1


def test_shards_join_back_to_the_whole_tensor() -> None:
    full = torch.arange(2 * 12.0).reshape(2, 12)
    for placement in ("S(0)", "S(1)", "S(1,groups=3)", "S(1,groups=2)", "R"):
        pieces = [shard_tensor(full, placement, r, 2) for r in range(2)]
        assert list(pieces[0].shape) == local_shape(full.shape, placement, 2)
        torch.testing.assert_close(unshard_tensor(pieces, placement), full)
    # groups=3: each rank holds its half of each of the three parts
    assert shard_tensor(full, "S(1,groups=3)", 1, 2)[0].tolist() == [2, 3, 6, 7, 10, 11]


def test_pipeline_stages_keep_their_placements_at_the_boundary() -> None:
    gm, _ = _graph("hf:llama")
    plan = plan_graph(gm, batch=8, mesh={"pp": 2}, device=FAST_LINK, micro_batches=1)
    tp = TPSection.from_tp_plan(solve_tp(gm, 2, device=FAST_LINK))
    first, last = split_stages(gm, plan)
    sent = [n for n in first.graph.output_node().args[0] if isinstance(n, torch.fx.Node)]
    sharded_first = shard_tp(first, tp, 0, "tp")
    out = sharded_first.graph.output_node().args[0]
    # a non-last stage sends what it holds: no collective right before its outputs
    assert [n.name for n in out] == [n.name for n in sent]
    # the last stage's output (the logits) is whole on every rank
    sharded_last = shard_tp(last, tp, 0, "tp")
    (logits,) = sharded_last.graph.output_node().args[0]
    assert tp.placements["linear_14"] != "R" and logits.target is not torch.ops.aten.linear.default


def test_a_plan_for_another_graph_is_a_clear_error() -> None:
    gm, _ = _graph("mlp")
    other, _ = _graph("hf:gpt2")
    tp = TPSection.from_tp_plan(megatron_plan(other, 2))
    with pytest.raises(ShardError, match="made for another graph"):
        shard_tp(gm, tp, 0, "tp")


# ---------------------------------------------------------------------------------------------
# the collectives on two gloo ranks: forward values and Megatron's gradients

# (from, read as, gradient the reader gives back)
CONVERSIONS = [
    ("P", "R", "R"),  # g: all-reduce, identity backward
    ("P", "R", "P"),  # all-reduce both ways
    ("S(1)", "R", "R"),  # all-gather, slice backward
    ("S(1,groups=3)", "R", "P"),  # all-gather, reduce-scatter backward (fused QKV layout)
    ("R", "S(0)", "S(0)"),  # slice, all-gather backward
    ("P", "S(1)", "S(1)"),  # reduce-scatter, all-gather backward
    ("S(0)", "S(1,groups=2)", "S(1,groups=2)"),  # all-to-all as gather + slice
    ("R", "R", "P"),  # f: identity, all-reduce backward
]


def _local(x: torch.Tensor, placement: str, rank: int, degree: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``x``: a partial sum is split unevenly, to catch a missing sum."""
    if placement == "P":
        return x * (rank + 1) / sum(range(1, degree + 1))
    return shard_tensor(x, placement, rank, degree)


def _collectives_worker(rank: int, world: int, store: str, out: str) -> None:
    from autopart.passes.tp.placements import Placement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world))).group_name
        results = []
        for src, dst, grad in CONVERSIONS:
            gen = torch.Generator().manual_seed(0)
            x, g = torch.randn(6, 12, generator=gen), torch.randn(6, 12, generator=gen)
            local = _local(x, src, rank, world).requires_grad_()
            graph = torch.fx.Graph()
            x_in = graph.placeholder("x")
            placements = (Placement.parse(p) for p in (src, dst, grad))
            graph.output(
                tp_pass._insert_conversion(graph, x_in, *placements, world, rank, group, "x")
            )
            y = GraphModule(torch.nn.Module(), graph)(local)
            y.backward(_local(g, grad, rank, world))
            results.append((y.detach(), local.grad))
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_collectives_have_megatron_autograd_semantics(tmp_path: Path) -> None:
    out = tmp_path / "collectives.pt"
    mp.start_processes(
        _collectives_worker,
        args=(2, str(tmp_path / "store"), str(out)),
        nprocs=2,
        start_method="spawn",
    )
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(6, 12, generator=gen), torch.randn(6, 12, generator=gen)
    for (src, dst, _), (y, grad) in zip(CONVERSIONS, torch.load(out), strict=True):
        # forward: rank 0 holds its part of the whole tensor, as read
        torch.testing.assert_close(y, shard_tensor(x, dst, 0, 2), msg=f"{src}->{dst} forward")
        # backward: the whole gradient, as the input's placement holds gradients (P: whole)
        want = g if src in ("P", "R") else shard_tensor(g, src, 0, 2)
        torch.testing.assert_close(grad, want, msg=f"{src}->{dst} backward")


# ---------------------------------------------------------------------------------------------
# the runtime on gloo ranks


def optimizer_for(params: Any, kind: str) -> torch.optim.Optimizer:
    """SGD, or Adam with ``eps=1e-6``. TP sums gradients in another order than one device, and
    Adam's step on a gradient component near its ``eps`` is decided by the component's last bits:
    there the float32 reference itself differs from a float64 one by more than 1e-5 (an LM head
    row of a token no target names, an embedding row of a rare token). Hence SGD for the language
    models and Adam, with a larger ``eps``, for the MLP."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.Adam(params, lr=1e-3, eps=1e-6)


def micro_batches_for(mesh: str) -> int:
    """Per replica, micro-batches of 2 samples (one sample would trace HF LLaMA to another graph)."""
    return 2 if parse_mesh(mesh).get("dp", 1) > 1 else 4


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    return train_tp_case(_setup, name, mesh, schedule, opt)


def train_tp_case(setup: Setup, name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    """Compile ``setup(name)`` on ``mesh`` (with ``verify=True``), train it ``STEPS`` steps and
    return what the equivalence test compares; shared with the families test."""
    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = setup(name)
    schedule, request = recompute_request(schedule, FAST_LINK)
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        request=request,
        schedule=schedule,
        micro_batches=micro_batches_for(mesh),
        device=FAST_LINK,
        verify=True,  # no false alarm on any case; test_verify_* shows it catches a wrong rule
    )
    inference = program(*x, **kw)
    inference = getattr(inference, "logits", inference)
    params = list(program.parameters())
    local_numel = sum(p.numel() for p in params)
    optimizer = optimizer_for(params, opt) if params else None
    losses = []
    for _ in range(STEPS):
        if optimizer is not None:
            optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        if optimizer is not None:
            optimizer.step()
    assert program.plan.tp is not None
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "inference": inference,
        "sharding": dict(program.plan.tp.sharding),
        "fallbacks": dict(program.plan.tp.fallbacks),
        "local_numel": local_numel,
        "recomputed": recomputed_blocks(program),
    }


# SGD for the language models (see optimizer_for): some of their gradient components are zero or
# nearly zero in exact arithmetic (GPT-2's key bias, which softmax ignores; rare tokens' rows), and
# Adam turns their last-bit noise into full-size steps in either program.
CASES = [
    ("mlp", "tp=2", "gpipe", "adam"),
    ("hf:gpt2", "tp=2", "1f1b", "sgd"),
    ("hf:llama", "tp=2", "gpipe", "sgd"),
    ("gpt2-3-heads", "tp=2", "gpipe", "sgd"),  # heads not divisible: attention replicated
    ("mlp", "pp=2,tp=2", "1f1b", "adam"),
    ("hf:gpt2", "pp=2,tp=2", "1f1b", "sgd"),  # tied embeddings on both stages, as shards
    ("hf:llama", "pp=2,tp=2", "gpipe", "sgd"),
    ("hf:llama", "pp=2,tp=2", "1f1b" + SELECTIVE, "sgd"),  # TP collectives recomputed too
    # 8 ranks (about 2 min here): two data-parallel replicas (DDP) of a 2-stage pipeline of 2 TP
    # ranks each; the tied embeddings' shards are summed per (dp, tp) coordinate
    ("hf:gpt2", "dp=2,pp=2,tp=2", "1f1b", "sgd"),
    ("hf:llama", "dp=2,pp=2,tp=2", "gpipe", "sgd"),
    ("mlp", "dp=2,pp=2,tp=2", "1f1b", "adam"),
]
SLOW = {c for c in CASES if c[1] == "dp=2,pp=2,tp=2"}


@pytest.fixture(scope="module")
def tp_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_tp_program_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        120.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a mesh spawns every case of it
@pytest.mark.parametrize(
    ("name", "mesh", "schedule", "opt"),
    [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES],
)
def test_tp_program_matches_the_unpartitioned_model(
    tp_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = tp_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    assert (got["recomputed"] > 0) == recomputes(schedule)
    # the plan really splits, and each rank holds less than the whole model
    assert {"col", "row"} & set(got["sharding"].values()), got["sharding"]
    model, x, kw, _, _ = _setup(name)
    assert got["local_numel"] < sum(p.numel() for p in model.parameters())
    if name == "gpt2-3-heads":
        assert got["fallbacks"], "3 heads on 2 ranks must fall back to replication"
        for sdpa in ("scaled_dot_product_attention", "scaled_dot_product_attention_1"):
            why = got["fallbacks"][sdpa]
            assert "query heads (3) not divisible by the TP degree 2" in why
    with torch.no_grad():
        expected = getattr(model(*x, **kw), "logits", model(*x, **kw))
    torch.testing.assert_close(got["inference"], expected, rtol=1e-5, atol=1e-6)
    sizes = parse_mesh(mesh)
    want = reference(
        _setup, optimizer_for, name, opt, sizes.get("dp", 1) * micro_batches_for(mesh), STEPS
    )
    assert_trained_like(got, want)


# ---------------------------------------------------------------------------------------------
# verify=True: a wrong rewrite is caught before training, naming the node


def _run_broken(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    """Compile with a planted bug: every rank adds a row-parallel linear's bias (it must be rank 0
    alone), so the partial sums add up to the product plus ``degree`` biases."""
    import autopart.runtime.program as runtime
    from autopart.runtime.verify import TPVerificationError

    tp_pass.tp_partial_bias = lambda product, bias, first: product + bias  # type: ignore[assignment]
    model, x, kw, _, loss_fn = _setup(name)
    torch.manual_seed(0)
    with torch.no_grad():  # HF initialises biases to zero, which would hide the bug
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_()
    try:
        runtime.compile(
            model,
            mesh,
            example_inputs=x,
            example_kwargs=kw,
            loss_fn=loss_fn,
            schedule=schedule,
            micro_batches=2,
            device=FAST_LINK,
            verify=True,
        )
    except TPVerificationError as exc:
        return {"node": exc.node, "stage": exc.stage, "message": str(exc)}
    return {"node": None}


BROKEN = [("mlp", "tp=2", "gpipe", "sgd"), ("hf:gpt2", "tp=2", "gpipe", "sgd")]


@pytest.fixture(scope="module")
def broken_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_verify_names_the_first_node_that_differs",
        BROKEN,
        _run_broken,
        120.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), BROKEN)
def test_verify_names_the_first_node_that_differs(
    broken_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = broken_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    gm, _ = _graph(name)
    batch = int(x.shape[0]) if isinstance(x := _setup(name)[1][0], torch.Tensor) else 0
    plan = plan_graph(
        gm, batch=batch, mesh={"tp": 2}, device=FAST_LINK, micro_batches=2, schedule=schedule
    )
    assert plan.tp is not None
    rows = [n for n, kind in plan.tp.sharding.items() if kind == "row"]
    biased = [n for n in rows if _has_bias(_node(gm, n))]
    assert biased, "the planted bug needs a row-parallel linear with a bias"
    # the first row-parallel linear with a bias is the first node whose value is wrong
    assert got["node"] == biased[0], got
    assert f"node {biased[0]!r} differs" in got["message"]
    assert "not in your model" in got["message"]


def _node(gm: GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _has_bias(node: torch.fx.Node) -> bool:
    """``linear(x, W, b)`` with a bias, or ``addmm(b, x, W)`` (HF Conv1D)."""
    if "addmm" in str(node.target):
        return True
    return len(node.args) > 2 and node.args[2] is not None
