"""A rank that dies or stops mid-step: the other ranks fail with a clear error in bounded time."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopart.models.model_spec import load_model
from autopart.runtime.launch import training_batch

PG_TIMEOUT_S = 15.0
"""The process group's timeout: how long a live rank waits for a peer that stopped answering."""


def _worker(rank: int, world: int, store: str, how: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    import autopart
    from autopart.errors import AutopartError

    loaded = load_model("mlp", batch=8, device="cpu", seed=0)
    target, loss_fn = training_batch(loaded)
    program = autopart.compile(
        loaded.model,
        f"pp={world}",
        example_inputs=loaded.example_inputs,
        loss_fn=loss_fn,
        micro_batches=4,
        schedule="1f1b",
    )
    program.step(*loaded.example_inputs, target=target)  # one good step first
    if rank == world - 1:
        calls = []

        def die(*_: object) -> None:
            calls.append(1)
            if len(calls) == 2:  # in the middle of the step, after one micro-batch went through
                os.kill(os.getpid(), signal.SIGKILL if how == "dies" else signal.SIGSTOP)

        program._stages[0].register_forward_pre_hook(die)
    start = time.monotonic()
    try:
        program.step(*loaded.example_inputs, target=target)
        message = "no error"
    except AutopartError as err:
        message = str(err)
    Path(out).write_text(f"{time.monotonic() - start:.1f}\n{message}")


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_dead_rank_makes_the_others_fail_in_bounded_time(tmp_path: Path, how: str) -> None:
    out = tmp_path / "rank0.txt"
    ctx = mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "store"), how, str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    # Not ctx.join(): it would stop rank 0 as soon as rank 1 dies; rank 0 must stop by itself.
    rank0, rank1 = ctx.processes
    rank0.join(timeout=180)
    alive = rank0.is_alive()
    for p in ctx.processes:
        if p.is_alive():
            if how == "hangs":
                os.kill(p.pid, signal.SIGCONT)
            p.kill()
    assert not alive, "rank 0 still waits for the rank that died"
    elapsed, message = out.read_text().split("\n", 1)
    print(f"{how}: rank 0 raised after {elapsed} s: {message[:120]}")
    assert float(elapsed) <= PG_TIMEOUT_S + 30
    assert message.startswith(
        "rank 0: step() failed because another rank died or stopped answering"
    )
    del rank1


def _abort_in_a_library(rank: int) -> None:
    if rank == 1:
        os.abort()  # as a C++ library's failed check does (SIGABRT)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_killed_by_a_signal_reports_where_it_was() -> None:
    # the rank's own stderr may be lost (captured elsewhere, or by a finished test's capture):
    # the launcher reports the Python stack that faulthandler wrote when the signal came
    from autopart.errors import AutopartError
    from autopart.runtime.launch import spawn_ranks

    with pytest.raises(AutopartError, match="rank 1 exited") as err:
        spawn_ranks(_abort_in_a_library, (), 2, timeout_s=100, what="two ranks")
    text = str(err.value)
    assert "SIGABRT" in text and "faulthandler" in text
    assert "_abort_in_a_library" in text  # the function it died in, from its stack
