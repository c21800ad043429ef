"""Every schedule torch runs beyond GPipe and 1F1B (interleaved 1F1B at more stages per rank,
interleaved zero bubble, ZBV, DualPipeV) on spawned gloo ranks against the unpartitioned model: the
same losses, and every parameter after two optimizer steps. The zero-bubble kinds split each
backward into input and weight gradients, which torch's PipelineStage does on autopart's fx stages
through autograd; the V-shaped ones put the first and the last stage on rank 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.planning.plans import parse_mesh
from autopart.planning.schedule import stage_ranks
from autopart.runtime.launch import training_batch
from tests._mesh_cases import Case, assert_trained_like, reference, results
from tests.models import FAST_LINK, HF_CONFIGS

STEPS = 2


def _batch(name: str, mesh: str) -> int:
    """Two samples per micro-batch (HF LLaMA traces to another graph at one sample)."""
    return 2 * _micro_batches(mesh)


def _micro_batches(mesh: str) -> int:
    """As many as stages (DualPipeV's least): 4 on 2 pipeline ranks, 8 on 4."""
    return 2 * parse_mesh(mesh)["pp"]


def _setup(
    name: str, batch: int
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    config = parse_config_overrides(HF_CONFIGS[name]) if name in HF_CONFIGS else None
    loaded = load_model(name, device="cpu", batch=batch, seq=16, config=config, seed=0)
    target, loss_fn = training_batch(loaded, 0)
    return loaded.model, loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _kind(schedule: str) -> tuple[str, int]:
    """``"interleaved-zb/1"`` -> (``"interleaved-zb"``, 1 stage per rank)."""
    kind, _, per_rank = schedule.partition("/")
    return kind, int(per_rank or 2)


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime

    kind, per_rank = _kind(schedule)
    model, x, kw, target, loss_fn = _setup(name, _batch(name, mesh))
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        schedule=kind,
        stages_per_rank=per_rank,
        micro_batches=_micro_batches(mesh),
        device=FAST_LINK if "tp" in mesh else None,  # a TP plan that splits the tiny model
    )
    params = list(program.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1) if params else None  # a rank may hold none
    losses = []
    for _ in range(STEPS):
        if optimizer is not None:
            optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        if optimizer is not None:
            optimizer.step()
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "schedule": program.plan.schedule,
        "ranks": [s.device for s in program.plan.stages],
        "local": [s.index for s in program.local_stages],
        "tp_split": program.plan.tp is not None and "col" in program.plan.tp.sharding.values(),
    }


CASES = [
    (name, mesh, schedule, "sgd")
    for mesh in ("pp=2", "pp=4")
    for name in ("mlp", "hf:llama")
    for schedule in ("interleaved-zb", "zbv", "dualpipev")
] + [
    ("mlp", "pp=2", "interleaved-zb/1", "sgd"),  # zero bubble at one stage per rank
    ("mlp", "pp=2", "interleaved/3", "sgd"),  # interleaved 1F1B at three stages per rank
    # stages whose outputs autograd also saves (a ReLU's result), which torch detaches in place
    ("cnn", "pp=2", "interleaved-zb/4", "sgd"),
    # tensor parallelism inside the stages: the split backward runs the TP collectives' autograd
    ("hf:llama", "pp=2,tp=2", "interleaved-zb", "sgd"),
]


@pytest.fixture(scope="module")
def schedule_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_schedule_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        60.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a mesh spawns every case of it
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_schedule_matches_the_unpartitioned_model(
    schedule_results: Callable[[Case], dict[str, Any]],
    name: str,
    mesh: str,
    schedule: str,
    opt: str,
) -> None:
    got = schedule_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    kind, per_rank = _kind(schedule)
    p = parse_mesh(mesh)["pp"]
    assert got["schedule"] == kind
    assert got["ranks"] == list(stage_ranks(kind, p, per_rank))  # the map torch's class builds
    assert got["local"] == [s for s, r in enumerate(got["ranks"]) if r == 0]  # rank 0's stages
    assert got["tp_split"] == ("tp" in mesh)

    def setup(n: str) -> Any:
        return _setup(n, _batch(n, mesh))

    def sgd(params: Any, _: str) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1)

    # every parameter and persistent buffer, under the model's own names, in its order
    assert_trained_like(got, reference(setup, sgd, name, opt, _micro_batches(mesh), STEPS))
