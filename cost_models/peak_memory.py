"""Measured peak memory of a block of code, counting what the plan's memory model counts.

On CUDA it is the caching allocator's own figure: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (every tensor on the device: parameters, gradients, optimizer state,
activations, communication buffers and the temporaries of each kernel).

On CPU there is no such counter, and the process holds more than the rank's share (every rank
loads the whole model before it keeps its stages). So the peak is counted as the plan counts it:
the bytes the rank holds when the block starts (``held``: its stages' parameters and buffers, the
gradients and optimizer state already allocated; each storage once), plus the highest running
total of the CPU allocator's allocations and frees inside the block, as ``torch.profiler`` records
them with ``profile_memory=True`` (its ``[memory]`` events: every tensor allocation and free, with
its size, in order). That covers activations saved for backward, gradients and optimizer state
created in the block, received tensors and, as on CUDA, kernels' temporaries. The profiler slows
the block down, so :mod:`autopart.runtime.launch` measures memory on the first (warm-up) step,
which its timings leave out.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "held_bytes", "measure_peak", "quiet_stderr"]


@dataclass(slots=True)
class PeakMemory:
    """The result of :func:`measure_peak`, filled in when its block ends."""

    peak_bytes: int = 0
    start_bytes: int = 0
    """Bytes held when the block started (``held`` on CPU, the allocator's count on CUDA)."""


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied or viewed tensor counted once; a
    DTensor, such as an FSDP2 parameter, by the shard this rank holds)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())


@contextmanager
def measure_peak(device: torch.device, held: Iterable[torch.Tensor] = ()) -> Iterator[PeakMemory]:
    """Measure the peak bytes held on ``device`` while the block runs (module docstring); on CPU
    ``held`` are the tensors the rank holds when the block starts."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.start_bytes = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
        return
    from torch.profiler import ProfilerActivity, profile

    result.start_bytes = held_bytes(held)
    # garbage from before the block, collected inside it, would count as the block's frees and
    # lower its running total (seen once in the unit tier under xdist)
    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():  # kineto prints "USDT: ... profiler_start" / "_stop" lines there
        prof.start()
    try:
        yield result
    finally:
        with quiet_stderr():
            prof.stop()
    result.peak_bytes = result.start_bytes + _highest_running_total(prof)


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to the null device while the block runs (what C++ code writes
    there, which Python's own redirection does not catch)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _highest_running_total(prof: torch.profiler.profile) -> int:
    """The highest running sum of the allocations (+) and frees (-) the profiler recorded, in
    the order they happened (0 if nothing was allocated)."""
    # kineto_results keeps every [memory] event with its signed size; prof.events() drops the
    # ones it cannot attribute to an operator
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return 0
    memory = [e for e in results.events() if e.name() == "[memory]"]
    events = sorted((e.start_ns(), int(e.nbytes())) for e in memory)  # type: ignore[attr-defined]
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))
