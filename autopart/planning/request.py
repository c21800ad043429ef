"""What a user asks the planner for, as one frozen value.

:class:`PlanRequest` holds the planning keywords that :func:`autopart.plan`,
:func:`autopart.planning.planner.plan_graph`, :func:`autopart.planning.mesh_search.search_mesh`,
``autopart.compile`` and the CLI share. It checks every field when it is made (before any
tracing or solving), so a bad option is an error that names it. The entry points take a request,
keyword overrides of its fields, or both (:meth:`PlanRequest.with_options`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.passes.routing import DEFAULT_IMBALANCE, check_imbalance
from autopart.planning.plans import format_mesh, parse_mesh
from autopart.planning.schedule import ScheduleKind
from autopart.precision import as_precision

__all__ = ["AUTO", "FORCED_RECOMPUTE", "RECOMPUTE", "PlanRequest"]

AUTO = "auto"
"""The value of ``mesh`` (search the meshes) and ``schedule`` (compare the schedules) that asks
the planner to choose."""

RECOMPUTE = (AUTO, "none", "full", "selective")
"""The values of ``PlanRequest.recompute``."""

FORCED_RECOMPUTE = ("full", "selective")
"""The values that recompute every layer (whole, or its ops that read no weight)."""


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """The planning options of one request."""

    mesh: str = "pp=2"
    """``"dp=2,fsdp=2,pp=2,tp=2"``-style axes (a mapping is accepted and normalised), or ``"auto"``."""
    devices: int | None = None
    """Devices to search with ``mesh="auto"``; with a fixed mesh, a check of its size."""
    device: str | DeviceSpec = "h100"
    """Device name in the device table, or a :class:`DeviceSpec`."""
    memory: int | str | None = None
    """Memory per device (bytes or ``"80GiB"``); the device's capacity when ``None``."""
    micro_batches: int | None = None
    """Micro-batches per replica; chosen by simulation when ``None``."""
    schedule: str = AUTO
    """A :class:`ScheduleKind` value, or ``"auto"`` to compare every kind."""
    stages_per_rank: int | None = None
    """Pipeline stages on each rank (1 for GPipe and 1F1B, 2 for the V-shaped kinds); compared
    over each schedule's counts when ``None``
    (:func:`~autopart.planning.schedule_choice.stage_counts`)."""
    optimizer: str = "adamw"
    time_limit_s: float = 10.0
    """Time limit of each ILP solve, in CP-SAT's deterministic seconds (:mod:`autopart.solver.cpsat`)."""
    name: str | None = None
    """The model's name in the plan (the model's class name when ``None``)."""
    max_blocks: int | None = None
    """Blocks the stage ILP plans on at most (a default that grows with the stage count)."""
    profile: bool = False
    """Plan on measured times: every distinct op signature is run forward and backward on this
    machine (the ``device``'s kind: CPU for ``"cpu"``, else CUDA) at the graph's shapes, cached
    by signature, dtype and device (:func:`autopart.cost_models.profiling.profiled_compute`)."""
    expert_imbalance: float = DEFAULT_IMBALANCE
    """Mixture-of-experts models: each expert is charged this many times its mean share of the
    routed tokens (``T * k / E``; at most ``T``), >= 1 (:mod:`autopart.passes.routing`). The graph
    is annotated with it; planning a graph annotated with another factor is an error."""

    recompute: str = AUTO
    """Activation recomputation: ``"auto"`` (the stage ILP recomputes layers, in full or only
    their ops that read no weight, only where no split fits memory otherwise), ``"none"`` (keep
    every activation), ``"full"`` (every layer that keeps less by recomputing does) or
    ``"selective"`` (every layer recomputes its ops that read no weight, where that keeps less:
    :mod:`autopart.planning.selective`)."""

    precision: str = "model"
    """``"model"`` (every tensor in the model's dtype) or ``"bf16-mixed"`` (float32 masters,
    bfloat16 compute, FSDP2's policy on every mesh; :mod:`autopart.precision`)."""

    reshard_after_forward: bool = False
    """Each layer's FSDP2 unit reshards after its forward (``fully_shard(reshard_after_forward=
    True)``) on meshes with an fsdp axis: under GPipe (the only schedule where that lowers the
    peak, so it must be the one asked for) the forwards hold one layer gathered, not the stage,
    and each micro-batch's forward gathers again (:mod:`autopart.planning.stage_memory`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", as_precision(self.precision).value)
        mesh: Any = self.mesh
        if isinstance(mesh, Mapping):
            object.__setattr__(self, "mesh", format_mesh(parse_mesh(mesh)))
        elif not isinstance(mesh, str):
            raise AutopartError(f"mesh must be a string such as 'pp=2' or 'auto', got {mesh!r}.")
        elif not self.is_auto:
            parse_mesh(mesh)  # a bad spec is an error now
        schedules = (AUTO, *(k.value for k in ScheduleKind))
        if self.schedule not in schedules:
            raise AutopartError(f"unknown schedule {self.schedule!r}; use {', '.join(schedules)}.")
        if self.recompute not in RECOMPUTE:
            raise AutopartError(
                f"unknown recompute {self.recompute!r}; use {', '.join(RECOMPUTE)}."
            )
        self._check_reshard()
        for field in ("devices", "micro_batches", "max_blocks", "stages_per_rank"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise AutopartError(f"{field} must be a whole number >= 1, got {value!r}.")
        object.__setattr__(self, "expert_imbalance", check_imbalance(self.expert_imbalance))
        if not self.time_limit_s > 0:
            raise AutopartError(f"time_limit_s must be > 0 seconds, got {self.time_limit_s!r}.")
        if not self.is_auto and self.devices is not None and self.size != self.devices:
            raise AutopartError(
                f"mesh {self.mesh} uses {self.size} devices, not the {self.devices} given; drop "
                "--devices, or use --mesh auto to search the meshes of that many devices."
            )

    def _check_reshard(self) -> None:
        if not self.reshard_after_forward:
            return
        if self.schedule != ScheduleKind.GPIPE:
            raise AutopartError(
                "resharding after forward lowers memory under GPipe only (under the other "
                "schedules a backward runs between forwards and leaves its layers whole, so the "
                "peak stays and each forward gathers again); add --schedule gpipe or drop "
                "--reshard-after-forward."
            )
        if not self.is_auto and parse_mesh(self.mesh).get("fsdp", 1) <= 1:
            raise AutopartError(
                f"resharding after forward needs an fsdp axis (mesh {self.mesh} shards nothing); "
                "add fsdp=N to the mesh or drop --reshard-after-forward."
            )

    @property
    def is_auto(self) -> bool:
        """Whether the mesh is searched (``mesh="auto"``)."""
        return self.mesh.strip().lower() == AUTO

    @property
    def axes(self) -> dict[str, int]:
        """The fixed mesh's axes, ``dp``, ``fsdp``, ``pp`` and ``tp`` always present (1 when
        absent)."""
        if self.is_auto:
            raise AutopartError("mesh 'auto' has no fixed axes; plan it to get a mesh.")
        return {"dp": 1, "fsdp": 1, "pp": 1, "tp": 1, **parse_mesh(self.mesh)}

    @property
    def size(self) -> int:
        """Devices the fixed mesh uses."""
        return math.prod(self.axes.values())

    def with_options(self, **options: Any) -> PlanRequest:
        """This request with ``options`` (field names) replaced; an unknown name is an error that
        lists the known ones."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise AutopartError(
                f"unknown planning option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(fields)}."
            )
        return dataclasses.replace(self, **options) if options else self

    @classmethod
    def of(cls, request: PlanRequest | None, options: Mapping[str, Any]) -> PlanRequest:
        """``request`` (default: a default request) with ``options`` replaced."""
        return (request or cls()).with_options(**options)
