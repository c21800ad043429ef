"""Measured communication: alpha-beta fits of timed messages, cached on disk, applied to a device.

``autopart.cost_models.comm`` prices a message of ``n`` bytes at ``alpha + n / beta`` with a
datasheet's ``alpha`` and ``beta``. Here the two are fitted to timings taken on a live process
group (:mod:`autopart.runtime.measure` takes them): ordinary least squares of ``time_s`` on
``nbytes`` over a few sizes, the intercept being ``alpha`` and the inverse slope ``beta``
(Hockney 1994, the model ``comm.py`` cites). A fit is kept per operation (point-to-point and each
collective, at the group's size), beside the pipeline runtime's own cost per action, under a key
naming the backend, the world size and the device (:func:`comm_key`), in
``$AUTOPART_CACHE_DIR/comm.json`` (default ``~/.cache/autopart``).

:func:`measured_device` turns a cached entry into the :class:`DeviceSpec` the planner reads: the
link's latency and bandwidth from the point-to-point fit (the message a pipeline boundary sends)
and ``pipeline_action_s`` from the runtime measurement. The collective fits are kept for comparison
with the ring model (``comm.py``), which derives collectives from the one link.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError

__all__ = [
    "COLLECTIVES",
    "AlphaBeta",
    "CommCache",
    "CommFits",
    "cached_device",
    "comm_key",
    "fit_alpha_beta",
    "measured_device",
]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
"""The collectives fitted besides point-to-point, by the name of their ``torch.distributed`` call."""


@dataclass(frozen=True, slots=True)
class AlphaBeta:
    """``time_s(n) = alpha_s + n / beta_bytes_per_s``: latency and bandwidth of one operation."""

    alpha_s: float
    beta_bytes_per_s: float

    def __post_init__(self) -> None:
        if not (self.alpha_s >= 0 and self.beta_bytes_per_s > 0):
            raise ValueError(
                f"AlphaBeta needs alpha_s >= 0 and beta_bytes_per_s > 0, got {self.alpha_s!r} "
                f"and {self.beta_bytes_per_s!r}"
            )

    def time_s(self, nbytes: int) -> float:
        return self.alpha_s + nbytes / self.beta_bytes_per_s


def fit_alpha_beta(sizes_bytes: Sequence[int], times_s: Sequence[float]) -> AlphaBeta:
    """The least-squares line through ``(size, time)``: intercept ``alpha_s`` (clamped at 0: a
    negative latency is noise), inverse slope ``beta_bytes_per_s``. Needs two distinct sizes and
    times that grow with size."""
    if len(sizes_bytes) != len(times_s) or len(set(sizes_bytes)) < 2:
        raise AutopartError(
            f"an alpha-beta fit needs one time per size and at least two distinct sizes, got "
            f"sizes {list(sizes_bytes)} and {len(times_s)} times; time more message sizes"
        )
    n = len(sizes_bytes)
    mean_x, mean_y = sum(sizes_bytes) / n, sum(times_s) / n
    sxx = sum((x - mean_x) ** 2 for x in sizes_bytes)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes_bytes, times_s))
    slope = sxy / sxx
    if slope <= 0:
        raise AutopartError(
            f"the timed messages do not get slower with size (slope {slope:.3g} s/byte over "
            f"{min(sizes_bytes)}..{max(sizes_bytes)} bytes): time larger messages, or more repeats"
        )
    return AlphaBeta(max(0.0, mean_y - slope * mean_x), 1.0 / slope)


@dataclass(frozen=True, slots=True)
class CommFits:
    """What was measured on one process group: the point-to-point fit, one fit per collective
    (at the group's size), and the pipeline runtime's cost per action (seconds)."""

    key: str
    p2p: AlphaBeta
    collectives: Mapping[str, AlphaBeta]
    pipeline_action_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "p2p": dataclasses.asdict(self.p2p),
            "collectives": {k: dataclasses.asdict(v) for k, v in self.collectives.items()},
            "pipeline_action_s": self.pipeline_action_s,
        }

    @classmethod
    def from_json(cls, key: str, raw: Mapping[str, Any]) -> CommFits:
        return cls(
            key,
            AlphaBeta(**raw["p2p"]),
            {k: AlphaBeta(**v) for k, v in raw["collectives"].items()},
            float(raw["pipeline_action_s"]),
        )


def comm_key(backend: str, world: int, device: str) -> str:
    """The cache key of a measurement: ``gloo:world2:<device key>``."""
    return f"{backend}:world{world}:{device}"


class CommCache:
    """Measured communication on disk: ``{key: CommFits.to_json()}`` (:func:`comm_key`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        default = Path(os.environ.get("AUTOPART_CACHE_DIR", Path.home() / ".cache" / "autopart"))
        self.path = Path(path) if path is not None else default / "comm.json"
        self._data: dict[str, Any] = {}
        if self.path.exists():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}  # a corrupt cache is measured again, never trusted

    def get(self, key: str) -> CommFits | None:
        raw = self._data.get(key)
        try:
            return CommFits.from_json(key, raw) if raw is not None else None
        except (KeyError, TypeError, ValueError):
            return None  # an entry of an older layout is measured again

    def measured_keys(self) -> list[str]:
        return sorted(self._data)

    def put(self, fits: CommFits) -> None:
        self._data[fits.key] = fits.to_json()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._data, sort_keys=True, indent=1))
        tmp.replace(self.path)  # atomic: a killed run never leaves half a file


def measured_device(spec: DeviceSpec, fits: CommFits) -> DeviceSpec:
    """``spec`` with the measured link (the point-to-point fit, taken as achieved: efficiency 1)
    and the measured cost per pipeline action; a CPU host's cores are the ones this process may
    run on. Its name stays ``spec``'s (the same hardware)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dataclasses.replace(
        spec,
        shared_cores=float(cores or 1) if spec.shared_cores is not None else None,
        link_latency_s=max(fits.p2p.alpha_s, 1e-9),  # DeviceSpec wants every figure positive
        link_bandwidth_bytes_per_s=fits.p2p.beta_bytes_per_s,
        link_efficiency=1.0,
        pipeline_action_s=max(fits.pipeline_action_s, 1e-9),
        sources=(*spec.sources, f"measured: {fits.key}"),
    )


def cached_device(spec: DeviceSpec, world: int, cache: CommCache | None = None) -> DeviceSpec:
    """``spec`` with the measurement cached for it (:func:`measured_device`): gloo on ``cpu``, NCCL
    on a GPU whose name contains the spec's (``h100`` in ``NVIDIA H100 80GB HBM3``), at ``world``
    ranks. No such entry is an error saying how to make one."""
    cache = cache if cache is not None else CommCache()
    prefix = (
        comm_key("gloo", world, "cpu") if spec.name == "cpu" else comm_key("nccl", world, "cuda:")
    )
    found = [k for k in cache.measured_keys() if k.startswith(prefix) and spec.name in k.lower()]
    fits = cache.get(found[0]) if found else None
    if fits is None:
        have = ", ".join(cache.measured_keys()) or "none"
        raise AutopartError(
            f"no measured communication for {spec.name} at {world} ranks in {cache.path} (it has: "
            f"{have}); run `autopart run MODEL --mesh pp={world}` on such a machine first (it "
            "measures and caches), or plan without --comm-cache"
        )
    return measured_device(spec, fits)
