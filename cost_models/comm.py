"""Communication time: the alpha-beta (Hockney) model with ring collectives.

A message of ``n`` bytes costs ``alpha + n / beta`` (Hockney, "The communication challenge for MPP:
Intel Paragon and Meiko CS-2", Parallel Computing 20(3), 1994), where ``alpha`` is the link latency
and ``beta`` the achievable bandwidth per direction (``link_bandwidth_bytes_per_s *
link_efficiency`` within a node, the network's figures across nodes). With ``inter_node=True`` every
step is charged at the network's rate: a ring moves in lockstep, so its slowest hop sets its pace.

Ring collectives over ``p`` ranks on a tensor of ``n`` bytes (the *full*, unsharded size), as
analysed by Thakur, Rabenseifner & Gropp, "Optimization of collective communication operations in
MPICH", IJHPCA 19(1), 2005, and shown bandwidth-optimal by Patarasuk & Yuan, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009::

    reduce-scatter, all-gather:  (p - 1) * alpha + (p - 1) / p * n / beta
    all-reduce (= both):        2(p - 1) * alpha + 2(p - 1) / p * n / beta
    all-to-all (pairwise):       (p - 1) * alpha + (p - 1) / p * n / beta   (n: one rank's buffer)

One rank, or nothing to send, costs nothing. Reduction arithmetic is ignored: it is memory-bound
work that NCCL overlaps with the transfers.
"""

from __future__ import annotations

from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError

__all__ = [
    "all_gather_time_s",
    "all_reduce_time_s",
    "all_to_all_time_s",
    "p2p_time_s",
    "reduce_scatter_time_s",
    "ring_latency_s",
]


def p2p_time_s(nbytes: int, device: DeviceSpec, *, inter_node: bool = False) -> float:
    """Seconds to send ``nbytes`` from one device to another (a pipeline stage boundary)."""
    _check(nbytes, 2)
    if nbytes == 0:
        return 0.0
    alpha_s, beta = _alpha_beta(device, inter_node)
    return alpha_s + nbytes / beta


def all_reduce_time_s(
    nbytes: int, world: int, device: DeviceSpec, *, inter_node: bool = False
) -> float:
    """Seconds of a ring all-reduce of an ``nbytes`` tensor over ``world`` ranks."""
    return 2 * _ring_s(nbytes, world, device, inter_node)


def all_gather_time_s(
    nbytes: int, world: int, device: DeviceSpec, *, inter_node: bool = False
) -> float:
    """Seconds of a ring all-gather whose gathered (full) tensor has ``nbytes``."""
    return _ring_s(nbytes, world, device, inter_node)


def reduce_scatter_time_s(
    nbytes: int, world: int, device: DeviceSpec, *, inter_node: bool = False
) -> float:
    """Seconds of a ring reduce-scatter of an ``nbytes`` (full, unsharded) tensor."""
    return _ring_s(nbytes, world, device, inter_node)


def all_to_all_time_s(
    nbytes: int, world: int, device: DeviceSpec, *, inter_node: bool = False
) -> float:
    """Seconds of a pairwise all-to-all where every rank holds ``nbytes`` before and after
    (resharding a tensor from one dimension to another)."""
    return _ring_s(nbytes, world, device, inter_node)


def ring_latency_s(world: int, device: DeviceSpec, *, inter_node: bool = False) -> float:
    """The start-up part of a ring collective's seconds (its ``p - 1`` steps' latency), which
    :func:`all_gather_time_s` and :func:`reduce_scatter_time_s` include whatever the size."""
    _check(0, world)
    if world == 1:
        return 0.0
    return (world - 1) * _alpha_beta(device, inter_node)[0]


def _ring_s(nbytes: int, world: int, device: DeviceSpec, inter_node: bool) -> float:
    """``(p - 1)`` steps, each moving ``n / p`` bytes: one reduce-scatter or all-gather."""
    _check(nbytes, world)
    if world == 1 or nbytes == 0:
        return 0.0
    alpha_s, beta = _alpha_beta(device, inter_node)
    return (world - 1) * alpha_s + (world - 1) / world * nbytes / beta


def _alpha_beta(device: DeviceSpec, inter_node: bool) -> tuple[float, float]:
    """(latency in s, achievable bandwidth in bytes/s) of the link the collective runs on."""
    if inter_node:
        return (
            device.network_latency_s,
            device.network_bandwidth_bytes_per_s * device.network_efficiency,
        )
    return device.link_latency_s, device.link_bandwidth_bytes_per_s * device.link_efficiency


def _check(nbytes: int, world: int) -> None:
    if nbytes < 0:
        raise AutopartError(
            f"cannot communicate a negative number of bytes ({nbytes}); pass the tensor's size "
            "in bytes (numel * element_size)"
        )
    if world < 1:
        raise AutopartError(
            f"a collective needs at least one rank, got world={world}; pass the size of the "
            "mesh dimension it runs over"
        )
