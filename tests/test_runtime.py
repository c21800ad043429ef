"""The runtime on spawned gloo ranks (CPU) against the unpartitioned model: the same loss, and the
same parameters after two optimizer steps."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopart.launch import training_batch
from autopart.model_spec import load_model

STEPS = 2


def _setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Any]:
    if ":" in name:  # a factory: batch and sequence length are its own
        loaded = load_model(name, device="cpu", seed=seed)
    else:
        loaded = load_model(name, device="cpu", batch=8, seq=16, seed=seed)
    model = loaded.model
    model.train()
    x = loaded.example_inputs
    target, loss_fn = training_batch(loaded, seed)
    return model, x, target, loss_fn


def _optimizer(params: Any, kind: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1) if kind == "sgd" else torch.optim.Adam(params, lr=1e-3)


def _micro_batches(world: int, schedule: str) -> int:
    return 4 if schedule == "gpipe" else 2 * world


def _worker(
    rank: int, world: int, store: str, name: str, schedule: str, opt: str, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import autopart.runtime as runtime

        model, x, target, loss_fn = _setup(name)
        program = runtime.compile(
            model,
            f"pp={world}",
            example_inputs=x,
            loss_fn=loss_fn,
            schedule=schedule,
            micro_batches=_micro_batches(world, schedule),
        )
        inference = program(*x)  # before training: the model's own output on every rank
        params = list(program.parameters())
        optimizer = _optimizer(params, opt) if params else None  # a stage may hold no parameters
        losses = []
        for _ in range(STEPS):
            if optimizer is not None:
                optimizer.zero_grad()
            losses.append(program.step(*x, target=target))
            if optimizer is not None:
                optimizer.step()
        state = program.full_state_dict()
        if rank == 0:
            torch.save(
                {
                    "losses": losses,
                    "state": state,
                    "schedule": program.plan.schedule,
                    "inference": inference,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def _reference(
    name: str, opt: str, micro_batches: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unpartitioned model trained the way a pipeline trains: the gradient of the batch's mean
    loss, accumulated over the same micro-batches. (A single full-batch backward sums in a different
    order; Adam's normalisation magnifies that last-bit difference on near-zero gradients.)"""
    model, x, target, loss_fn = _setup(name)
    model = copy.deepcopy(model)
    optimizer = _optimizer(model.parameters(), opt)
    chunks = [torch.chunk(t, micro_batches) for t in (*x, target)]
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        step_losses = []
        for i in range(micro_batches):
            *xs, tgt = (c[i] for c in chunks)
            loss = loss_fn(model(*xs), tgt)
            (loss / micro_batches).backward()
            step_losses.append(float(loss.detach()))
        optimizer.step()
        losses.append(sum(step_losses) / micro_batches)
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def _full_batch_loss(name: str) -> float:
    model, x, target, loss_fn = _setup(name)
    with torch.no_grad():
        return float(loss_fn(model(*x), target))


def _spawn(world: int, args: tuple, timeout_s: float = 240.0) -> None:
    ctx = mp.start_processes(
        _worker, args=(world, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {timeout_s:.0f} s")


@pytest.mark.parametrize(
    ("name", "world", "schedule", "opt"),
    [
        ("mlp", 2, "gpipe", "sgd"),
        ("mlp", 2, "1f1b", "adam"),
        ("gpt2-tiny", 2, "1f1b", "sgd"),  # tied embeddings across the two stages
        ("llama-tiny", 2, "gpipe", "adam"),
        ("mlp", 4, "1f1b", "sgd"),
        ("llama-tiny", 2, "interleaved", "sgd"),  # two stages per rank
        # Long skip connections forwarded through stages. SGD, not Adam: a convolution followed by
        # GroupNorm has gradient components that are exactly zero in exact arithmetic (the norm
        # removes them), and Adam turns their last-bit noise into full-size steps either way.
        ("cnn", 2, "1f1b", "sgd"),
        ("tests.models:two_in_two_out", 2, "gpipe", "sgd"),  # two inputs, two outputs
    ],
)
def test_pipeline_matches_the_unpartitioned_model(
    tmp_path: Path, name: str, world: int, schedule: str, opt: str
) -> None:
    out = tmp_path / "result.pt"
    _spawn(world, (str(tmp_path / "store"), name, schedule, opt, str(out)))
    got = torch.load(out)
    model, x, _, _ = _setup(name)
    with torch.no_grad():
        expected = model(*x)
    torch.testing.assert_close(got["inference"], expected, rtol=1e-5, atol=1e-6)
    want_losses, want_state = _reference(name, opt, _micro_batches(world, schedule))
    assert got["schedule"] == schedule
    assert got["losses"][0] == pytest.approx(
        _full_batch_loss(name), rel=1e-5
    )  # the batch's own loss
    for a, b in zip(got["losses"], want_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    alias = {n: n for n in want_state}
    assert set(got["state"]) <= set(alias)
    for n, t in got["state"].items():
        torch.testing.assert_close(t, want_state[n], rtol=1e-5, atol=1e-6)
    assert set(got["state"]) == set(want_state)  # every parameter, under the model's own name


def test_no_process_group_is_a_clear_error() -> None:
    import autopart.runtime as runtime

    model, x, _, loss_fn = _setup("mlp")
    assert not dist.is_initialized()
    with pytest.raises(runtime.RuntimeSetupError, match="init_process_group"):
        runtime.compile(model, "pp=2", example_inputs=x, loss_fn=loss_fn)


def _errors_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    messages = []
    try:
        import autopart.runtime as runtime
        from autopart.errors import AutopartError

        model, x, _, loss_fn = _setup("mlp")
        for kwargs in (
            {"mesh": "pp=4"},  # more stages than ranks
            {"mesh": "pp=2", "micro_batches": 3},  # 8 samples do not split into 3
            {"mesh": "pp=2", "micro_batches": 1, "schedule": "1f1b"},  # 1F1B needs >= 2
        ):
            try:
                runtime.compile(model, example_inputs=x, loss_fn=loss_fn, **kwargs)  # type: ignore[arg-type]
                messages.append("no error")
            except AutopartError as err:
                messages.append(str(err))
        if rank == 0:
            Path(out).write_text("\n---\n".join(messages))
    finally:
        dist.destroy_process_group()


def test_bad_runtime_requests_are_clear_errors(tmp_path: Path) -> None:
    out = tmp_path / "err.txt"
    mp.start_processes(
        _errors_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn"
    )
    mesh, divisible, one_f_one_b = out.read_text().split("\n---\n")
    assert "needs 4 ranks" in mesh and "has 2" in mesh and "torchrun" in mesh
    assert "does not split into 3" in divisible and "divisor of 8" in divisible
    assert "1f1b" in one_f_one_b and "micro-batch" in one_f_one_b
