"""Communication and pipeline-runtime costs measured on the live process group.

Every rank of the default group calls :func:`measured_comm` together. Rank 0 looks in the cache
(:class:`autopart.cost_models.comm_fit.CommCache`, keyed by backend, world size and device); on a
miss all ranks measure:

- **point-to-point**: a ping-pong between ranks 0 and 1 (the others wait) at each size in
  ``sizes_bytes``; one-way time = round trip / 2, the fastest of ``repeats`` after a warm-up
  (noise on a shared host only adds time; a fit that still fails is measured once more with
  twice the repeats);
- **collectives**: ``all_reduce``, ``all_gather`` and ``reduce_scatter`` over all ranks at each
  size (the full tensor's bytes, as ``cost_models/comm.py`` counts them), timed on rank 0 between
  barriers; a collective the backend lacks (gloo's ``reduce_scatter``) is left out;
- **the pipeline runtime's cost per action**: a schedule (``Schedule1F1B``) of trivial stages
  (one ``Linear(8, 8)`` per rank) over ``micro_batches`` micro-batches, timed per step; the cost
  per action is the value that makes the simulator (:func:`autopart.planning.schedule.simulate`,
  fed the trivial stages' own forward and backward times and the point-to-point fit) reproduce the
  measured step (:func:`fit_action_overhead_s`, a bisection: the simulated step grows with it).

Each measurement is fitted (:func:`autopart.cost_models.comm_fit.fit_alpha_beta`), rank 0 saves
the fits and broadcasts them, so every rank plans on the same numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autopart.cost_models.comm_fit import (
    COLLECTIVES,
    AlphaBeta,
    CommCache,
    CommFits,
    comm_key,
    fit_alpha_beta,
    measured_device,
)
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError

__all__ = [
    "device_key",
    "fit_action_overhead_s",
    "measure_comm",
    "measured_comm",
    "measured_or_table",
]

_SIZES_BYTES = (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
_TRIVIAL_WIDTH = 8


def device_key(device: torch.device) -> str:
    """The hardware a measurement is valid for: the GPU's name, or ``cpu``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}".replace(" ", "_")
    return "cpu"


def measured_comm(
    device: torch.device, *, cache: CommCache | None = None, remeasure: bool = False
) -> CommFits:
    """The communication fits of the default group on ``device``, from the cache or measured (all
    ranks call this together)."""
    import torch.distributed as dist

    key = comm_key(dist.get_backend(), dist.get_world_size(), device_key(device))
    cache = cache if cache is not None else CommCache()
    hit = [None if remeasure or dist.get_rank() != 0 else cache.get(key)]
    dist.broadcast_object_list(hit, src=0)
    if hit[0] is not None:
        fits: CommFits = hit[0]
        return fits
    fits = measure_comm(device, key=key)
    if dist.get_rank() == 0:
        fresh = CommCache(cache.path)  # another run may have written meanwhile: keep its entries
        fresh.put(fits)
        fresh.save()
    return fits


def measured_or_table(
    spec: DeviceSpec, device: torch.device, *, cache: CommCache | None = None
) -> tuple[DeviceSpec, str]:
    """``spec`` with this group's measured link and per-action costs (:func:`measured_comm`,
    all ranks call it together) and ``"measured"``; where measuring fails (timings that do not
    grow with size on a busy host, twice), ``spec`` as the table has it and
    ``"table (<why>)"``: a run plans on the table rather than stopping, and says so."""
    try:
        return measured_device(spec, measured_comm(device, cache=cache)), "measured"
    except AutopartError as exc:  # every rank gets the same error (rank 0's fit, broadcast)
        return spec, f"table ({exc})"


def measure_comm(
    device: torch.device,
    *,
    key: str,
    sizes_bytes: Sequence[int] = _SIZES_BYTES,
    repeats: int = 11,
    micro_batches: int = 8,
) -> CommFits:
    """Measure and fit on the default group (all ranks call it); rank 0's fits, broadcast. A fit
    that fails (timings that do not grow with size: a busy host) is measured once more with twice
    the repeats before the error reaches the caller."""
    fitted = _measured_fits(device, sizes_bytes, repeats)
    if isinstance(fitted, str):
        fitted = _measured_fits(device, sizes_bytes, 2 * repeats)
    if isinstance(fitted, str):
        raise AutopartError(
            f"measuring this group's communication failed: {fitted} (a busy machine); run "
            "again, or plan on the device table with --comm table"
        )
    link, collectives = fitted
    action_s = _pipeline_action_s(device, link, micro_batches, repeats)
    return CommFits(key, link, collectives, action_s)


def _measured_fits(
    device: torch.device, sizes_bytes: Sequence[int], repeats: int
) -> tuple[AlphaBeta, dict[str, AlphaBeta]] | str:
    """The point-to-point and collective fits of rank 0, broadcast, or (on every rank alike) the
    reason the fit failed."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return _no_link(), {}  # nothing to send, and a collective of one rank does nothing
    p2p = [_p2p_s(n, device, repeats) for n in sizes_bytes]
    collectives: dict[str, list[float]] = {}
    for name in COLLECTIVES:
        times = [_collective_s(name, n, device, repeats) for n in sizes_bytes]
        if all(t is not None for t in times):
            collectives[name] = [float(t) for t in times if t is not None]
    fits: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            link = fit_alpha_beta(sizes_bytes, p2p)
            fits[0] = (link, {k: fit_alpha_beta(sizes_bytes, v) for k, v in collectives.items()})
        except AutopartError as exc:  # every rank gets rank 0's reason, none hangs
            fits[0] = str(exc)
    dist.broadcast_object_list(fits, src=0)
    result: tuple[AlphaBeta, dict[str, AlphaBeta]] | str = fits[0]
    return result


def _no_link() -> AlphaBeta:
    """One rank sends nothing: a link that is free."""
    return AlphaBeta(0.0, float("inf"))


def _timed(
    fn: Callable[[], Any], device: torch.device, repeats: int, *, least: bool = False
) -> float:
    """Wall time of ``fn`` over ``repeats`` runs after two warm-up runs: the median, or with
    ``least`` the fastest (a message's own time: on a shared host noise only adds to it)."""
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return min(times) if least else statistics.median(times)


def _p2p_s(nbytes: int, device: torch.device, repeats: int) -> float:
    """One-way seconds of an ``nbytes`` message between ranks 0 and 1 (half a round trip)."""
    import torch.distributed as dist

    buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    rank = dist.get_rank()

    def ping_pong() -> None:
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    took = _timed(ping_pong, device, repeats, least=True) / 2
    dist.barrier()
    return took


def _collective_s(name: str, nbytes: int, device: torch.device, repeats: int) -> float | None:
    """Seconds of one collective whose full tensor has ``nbytes``, on rank 0 (None where the
    backend does not run it, on every rank alike)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    full = torch.zeros(max(world, nbytes // 4 // world * world), device=device)
    shard = torch.zeros(full.numel() // world, device=device)
    calls: dict[str, Callable[[], Any]] = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: dist.all_gather(list(full.chunk(world)), shard),
        "reduce_scatter": lambda: _reduce_scatter(shard, full),
    }
    try:
        calls[name]()
    except (RuntimeError, ValueError):
        dist.barrier()
        return None

    def once() -> None:
        dist.barrier()
        calls[name]()

    # the barrier is timed too: subtract it, measured alone
    took = _timed(once, device, repeats, least=True) - _timed(
        dist.barrier, device, repeats, least=True
    )
    return max(took, 0.0)


def _reduce_scatter(shard: torch.Tensor, full: torch.Tensor) -> Any:
    import torch.distributed as dist

    # torch 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single
    call = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return call(shard, full)


def _pipeline_action_s(
    device: torch.device, link: AlphaBeta, micro_batches: int, repeats: int
) -> float:
    """The cost per action of ``torch.distributed.pipelining`` (module docstring): a 1F1B step of
    trivial stages, timed, then fitted against the simulator; rank 0's value, broadcast."""
    import torch.distributed as dist

    step_s, forward_s, backward_s = _trivial_pipeline_s(device, micro_batches, repeats)
    fit = [0.0]
    if dist.get_rank() == 0:
        comm_s = link.time_s(_TRIVIAL_WIDTH * 4)  # one float32 row per micro-batch
        world = dist.get_world_size()
        fit[0] = fit_action_overhead_s(step_s, world, micro_batches, forward_s, backward_s, comm_s)
    dist.broadcast_object_list(fit, src=0)
    return fit[0]


def _trivial_pipeline_s(
    device: torch.device, micro_batches: int, repeats: int
) -> tuple[float, float, float]:
    """A 1F1B step of one ``Linear`` per rank (one row per micro-batch), and that stage's own
    forward and backward seconds per micro-batch."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    module = torch.nn.Linear(_TRIVIAL_WIDTH, _TRIVIAL_WIDTH).to(device)
    x = torch.randn(micro_batches, _TRIVIAL_WIDTH, device=device)
    # shapes given, as the runtime gives them: no metadata exchange at the first step
    inputs = torch.empty_like(x[:1]).requires_grad_(rank > 0)
    outputs = torch.empty_like(x[:1]).requires_grad_(True)
    stage = PipelineStage(module, rank, world, device, input_args=inputs, output_args=outputs)
    schedule = Schedule1F1B(stage, micro_batches, loss_fn=torch.nn.functional.mse_loss)

    def step() -> None:
        module.zero_grad()
        dist.barrier()
        args: tuple[Any, ...] = (x,) if rank == 0 else ()
        kwargs: dict[str, Any] = {"target": x} if rank == world - 1 else {}
        schedule.step(*args, **kwargs)
        dist.barrier()

    step_s = _timed(step, device, repeats) - _timed(lambda: dist.barrier(), device, repeats)
    return (step_s, *_trivial_compute_s(module, x[:1], device, repeats))


def _trivial_compute_s(
    module: torch.nn.Module, x: torch.Tensor, device: torch.device, repeats: int
) -> tuple[float, float]:
    """Forward and backward seconds of the trivial stage on one micro-batch, on its own."""
    x = x.clone().requires_grad_(True)
    forward_s = _timed(lambda: module(x), device, repeats * 4)
    total_s = _timed(lambda: module(x).sum().backward(), device, repeats * 4)
    return forward_s, max(total_s - forward_s, 0.0)


def fit_action_overhead_s(
    step_s: float,
    world: int,
    micro_batches: int,
    forward_s: float,
    backward_s: float,
    comm_s: float,
) -> float:
    """The cost per action that makes the simulated 1F1B step of ``world`` equal stages (each
    ``forward_s`` and ``backward_s`` per micro-batch, ``comm_s`` per boundary message) last
    ``step_s``; 0 when the step is no slower than the simulation without it."""
    from autopart.planning.schedule import build_schedule, simulate

    schedule = build_schedule("1f1b", world, micro_batches)

    def simulated(overhead_s: float) -> float:
        return simulate(
            schedule,
            [forward_s] * world,
            [backward_s] * world,
            comm_s=[comm_s] * (world - 1),
            action_overhead_s=overhead_s,
        ).step_time_s

    low, high = 0.0, step_s
    if simulated(low) >= step_s:
        return 0.0
    for _ in range(60):  # the simulated step grows with the overhead: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if simulated(mid) < step_s else (low, mid)
    return (low + high) / 2
