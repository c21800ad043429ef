"""bf16 mixed precision (float32 masters, bfloat16 compute: FSDP2's ``MixedPrecisionPolicy`` on
every mesh) on spawned gloo ranks, against one process under the same policy: the unpartitioned
traced graph, computing each micro-batch with a bfloat16 copy of the masters and accumulating its
gradients in float32, as FSDP2 does.

Data parallelism and FSDP run the same bfloat16 operations on the same micro-batches and only sum
float32 gradients in another order, so they must match at rtol 1e-5 like float32 programs.
Splitting the graph changes the order in which bfloat16 sums are rounded: tensor parallelism
rounds each rank's partial matmul sum before the all-reduce, and a pipeline boundary crossed by a
tensor with consumers on both sides adds its gradient's parts in another order (GPT-2's GELU cut
between stages: three bfloat16 terms, added as (a + b) + c instead of (a + c) + b). Those programs
are compared at bfloat16's resolution: the losses within 2**-7, and each parameter's update over
the steps within 2% of the largest update of that parameter (a lost, doubled or misplaced gradient
is off by 50% or more). LLaMA's pipeline cuts happen to round alike and match bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.planning.plans import parse_mesh, replicas
from autopart.runtime.launch import training_batch
from tests._mesh_cases import Case, chunk, one_thread, results
from tests.distributed.test_runtime_tp import _setup as _tp_setup
from tests.distributed.test_runtime_tp import optimizer_for
from tests.models import FAST_LINK, HF_CONFIGS

STEPS = 2
MICRO_BATCHES = 2
"""Per replica."""
BF16 = torch.bfloat16
LLAMA = HF_CONFIGS["hf:llama"].replace("num_hidden_layers=2", "num_hidden_layers=1")
"""One layer (pipelines cut inside it): the cases on 2 cores trace it once or twice each."""
UPDATE_TOLERANCE = 0.02
"""Of the largest update of a parameter, where bfloat16 rounds sums in another order."""

_LLAMA = ("hf:llama", "sgd")
_MESHES: dict[str, tuple[tuple[str, str], ...]] = {
    "pp=2": (_LLAMA, ("mlp", "adam")),
    "dp=2": (_LLAMA,),
    "fsdp=2": (_LLAMA, ("hf:gpt2", "sgd")),  # GPT-2's tied embedding and head in one stage
    "tp=2": (_LLAMA,),
    "fsdp=2,pp=2": (_LLAMA, ("hf:gpt2", "sgd")),  # the tie across the two stages
    "fsdp=2,pp=2,tp=2": (_LLAMA,),
}
CASES: list[Case] = [
    (name, mesh, "1f1b" if "pp" in mesh else "gpipe", opt)
    for mesh, models in _MESHES.items()
    for name, opt in models
]


def _setup(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    """The models of tests/distributed/test_runtime_tp.py, HF LLaMA with one layer."""
    if name != "hf:llama":
        return _tp_setup(name)
    config = parse_config_overrides(LLAMA)
    loaded = load_model(name, device="cpu", batch=8, seq=16, config=config, seed=0)
    target, loss_fn = training_batch(loaded, 0)
    return loaded.model.train(), loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = _setup(name)
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        schedule=schedule,
        micro_batches=MICRO_BATCHES,
        device=FAST_LINK,
        precision="bf16-mixed",
        verify="tp=" in mesh,  # the TP self-check passes at bfloat16's resolution
    )
    before = program.full_state_dict()
    optimizer = optimizer_for(list(program.parameters()), opt)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    dtypes = {str(p.dtype) for p in program.parameters()}
    return {
        "losses": losses,
        "before": before,
        "state": program.full_state_dict(),
        "dtypes": dtypes,
        "precision": program.plan.precision,
    }


def mixed_reference(
    name: str, opt: str, micro_batches: int, *, setup: Any = _setup
) -> dict[str, Any]:
    """One process, FSDP2's policy by hand: the traced graph (as the program traces it, its
    parameters in bfloat16) trains float32 masters; each micro-batch runs a bfloat16 copy of
    them on its bfloat16 inputs, the loss sees float32 outputs, and the bfloat16 gradients are
    summed in float32 (a tied weight's per use: :func:`_untied`). ``setup`` builds the case
    (``name -> (model, inputs, kwargs, target, loss_fn)``)."""
    with one_thread():  # as each rank
        return _mixed_reference(setup(name), opt, micro_batches)


def _mixed_reference(case: Any, opt: str, micro_batches: int) -> dict[str, Any]:
    from autopart.capture.tracing import trace
    from autopart.precision import cast_floating, computing_in

    model, x, kw, target, loss_fn = case
    model = copy.deepcopy(model)
    x, kw = cast_floating(x, BF16), cast_floating(kw, BF16)
    chunks = [chunk(t, micro_batches) for t in (*x, target)]
    kw_chunks = {k: chunk(v, micro_batches) for k, v in kw.items()}
    with computing_in(BF16, model):  # traced at a micro-batch's shapes, as the program runs
        first = {k: v[0] for k, v in kw_chunks.items()}
        masters = trace(model, tuple(c[0] for c in chunks[:-1]), first)
    compute = copy.deepcopy(masters)  # masters: the model's float32 parameters again
    params = dict(masters.named_parameters())
    master_of = dict(masters.named_parameters(remove_duplicate=False))
    copies = _untied(compute)
    optim = optimizer_for(list(params.values()), opt)
    before = {n: p.detach().clone() for n, p in params.items()}
    losses = []
    for _ in range(STEPS):
        optim.zero_grad()
        for p in params.values():
            p.grad = torch.zeros_like(p)
        total = 0.0
        for i in range(micro_batches):
            with torch.no_grad():
                for n, c in copies.items():
                    c.data = master_of[n].to(BF16)
                    c.grad = None
            *xs, tgt = (c[i] for c in chunks)
            out = compute(*xs, **{k: v[i] for k, v in kw_chunks.items()})
            loss = loss_fn(cast_floating(out, torch.float32), tgt)
            (loss / micro_batches).backward()
            total += float(loss.detach())
            for n, c in copies.items():
                if c.grad is not None:
                    master_of[n].grad += c.grad.float()
        optim.step()
        losses.append(total / micro_batches)
    return {
        "losses": losses,
        "before": before,
        "params": {n: p.detach() for n, p in params.items()},
    }


def _untied(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """One parameter per name in ``module`` (a weight tied to two names, GPT-2's embedding and
    head, becomes two): the program's stages hold a copy per use, each with its own bfloat16
    gradient, and sum the copies' float32 gradients (as across pipeline stages)."""
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        prefix, _, leaf = name.rpartition(".")
        own = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        setattr(module.get_submodule(prefix), leaf, own)
        out[name] = own
    return out


@pytest.fixture(scope="module")
def mixed_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_mixed_precision_program_matches_one_process_under_the_policy",
        CASES,
        _run_case,
        120.0,
        by_world=True,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a world size spawns every case of it
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_mixed_precision_program_matches_one_process_under_the_policy(
    mixed_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = mixed_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    assert got["precision"] == "bf16-mixed"
    assert got["dtypes"] == {"torch.float32"}  # the masters the optimizer steps
    sizes = parse_mesh(mesh)
    want = mixed_reference(name, opt, replicas(sizes) * MICRO_BATCHES)
    assert set(want["params"]) <= set(got["state"])
    for n in want["params"]:  # the program starts from the model's own masters
        torch.testing.assert_close(got["before"][n], want["before"][n], rtol=0, atol=0)
    if sizes.get("tp", 1) == 1 and sizes.get("pp", 1) == 1:
        for a, b in zip(got["losses"], want["losses"], strict=True):
            assert a == pytest.approx(b, rel=1e-5)
        for n, p in want["params"].items():
            torch.testing.assert_close(
                got["state"][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
            )
        return
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert a == pytest.approx(b, rel=2**-7)
    for n, p in want["params"].items():
        update, wanted = got["state"][n] - got["before"][n], p - want["before"][n]
        scale = float(wanted.abs().max())
        torch.testing.assert_close(
            update, wanted, rtol=0, atol=UPDATE_TOLERANCE * scale, msg=lambda m, n=n: f"{n}: {m}"
        )
