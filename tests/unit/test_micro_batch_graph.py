"""The graph the stages run is the model traced at one micro-batch's shapes. When it has other nodes
than the whole batch's graph (export specializes dimensions of size 1, so a micro-batch of one
sequence drops no-op expands in Hugging Face decoders), compile and emit plan that graph itself,
costed at the shapes it runs with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import autopart
from autopart.codegen.emitter import EmitError
from autopart.passes.split_stages import rebuild_output, split_stages, stage_info
from autopart.planning.planner import plan_graph
from autopart.planning.plans import Plan
from autopart.runtime.stage_io import (
    micro_batch_graph,
    plan_made_for,
    plan_that_runs,
    same_nodes,
)
from tests.models import FAST_LINK, llama_batch4

pytest.importorskip("transformers")


def _planned(factory: Any, mesh: str) -> tuple[Plan, torch.fx.GraphModule, Any]:
    model, x, kw = factory()
    gm = autopart.annotate(autopart.trace(model, x, kw))

    def make(graph: torch.fx.GraphModule, graph_batch: int, m: int | None) -> Plan:
        return plan_graph(
            graph,
            batch=4,
            mesh=mesh,
            device=FAST_LINK,
            micro_batches=m,
            schedule="gpipe",
            graph_batch=graph_batch,
        )

    plan, run_gm = plan_that_runs(make, 4, model, gm, x, kw, batch=4, dp=1)
    assert not same_nodes(gm, run_gm)  # the micro-batch of one sequence traces to another graph
    assert plan_made_for(plan, run_gm) and not plan_made_for(plan, gm)
    assert plan.micro_batches == 4  # the count asked for, not fewer
    return plan, run_gm, (model, x, kw)


def test_a_micro_batch_of_one_sequence_runs_the_plan_of_its_own_graph() -> None:
    plan, run_gm, (model, x, kw) = _planned(llama_batch4, "pp=2")
    stages = split_stages(run_gm, plan)
    values: tuple[Any, ...] = tuple(a[1:2] for a in x)  # the second micro-batch
    for stage in stages:
        values = stage(*values)
    got = rebuild_output(stage_info(stages[-1]), values)
    torch.testing.assert_close(got.logits, model(*(a[1:2] for a in x), **kw).logits)


def test_tensor_parallel_placements_are_planned_at_the_micro_batch_shapes() -> None:
    plan, _, _ = _planned(llama_batch4, "pp=2,tp=2")  # plan_that_runs checks the placements
    assert plan.tp is not None and {"col", "row"} <= set(plan.tp.sharding.values())


def test_a_graph_traced_at_one_micro_batch_is_costed_as_it_is() -> None:
    """Planning the micro-batch graph of a batch of 8 on 4 micro-batches costs each micro-batch
    exactly as planning that graph as a whole batch of one micro-batch does."""
    model, x, kw = llama_batch4()
    gm = autopart.annotate(autopart.trace(model, x, kw))
    micro = autopart.annotate(micro_batch_graph(model, gm, x, kw, batch=4, chunks=2))

    def plan(batch: int, mesh: str, m: int) -> Plan:
        return plan_graph(
            micro,
            batch=batch,
            mesh=mesh,
            device="cpu",
            micro_batches=m,
            schedule="gpipe",
            graph_batch=2,
        )

    alone = plan(2, "pp=2", 1)
    for batch, mesh, m in ((8, "pp=2", 4), (16, "dp=2,pp=2", 4)):
        in_steps = plan(batch, mesh, m)
        assert in_steps.stage_of == alone.stage_of
        assert in_steps.bottleneck_s == pytest.approx(alone.bottleneck_s, rel=1e-12)


def test_emit_takes_the_plan_of_the_micro_batch_graph_not_the_batchs(tmp_path: Path) -> None:
    plan, _, (model, x, kw) = _planned(llama_batch4, "pp=2")
    whole = plan_graph(
        autopart.annotate(autopart.trace(model, x, kw)),
        batch=4,
        mesh="pp=2",
        device=FAST_LINK,
        micro_batches=4,
        schedule="gpipe",
    )
    target = torch.randint(0, 512, (4, 16))

    def emit(p: Plan, out: Path) -> Path:
        return autopart.emit(
            p,
            out,
            model=model,
            example_inputs=x,
            example_kwargs=kw,
            target=target,
            loss_fn=_tokens,
        )

    config = json.loads((emit(plan, tmp_path / "micro") / "config.json").read_text())
    assert config["stage_io"][0]["inputs"][0]["shape"] == [1, 16]  # one sequence per micro-batch
    with pytest.raises(
        EmitError, match="different graph at micro-batch size 1 than at batch size 4"
    ):
        emit(whole, tmp_path / "whole")


def _tokens(logits: Any, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.logits.flatten(0, 1), target.flatten())
