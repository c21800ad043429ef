"""In-place ops and buffers written in training, on spawned gloo ranks against one process: a
plain PyTorch CNN with BatchNorm, a model written with in-place ops (``y += h``, ``relu_``,
``div_``, ``copy_`` into slices, a running mean kept in a buffer), a ``transformers`` ResNet
(BatchNorm, ``hidden += residual``) and ``transformers`` Falcon (``mlp_output +=
attention_output``), on pp=2, dp=2 x pp=2 and tp=2. After two optimizer steps and one inference
call, the loss, the output, every parameter and every buffer of every data-parallel replica equal
the unpartitioned model's (rtol 1e-5) when it runs the same micro-batches in the same order (see
:func:`tests._mesh_cases.reference`: BatchNorm's statistics are those of each micro-batch, not of
the whole batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.planning.plans import parse_mesh
from autopart.runtime.launch import training_batch
from tests._mesh_cases import (
    Case,
    assert_buffers_match,
    assert_trained_like,
    read_buffers,
    reference,
    replica_buffers,
    results,
    sgd_or_adam,
)
from tests.distributed.test_runtime_tp import micro_batches_for as _micro_batches
from tests.models import FAST_LINK

STEPS = 2
FALCON = "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,vocab_size=128"
"""Falcon's default block: attention and MLP in parallel, ``mlp_output += attention_output``."""


def _setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, Any], torch.Tensor, Any]:
    if name == "hf:falcon":
        loaded = load_model(
            name, device="cpu", batch=8, seq=16, config=parse_config_overrides(FALCON), seed=seed
        )
    else:
        loaded = load_model(name, device="cpu", seed=seed)
    model = loaded.model
    model.train()
    if name == "tests.models:hf_resnet":
        labels = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(seed + 1))
        return model, loaded.example_inputs, {}, labels, _classification_loss
    target, loss_fn = training_batch(loaded, seed)
    return model, loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output.logits, labels)


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = _setup(name)
    tp = "tp" in parse_mesh(mesh)
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        schedule=schedule,
        micro_batches=_micro_batches(mesh),
        device=FAST_LINK if tp else None,  # links nearly free: the TP plan really splits
        verify=tp,
    )
    optimizer = sgd_or_adam(list(program.parameters()), opt)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    inference = program(*x, **kw)  # in train mode: updates running statistics as model(x) does
    holders: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(holders, sorted(n for n, _ in program.named_buffers()))
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "buffers": replica_buffers(program, mesh),
        "holders": holders,
        "stages": program.plan.num_stages,
        "sharding": dict(program.plan.tp.sharding) if program.plan.tp is not None else {},
        "inference": getattr(inference, "logits", inference),
    }


CASES = [
    ("tests.models:batchnorm_cnn", "pp=2", "1f1b", "sgd"),
    ("tests.models:inplace_residual", "pp=2", "gpipe", "adam"),
    ("tests.models:hf_resnet", "pp=2", "1f1b", "sgd"),
    ("hf:falcon", "pp=2", "gpipe", "sgd"),
    # two data-parallel replicas of a 2-stage pipeline: each keeps its own running statistics
    ("tests.models:batchnorm_cnn", "dp=2,pp=2", "gpipe", "sgd"),
    ("tests.models:inplace_residual", "dp=2,pp=2", "1f1b", "sgd"),
    ("tests.models:hf_resnet", "dp=2,pp=2", "1f1b", "sgd"),
    # tensor parallelism: nodes that write a tensor in place (or touch it before) run replicated
    ("tests.models:inplace_residual", "tp=2", "gpipe", "sgd"),
    ("hf:falcon", "tp=2", "gpipe", "sgd"),
]


@pytest.fixture(scope="module")
def inplace_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_inplace_program_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        90.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a mesh spawns every case of it
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_inplace_program_matches_the_unpartitioned_model(
    inplace_results: Callable[[Case], dict[str, Any]],
    name: str,
    mesh: str,
    schedule: str,
    opt: str,
) -> None:
    got = inplace_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    sizes = parse_mesh(mesh)
    assert got["stages"] == sizes.get("pp", 1)
    if "tp" in sizes:  # the plan splits matmuls, around the ones that write in place
        assert {"col", "row"} <= set(got["sharding"].values()), got["sharding"]
    model, x, kw, _, _ = _setup(name)
    dp = parse_mesh(mesh).get("dp", 1)
    want = reference(
        _setup, sgd_or_adam, name, opt, dp * _micro_batches(mesh), STEPS, replicas=dp, infer=True
    )
    assert_trained_like(got, want)
    read = read_buffers(model, x, kw)
    if name != "hf:falcon":  # Falcon's only buffer is its rotary table
        assert any("running_mean" in n or "feature_mean" in n for n in read)
    assert_buffers_match(got["buffers"], want.buffers, read)
    torch.testing.assert_close(got["inference"], want.output, rtol=1e-5, atol=1e-5)
    if "running_mean" in " ".join(read) and "tp" not in sizes:  # written on both stages
        assert all(any("running_mean" in n for n in names) for names in got["holders"])
