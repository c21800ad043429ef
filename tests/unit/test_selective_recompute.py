"""Selective recomputation (torch's selective activation checkpointing: weight matmuls' outputs
kept, every other op recomputed): its cost rule, its choice by the stage ILP against full
recomputation, its record in the plan, and what the checkpointed stages compute and keep."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from autopart.cost_models import get_device
from autopart.planning.blocks import Block, BlockGraph, CrossTensor, Selective
from autopart.planning.plans import Plan
from autopart.planning.request import PlanRequest
from autopart.solver.stage_ilp import solve_stages

DEVICE = get_device("h100")
MIB = 1 << 20
ACT, INPUT, FREED = 100 * MIB, 10 * MIB, 70 * MIB


def _chain(n: int = 6, *, selective: bool = True) -> BlockGraph:
    """``n`` equal layers: each saves 100 MiB, reads 10 MiB; selectively it frees 70 MiB for a
    fifth of its forward."""
    sel = Selective(
        freed_bytes=FREED, forward_s=2e-4, fixed_forward_s=0.0, rematerialized_bytes=FREED
    )
    blocks = tuple(
        Block(
            index=i,
            name=f"layers.{i}",
            nodes=(f"n{i}",),
            modules=(f"layers.{i}",),
            forward_s=1e-3,
            backward_s=2e-3,
            flops=0,
            backward_flops=0,
            param_bytes=MIB,
            params=(f"p{i}",),
            activation_bytes=ACT,
            layer=f"layers.{i}",
            input_bytes=INPUT,
            selective=sel if selective else None,
        )
        for i in range(n)
    )
    tensors = tuple(CrossTensor(f"t{i}", i, (i + 1,), INPUT) for i in range(n - 1))
    return BlockGraph(blocks, tensors, {f"p{i}": MIB for i in range(n)})


def test_a_selective_block_keeps_its_matmul_outputs_and_runs_the_rest_again() -> None:
    b = _chain().blocks[0]
    again = b.recompute(selectively=True)
    assert again.recomputed and again.selectively and not again.can_recompute_selectively
    assert again.activation_bytes == ACT - FREED and again.rematerialized_bytes == FREED
    assert again.backward_s == pytest.approx(b.backward_s + 2e-4) and again.recompute_s == 2e-4
    half = BlockGraph((again,), (), {"p0": MIB}).scaled(0.5).blocks[0]
    assert half.activation_bytes == (ACT - FREED) // 2 and half.recompute_s == pytest.approx(1e-4)
    # merged into one unit, the parts' choices add up; a part without one leaves none
    assert Selective.merged([b.selective, b.selective]).freed_bytes == 2 * FREED  # type: ignore[union-attr]
    assert Selective.merged([b.selective, None]) is None


def test_the_stage_ilp_recomputes_selectively_where_that_fits_and_costs_less() -> None:
    def solve(bg: BlockGraph, limit: int) -> Any:
        return solve_stages(
            bg,
            2,
            DEVICE,
            in_flight=[2, 1],
            state_bytes_per_param_byte=4.0,
            memory_limit_bytes=limit,
            recompute=True,
            time_limit_s=5,
        )

    both, full_only = _chain(), _chain(selective=False)
    sol = solve(both, 400 * MIB)
    assert sol.selective and not sol.recompute  # selective alone fits, at a fifth of the time
    again = both.with_recompute(sol.recompute, sol.selective)
    mine = [b for b, s in zip(again.blocks, sol.stage_of) if s == 0]
    assert 4 * MIB * len(mine) + 2 * sum(b.activation_bytes for b in mine) + FREED <= 400 * MIB
    slow = full_only.with_recompute(solve(full_only, 400 * MIB).recompute)
    assert sum(b.recompute_s for b in again.blocks) < sum(b.recompute_s for b in slow.blocks)
    # a limit selective recomputation cannot meet: the leanest plan recomputes in full
    tight = solve(both, 4 * 4 * MIB + 4 * INPUT + ACT)
    assert len(tight.recompute) == 6 and not tight.selective


def _llama_plan(recompute: str, batch: int = 32) -> tuple[Plan, Any, tuple[torch.Tensor, ...]]:
    from autopart import annotate, trace
    from autopart.models.model_spec import load_model
    from autopart.planning.planner import plan_graph

    loaded = load_model("llama-tiny", batch=batch, device="cpu", seed=0)
    x = tuple(loaded.example_inputs)
    gm = annotate(trace(loaded.model, x))
    request = PlanRequest(
        mesh="pp=1", device="h100", schedule="gpipe", micro_batches=4, optimizer="sgd"
    )
    return plan_graph(gm, request.with_options(recompute=recompute), batch=batch), gm, x


def test_a_selective_plan_records_its_choice_and_reads_it_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from autopart.cli.main import main

    plan = _llama_plan("selective", batch=8)[0]
    assert plan.recompute and all(r.selective and r.saved_bytes > 0 for r in plan.recompute)
    assert all(r["selective"] is True for r in plan.to_dict()["recompute"])
    assert Plan.from_json(plan.to_json()) == plan
    full = dataclasses.replace(plan, recompute=tuple(
        dataclasses.replace(r, selective=False) for r in plan.recompute))  # fmt: skip
    assert all("selective" not in r for r in full.to_dict()["recompute"])
    argv = ["plan", "llama-tiny", "--batch", "8", "--mesh", "pp=2", "--recompute", "selective"]
    assert main(argv) == 0
    assert "selective: model.layers" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_selective_stages_compute_the_same_and_keep_what_the_plan_predicts() -> None:
    """One stage of llama-tiny (2 layers, 4 micro-batches of 8 sequences) run as GPipe runs it,
    measured as the run report measures memory on CPU: the same gradients as without
    recomputation, and a drop in peak memory at least what the plan predicts (never an
    over-promise, the direction that ends in an out-of-memory error). Here the drop is 1.100x the
    prediction (17.07 against 15.51 MiB), just outside the 10% the fidelity issue asks: the cost
    model counts fused attention as saving only its output and log-sum-exp, less than it keeps
    on CPU, so the baseline keeps more than predicted and the selective stage frees more."""
    from autopart.passes.recompute import checkpoint_blocks, recomputed_blocks
    from autopart.passes.split_stages import split_stages
    from autopart.runtime.peak_memory import measure_peak

    plans = {r: _llama_plan(r) for r in ("none", "selective")}

    def run(how: str) -> tuple[int, list[torch.Tensor]]:
        plan, gm, x = plans[how]
        mine = [r for r in plan.recompute if r.stage == 0]
        stage = split_stages(gm, plan)[0]
        checkpoint_blocks(stage, [r.nodes for r in mine], selective=[r.selective for r in mine])
        assert recomputed_blocks(stage) == len(mine)
        with measure_peak(torch.device("cpu"), list(stage.parameters())) as peak:
            outs = [stage(*mb)[0] for mb in zip(*(a.chunk(4) for a in x))]
            for out in outs:
                out.backward(torch.ones_like(out))
        return peak.peak_bytes, [p.grad for p in stage.parameters()]  # type: ignore[misc]

    (plain, grads), (selective, grads2) = run("none"), run("selective")
    for a, b in zip(grads2, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    predicted = (
        plans["none"][0].stages[0].peak_memory_bytes
        - plans["selective"][0].stages[0].peak_memory_bytes
    )
    drop = plain - selective
    assert predicted > 0 and drop >= predicted
