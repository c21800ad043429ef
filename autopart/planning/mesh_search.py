"""Joint mesh search (``--mesh auto --devices N``): the ``dp x fsdp x pp x tp`` mesh, schedule
and micro-batch count of ``N`` devices with the fastest predicted training step that fits memory.

Candidates:
  tp    a power of two up to ``min(8, N)`` dividing ``N``: TP's collectives run in every layer, so a
        TP group stays inside one node's NVLink domain (:data:`~autopart.planning.planner.GPUS_PER_NODE`);
  pp    a divisor of ``N / tp``, at most the number of repeated layers (a stage holds at least one
        layer; a graph without repeated layers: at most its computing nodes);
  fsdp  of the ``R = N / (tp pp)`` replicas, 1 (DDP), all ``R`` (every replica shards its state)
        and, between them, the most that stay in one node (HSDP: sharded within a node,
        replicated across nodes); sharding's communication moves the bytes DDP's all-reduce
        does, so these three are where its memory and link speed change;
  dp    ``R / fsdp``; ``dp x fsdp`` must divide the batch.

Per TP degree the TP ILP is solved once, on the whole graph, at the smallest micro-batch any
candidate of that degree could run (where collective latency weighs most), and turned into
TP-adjusted node costs (:mod:`autopart.solver.tp_costs`); only where that fastest sharding cannot
fit a mesh is it solved again within ``pp`` times the memory limit (what ``plan_graph`` does too).
Meshes are taken in order of a lower bound on their step time, and, cheapest first:

1. memory bound: a device holds at least ``1 / pp`` of the TP-sharded parameter, gradient and
   optimizer state plus ``1 / pp`` of one sample's activations (before the TP solve: the state
   divided by ``tp``, which sharding can only beat). Then the split bound
   (:mod:`autopart.solver.pipeline_memory`): the leanest *fractional* split of the state and
   activations each node owns over the pipeline ranks, weighted by the schedule's in-flight counts
   (1F1B's first rank holds ``pp`` micro-batches), a valid lower bound on every split the stage
   ILP or the simulation could take; before the TP solve with every size divided by ``tp``, after
   it on the TP-adjusted graph (and on the memory-lean TP plan too before a mesh is dropped). A
   mesh above the limit is out, without an estimate or a stage solve.
2. step bound: ``_pipeline_bound_s`` of the mesh's compute (before the TP solve: divided by tp)
   plus the dp all-reduce of ``1 / pp`` of the parameters; a mesh whose bound is above the best
   estimate so far cannot win and is not solved further (nor is its TP degree, if no other mesh
   needs it).
3. estimate: the chain-DP split (the best contiguous split of a coarse block graph, the stage
   ILP's own hint) simulated under every schedule and micro-batch count, plus the dp gradient
   all-reduce; the fastest that fits memory. On the zoo the stage ILP's plan equals the chain DP's
   bottleneck in almost every case (``benchmarks/results/*-solver.md``), so the estimate ranks
   meshes as the full plans do.
4. full plan: :func:`autopart.planning.planner.plan_mesh` (stage ILP, baselines, lower bound, simulation)
   for the best estimates, up to ``full_plans`` within ``slack`` of the best that fits (a split
   that misses memory may fit once the stage ILP minds memory), side by side on a thread each up
   to the process's cores (CP-SAT releases the GIL while it solves; each solve stays
   single-threaded and limited in deterministic time, so the plans are those of planning one
   after the other), and for further ones in order while none fits, for at most
   ``6 x time_limit_s`` (the meshes left are reported as unsettled, with ``--time-limit`` as the
   fix).

The fastest full plan wins; ties go to fewer pipeline stages, then the smaller TP degree. Every
candidate is recorded (:class:`MeshCandidate`) with its predicted step time or why it was dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from autopart._compat import StrEnum
from autopart.errors import AutopartError
from autopart.passes.routing import costed_experts
from autopart.planning.blocks import BlockGraph
from autopart.planning.graph import OpGraph, coarsen
from autopart.planning.mesh_plan import (
    GPUS_PER_NODE,
    MEMORY_ERRORS,
    PlanningSetup,
    TPCostsOf,
    micro_batch_options,
    most_stages,
    op_graph_of,
    per_micro_batch,
    pipeline_device,
    plan_mesh,
    planning_setup,
    schedule_layouts,
    solve_tp_costs,
)
from autopart.planning.plans import Plan, format_mesh, replica_label, replicas
from autopart.planning.request import AUTO, FORCED_RECOMPUTE, PlanRequest
from autopart.planning.schedule import SPLIT_BACKWARD, stage_ranks
from autopart.planning.schedule_choice import ONE_STAGE_KINDS, per_device, split_backward_with_dp
from autopart.planning.selective import layer_units, recompute_layers
from autopart.solver import baselines
from autopart.solver.pipeline_memory import NodeMemory, pipeline_memory_bound
from autopart.solver.stage_ilp import InfeasibleMemoryError
from autopart.solver.tp_ilp import InfeasibleTPMemoryError
from autopart.units import format_bytes, format_bytes_up, format_seconds

__all__ = [
    "InfeasibleMeshError",
    "MeshCandidate",
    "MeshSearch",
    "MeshStatus",
    "mesh_candidates",
    "search_mesh",
]

_TP_DEGREES = (1, 2, 4, 8)
_COARSE_BLOCKS_PER_RANK = 16
"""Blocks per pipeline rank of the graph the estimates split (several stages per rank each)."""
_FALLBACK_BUDGET = 6
"""Times the solver's time limit that planning meshes in full may take while none fits."""


class InfeasibleMeshError(AutopartError):
    """No mesh of the given devices fits the memory limit."""

    def __init__(self, message: str, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class MeshStatus(StrEnum):
    """What the search made of one mesh (module docstring); ``PENDING`` while it is still open."""

    PENDING = ""
    CHOSEN = "chosen"
    PLANNED = "planned"
    ESTIMATED = "estimated"
    BOUNDED = "bounded"
    NO_FIT = "no fit"
    OVER_MEMORY = "over memory"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class MeshCandidate:
    """One mesh the search considered."""

    mesh: Mapping[str, int]
    """``{"dp": ..., "pp": ..., "tp": ...}``."""
    status: MeshStatus
    """``"chosen"``; ``"planned"`` (a full plan that fits, slower); ``"estimated"`` (its estimate
    was too far behind to plan in full); ``"bounded"`` (a lower bound on its step time is above the
    best estimate: it cannot win); ``"no fit"`` (planned in full, nothing fits memory); ``"over
    memory"`` (its memory bound exceeds the limit); ``"skipped"`` (not a valid mesh here)."""
    step_time_s: float | None = None
    """Predicted step time of the full plan."""
    step_bound_s: float | None = None
    """A lower bound on its step time (see ``_pipeline_bound_s``)."""
    estimate_s: float | None = None
    """Step time of the chain-DP estimate (the fastest that fits memory, else the fastest)."""
    memory_bytes: int | None = None
    """Peak memory per device: of the full plan, else of the estimate, else the lower bound."""
    schedule: str = ""
    micro_batches: int = 0
    note: str = ""
    """Why it was dropped, or what it needs."""

    @property
    def label(self) -> str:
        return format_mesh(self.mesh)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mesh"] = dict(self.mesh)
        return d


@dataclass(frozen=True, slots=True)
class MeshSearch:
    """The chosen plan, every candidate mesh, and why the plan won."""

    plan: Plan
    devices: int
    candidates: tuple[MeshCandidate, ...]
    """Chosen first, then by predicted (or estimated) step time."""
    reason: str
    tp_solve_s: Mapping[str, float]
    """Seconds of each TP solve (``"tp=8"``: the fastest plan of that degree, solved once;
    ``"tp=8 within 160 GiB"``: one sharded to fit, where the fastest could not)."""
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``"mesh_search"`` object the CLI prints beside the plan."""
        return {
            "devices": self.devices,
            "chosen": dict(self.plan.mesh),
            "reason": self.reason,
            "tp_solve_s": dict(self.tp_solve_s),
            "elapsed_s": self.elapsed_s,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def mesh_candidates(devices: int, *, max_pp: int | None = None) -> list[dict[str, int]]:
    """Every ``{"dp", "pp", "tp"}`` of ``devices`` devices with ``tp`` a power of two up to
    ``min(8, devices)`` and ``pp <= max_pp``, ordered by tp, then pp (dp is what is left), and
    beside each the same mesh with its replicas sharding the state (``"fsdp"``, the module
    docstring's sizes; the key is present only where it is above 1)."""
    if not isinstance(devices, int) or devices < 1:
        raise AutopartError(f"devices must be a positive integer, got {devices!r}")
    out = []
    for tp in _TP_DEGREES:
        if tp > min(GPUS_PER_NODE, devices) or devices % tp:
            continue
        rest = devices // tp
        for pp in range(1, rest + 1):
            if rest % pp == 0 and (max_pp is None or pp <= max_pp):
                for fsdp in _fsdp_sizes(rest // pp, pp * tp):
                    dp = {"dp": rest // (pp * fsdp)}
                    out.append(
                        {**dp, "fsdp": fsdp, "pp": pp, "tp": tp}
                        if fsdp > 1
                        else {**dp, "pp": pp, "tp": tp}
                    )
    return out


def _fsdp_sizes(replicas: int, per_replica: int) -> list[int]:
    """The fsdp sizes tried for ``replicas`` replicas of ``per_replica`` devices each: 1, the
    most that stay in a node, and all of them."""
    in_node = math.gcd(replicas, max(1, GPUS_PER_NODE // per_replica))
    return sorted({1, in_node, replicas})


@dataclass(slots=True)
class _Mesh:
    """A candidate while the search runs."""

    dp: int
    pp: int
    tp: int
    fsdp: int = 1
    status: MeshStatus = MeshStatus.PENDING
    options: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    memory_bound: int = 0
    step_bound_s: float = 0.0
    estimate_s: float | None = None
    estimate_fits: bool = False
    estimate_peak: int | None = None
    estimate_kind: tuple[str, int] = ("", 0)
    plan: Plan | None = None
    minimum_bytes: int | None = None
    note: str = ""
    unsettled: bool = False
    """Planned in full, it failed for a reason other than memory (the solver's time limit)."""
    tp_key: tuple[int, int | None] = (1, None)
    """Which TP plan it runs (see ``_TPKey``)."""

    @property
    def mesh(self) -> dict[str, int]:
        fsdp = {"fsdp": self.fsdp} if self.fsdp > 1 else {}
        return {"dp": self.dp, **fsdp, "pp": self.pp, "tp": self.tp}

    @property
    def replicas(self) -> int:
        """Data-parallel replicas, each pipelining its share of the batch: ``dp x fsdp``."""
        return replicas(self.mesh)


def search_mesh(
    gm: torch.fx.GraphModule,
    request: PlanRequest | None = None,
    *,
    batch: int,
    progress: Callable[[str], None] | None = None,
    full_plans: int = 3,
    slack: float = 0.10,
    **options: Any,
) -> MeshSearch:
    """Search the meshes of ``request.devices`` devices for ``gm`` (traced at the global ``batch``
    and annotated); see the module docstring. ``options`` replace fields of ``request``. Raises
    :class:`InfeasibleMeshError` (with the least memory any mesh needs) when none fits."""
    req = PlanRequest.of(request, {"mesh": AUTO, **options})
    if req.devices is None:
        raise AutopartError(
            "mesh 'auto' needs the number of devices to search: pass --devices N (devices=N)."
        )
    start = time.perf_counter()
    experts = costed_experts(gm, req.expert_imbalance)  # a mismatched graph fails before solving
    search = _Search(gm, planning_setup(req), batch, progress or (lambda _msg: None))
    search.bound_all()
    best_estimate = search.estimate_all()
    search.plan_ranked(best_estimate, full_plans, slack)
    search.plan_bounded()
    fitting = [c for c in search.meshes if c.plan is not None]
    if not fitting:
        raise _infeasible(search.meshes, req.devices, search.setup)
    best = min(fitting, key=lambda c: (_plan_of(c).step_time_s, c.pp, c.tp, c.fsdp, c.dp))
    best.status = MeshStatus.CHOSEN
    return MeshSearch(
        # every axis, sizes 1 too
        plan=dataclasses.replace(
            _plan_of(best), mesh=best.mesh, profile_s=search.profile_s, experts=experts
        ),
        devices=req.devices,
        candidates=tuple(_record(c) for c in sorted(search.meshes, key=_table_order)),
        reason=_reason(best, search.meshes, search.setup),
        tp_solve_s=search.tp_solve_s,
        elapsed_s=time.perf_counter() - start,
    )


_TPKey = tuple[int, int | None]
"""Which TP plan a mesh runs: (degree, memory limit of the TP solve or None for the fastest)."""


class _Search:
    """The state of one mesh search: the candidates and what is solved once and shared (TP plans
    per key, their totals and coarse block graphs, what each node owns)."""

    def __init__(
        self, gm: torch.fx.GraphModule, setup: PlanningSetup, batch: int, say: Callable[[str], None]
    ) -> None:
        assert setup.request.devices is not None
        self.gm, self.setup, self.batch, self.say = gm, setup, batch, say
        self.og, self.profile_s = op_graph_of(gm, setup, say)
        og = self.og
        layers = len({n.layer for n in og.nodes.values() if n.layer is not None})
        self.max_pp = max_pp = most_stages(og)
        self.meshes = [
            _Mesh(m["dp"], m["pp"], m["tp"], m.get("fsdp", 1))
            for m in mesh_candidates(setup.request.devices)
        ]
        for c in self.meshes:
            _check_mesh(c, batch, setup, max_pp, layers)
        self.plain = _Totals.of(og, batch, setup)
        self.costs: dict[_TPKey, TPCostsOf | None] = {}
        self.totals: dict[_TPKey, _Totals] = {(1, None): self.plain}
        self.tp_solve_s: dict[str, float] = {}
        self.coarse: dict[_TPKey, BlockGraph] = {}
        self.per_replica: dict[tuple[_TPKey, int], BlockGraph] = {}
        self.tp_minimum: dict[_TPKey, int] = {}
        self.owned_tp: dict[_TPKey, NodeMemory] = {}

    def bound_all(self) -> None:
        """Step 1 before any TP solve: sharding at best divides the state and the compute by tp,
        and every TP rank holds at least 1/tp of each parameter and saved value."""
        for c in _alive(self.meshes):
            _bound(c, self.plain, self.setup, shard=c.tp)
        degrees = {c.tp for c in self.meshes}
        owned = {tp: NodeMemory.of(self.og, self.setup.state_per_byte, shard=tp) for tp in degrees}
        for c in _alive(self.meshes):
            mine = _sharded(owned[c.tp], c, self.setup)
            _split_bound(c, mine, self.batch, self.setup, before_tp=c.tp > 1)

    def estimate_all(self) -> float | None:
        """Steps 2 and 3: estimate the meshes in order of their step bound, skipping those whose
        bound the best estimate so far beats; the best estimate that fits."""
        best: float | None = None
        for c in sorted(_alive(self.meshes), key=lambda c: (c.step_bound_s, c.pp, c.tp)):
            if _beaten(c, best):
                continue
            if c.tp > 1:
                self.shard(c)
                if c.status or _beaten(c, best):
                    continue
            self.say(f"estimating {format_mesh(c.mesh)}")
            _estimate(c, self.replica_coarse(c), self.setup, self.max_pp)
            if c.estimate_fits and c.estimate_s is not None:
                best = min(best or c.estimate_s, c.estimate_s)
        return best

    def plan_ranked(self, best_estimate: float | None, full_plans: int, slack: float) -> None:
        """Step 4: plan in full the best estimates (a split that misses memory may still fit once
        the stage ILP minds memory): the best and those within ``slack`` of the best that fits,
        ``full_plans`` at most, side by side (:meth:`plan_together`); then, while nothing fits,
        the rest in order, within the fallback budget."""
        ranked = sorted(
            (c for c in self.meshes if c.estimate_s is not None and not c.status),
            key=lambda c: (c.estimate_s, c.pp, c.tp),
        )
        first = [
            c
            for i, c in enumerate(ranked)
            if i == 0 or _close(c, best_estimate, slack)  # the first is planned whatever it is
        ][:full_plans]
        self.plan_together(first)
        planned, done = len(first), {id(c) for c in first}
        # A safety net: while nothing fits, planning the rest in full stops after this long (the
        # memory bound above rejects what cannot fit; this bounds what it cannot settle).
        budget_s = _FALLBACK_BUDGET * self.setup.request.time_limit_s
        loop_start = time.perf_counter()
        for c in ranked:
            assert c.estimate_s is not None
            if id(c) in done:
                continue
            found = any(m.plan is not None for m in self.meshes)
            if not found and planned and time.perf_counter() - loop_start > budget_s:
                c.status, c.unsettled = MeshStatus.NO_FIT, True
                c.note = (
                    f"not planned: the search's {budget_s:g} s for planning meshes in full "
                    f"({_FALLBACK_BUDGET} x --time-limit) ran out"
                )
                continue
            if found and not (_close(c, best_estimate, slack) and planned < full_plans):
                c.status, c.note = MeshStatus.ESTIMATED, _not_planned(c, best_estimate)
                continue
            planned += 1
            self.plan_full(c)

    def plan_together(self, meshes: Sequence[_Mesh]) -> None:
        """:meth:`plan_full` for each of ``meshes`` at once, on up to one thread per core: a
        mesh's plan depends on no other's (the caches they share hold values, computed alike by
        whichever thread comes first), and CP-SAT releases the GIL while it solves, so the stage
        ILPs run side by side. Each solve stays single-threaded and limited in deterministic
        time, so the plans are those of planning one mesh after the other."""
        workers = min(len(meshes), _cores())
        if workers <= 1:
            for c in meshes:
                self.plan_full(c)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autopart-plan") as pool:
            for _ in pool.map(self.plan_full, meshes):  # re-raises a thread's unexpected error
                pass

    def plan_bounded(self) -> None:
        """A mesh was dropped when its bound passed the best *estimate*; should the best full plan
        be slower than that estimate, the meshes whose bound it passes are planned after all."""
        fitting = [c for c in self.meshes if c.plan is not None]
        best_s = min((_plan_of(c).step_time_s for c in fitting), default=math.inf)
        for c in self.meshes:
            if c.status != MeshStatus.BOUNDED or c.step_bound_s >= best_s:
                continue
            c.status, c.note = MeshStatus.PENDING, ""
            if c.tp > 1:
                self.shard(c)
            if not c.status:
                self.plan_full(c)

    def tp_costs_of(self, key: _TPKey) -> TPCostsOf | None:
        """The TP plan of a degree (the fastest, or within a memory limit; ``None`` where no
        plan fits that limit), solved once, at the smallest micro-batch any mesh of the degree
        could run."""
        if key in self.costs:
            return self.costs[key]
        degree, limit = key
        of_degree = [c for c in self.meshes if c.tp == degree and c.options]
        m_tp = max(c.replicas * max(n[0] for n in c.options.values()) for c in of_degree)
        label = f"tp={degree}" + (f" within {format_bytes(limit)}" if limit else "")
        self.say(f"solving tensor parallelism, {label}")
        t0 = time.perf_counter()
        found: TPCostsOf | None = None
        try:
            found = solve_tp_costs(
                self.gm, self.og, degree, self.setup, micro_batches=m_tp, memory=limit
            )
            self.totals[key] = _Totals.of(found.costs.op_graph, self.batch, self.setup)
        except InfeasibleTPMemoryError as exc:
            self.tp_minimum[key] = exc.minimum_bytes
        self.costs[key] = found
        self.tp_solve_s[label] = time.perf_counter() - t0
        return found

    def owned_of(self, key: _TPKey) -> NodeMemory:
        """What each node of the mesh's TP-adjusted graph owns (for the split bound)."""
        if key not in self.owned_tp:
            found = self.costs[key]
            assert found is not None
            self.owned_tp[key] = NodeMemory.of(found.costs.op_graph, self.setup.state_per_byte)
        return self.owned_tp[key]

    def coarse_of(self, c: _Mesh) -> BlockGraph:
        """The coarse block graph the estimates of ``c``'s TP plan run on."""
        if c.tp_key not in self.coarse:
            most = max(m.pp for m in self.meshes if m.tp == c.tp and m.options)
            graph = self.og if c.tp == 1 else _tp_of(self.costs, c).costs.op_graph
            coarse = coarsen(graph, max_blocks=max(64, _COARSE_BLOCKS_PER_RANK * most))
            if self.setup.request.recompute == "selective":  # the units it recomputes
                coarse = layer_units(coarse)
            self.coarse[c.tp_key] = _drop_op_graph(coarse)
        return self.coarse[c.tp_key]

    def replica_coarse(self, c: _Mesh) -> BlockGraph:
        """:meth:`coarse_of` at one replica's share of the batch: one graph for the meshes of a TP
        plan and replica count (``dp=256`` and ``fsdp=256`` estimate on the same), so what is
        derived from it per micro-batch count is derived once."""
        key = (c.tp_key, c.replicas)
        if key not in self.per_replica:
            coarse = self.coarse_of(c)
            self.per_replica[key] = coarse.scaled(1.0 / c.replicas) if c.replicas > 1 else coarse
        return self.per_replica[key]

    def bound_tp(self, c: _Mesh, key: _TPKey) -> None:
        """Step 1 on the mesh's TP-adjusted graph under the TP plan ``key``."""
        c.status, c.note, c.tp_key = MeshStatus.PENDING, "", key
        _bound(c, self.totals[key], self.setup, shard=1)
        if not c.status:
            _split_bound(c, _sharded(self.owned_of(key), c, self.setup), self.batch, self.setup)

    def shard(self, c: _Mesh) -> None:
        """Give a TP mesh its TP plan: the fastest, or, where that cannot fit, one sharded so a
        rank holds at most pp devices' worth of the whole graph."""
        fastest = self.tp_costs_of((c.tp, None))
        assert fastest is not None
        self.bound_tp(c, (c.tp, None))
        if c.status != MeshStatus.OVER_MEMORY:
            return
        lean_key = (c.tp, self.setup.limit * c.pp)
        lean = self.tp_costs_of(lean_key)
        if lean is None:
            least = self.tp_minimum[lean_key]
            state = self.plain.state_bytes * _state_ratio(c, self.setup)
            any_sharding = (state / c.tp + _sample_bytes(self.plain, self.setup)) / c.pp
            c.memory_bound = int(max(c.memory_bound, any_sharding, least / c.pp))
            c.note = (
                f"no sharding over {c.tp} ranks fits: the leanest holds {format_bytes(least)} of "
                f"the whole model per rank, more than pp x the limit"
            )
        elif dict(lean.plan.placements) != dict(fastest.plan.placements):
            self.bound_tp(c, lean_key)

    def plan_full(self, c: _Mesh) -> None:
        """Plan ``c`` in full (its TP plan, or the memory-lean one where that does not fit, as
        ``plan_graph`` does); record the plan or why none fits."""
        self.say(f"planning {format_mesh(c.mesh)} in full")
        tp = _tp_of(self.costs, c) if c.tp > 1 else None
        try:
            try:
                c.plan = self.plan_mesh(c, tp)
            except MEMORY_ERRORS:
                if tp is None or c.tp_key[1] is not None:
                    raise
                lean = self.tp_costs_of((c.tp, self.setup.limit * c.pp))
                if lean is None or dict(lean.plan.placements) == dict(tp.plan.placements):
                    raise
                c.plan = self.plan_mesh(c, lean)
            c.status = MeshStatus.PLANNED
        except AutopartError as exc:
            c.status, c.note = MeshStatus.NO_FIT, exc.reason
            if isinstance(exc, InfeasibleMemoryError):
                c.minimum_bytes = exc.minimum_bytes
            c.unsettled = not isinstance(exc, MEMORY_ERRORS)

    def plan_mesh(self, c: _Mesh, tp: TPCostsOf | None) -> Plan:
        return plan_mesh(
            self.og,
            tp,
            self.setup,
            batch=self.batch,
            dp=c.dp,
            pp=c.pp,
            options=c.options,
            fsdp=c.fsdp,
        )


def _state_ratio(c: _Mesh, setup: PlanningSetup) -> float:
    """The mesh's training state per parameter byte over the unsharded one (below 1 where its
    fsdp ranks shard an optimizer state larger than what a step holds whole)."""
    return setup.with_fsdp(c.fsdp).state_per_byte / setup.state_per_byte


def _sharded(owned: NodeMemory, c: _Mesh, setup: PlanningSetup) -> NodeMemory:
    """What each node owns on one of the mesh's fsdp ranks."""
    return owned if c.fsdp == 1 else owned.with_state_scaled(_state_ratio(c, setup))


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _close(c: _Mesh, best_estimate: float | None, slack: float) -> bool:
    """Whether ``c``'s estimate is within ``slack`` of the best estimate that fits."""
    assert c.estimate_s is not None
    return best_estimate is not None and c.estimate_s <= best_estimate * (1 + slack)


def _not_planned(c: _Mesh, best_estimate: float | None) -> str:
    """Why an estimated mesh was not planned in full."""
    if not c.estimate_fits:
        return f"the estimate's split needs {format_bytes(c.estimate_peak or 0)} per device; not planned"
    assert c.estimate_s is not None and best_estimate is not None
    return f"estimate {_pct(c.estimate_s, best_estimate)} above the best estimate; not planned"


# ---------------------------------------------------------------------------------------------
# the steps


def _alive(meshes: list[_Mesh]) -> list[_Mesh]:
    return [c for c in meshes if not c.status]


def _check_mesh(c: _Mesh, batch: int, setup: PlanningSetup, max_pp: int, layers: int) -> None:
    if c.pp > max_pp:
        what = f"{layers} repeated layers" if layers >= 2 else f"{max_pp} computing nodes"
        c.status, c.note = MeshStatus.SKIPPED, f"pp={c.pp} is more stages than the model's {what}"
        return
    if batch % c.replicas:
        axes = replica_label(c.dp, c.fsdp)
        c.status, c.note = MeshStatus.SKIPPED, f"the batch of {batch} does not split over {axes}"
        return
    kinds = [k for k in setup.kinds if k in ONE_STAGE_KINDS or c.pp >= 2]
    if not kinds:
        c.status, c.note = MeshStatus.SKIPPED, f"the {setup.kinds[0]} schedule needs pp >= 2"
        return
    kinds = [k for k in kinds if c.dp == 1 or k not in SPLIT_BACKWARD]
    if not kinds:
        why = split_backward_with_dp(setup.kinds[0], c.dp)
        c.status, c.note = MeshStatus.SKIPPED, why
        return
    try:
        c.options = micro_batch_options(
            batch, c.dp, c.pp, setup.request.micro_batches, kinds, fsdp=c.fsdp
        )
    except AutopartError as exc:
        c.status, c.note = MeshStatus.SKIPPED, exc.reason


@dataclass(frozen=True, slots=True)
class _Totals:
    """What every device of a mesh shares at least its part of (one TP rank's, or whole)."""

    state_bytes: float
    """Parameter, gradient and optimizer state of the whole model."""
    sample_bytes: float
    """Activations of one sample."""
    compute_s: float
    """Forward and backward seconds of one step at the traced batch."""
    param_bytes: int

    @classmethod
    def of(cls, og: OpGraph, batch: int, setup: PlanningSetup) -> _Totals:
        saved = dict.fromkeys(s for n in og.nodes.values() for s in n.saved_from)
        activations = sum(og.value_bytes_of(s) for s in saved) + sum(
            n.private_saved_bytes for n in og.nodes.values()
        )
        params = sum(og.param_bytes_by_name.values())
        return cls(
            params * setup.state_per_byte,
            activations / batch,
            sum(n.compute_s for n in og.nodes.values()),
            params,
        )


def _sample_bytes(totals: _Totals, setup: PlanningSetup) -> float:
    """One sample's activations, as far as a bound can count them: none where blocks may
    recompute (a recomputed block keeps only its inputs)."""
    return totals.sample_bytes if setup.request.recompute == "none" else 0.0


def _bound(c: _Mesh, totals: _Totals, setup: PlanningSetup, *, shard: int) -> None:
    """Lower bounds on the mesh's memory per device and step time, from ``totals`` divided by
    ``shard`` (the TP degree before the TP solve, when sharding can at best divide them; 1 after,
    from the TP-adjusted graph)."""
    state = totals.state_bytes * _state_ratio(c, setup)
    memory = (state / shard + _sample_bytes(totals, setup)) / c.pp
    c.memory_bound = int(memory)
    if memory > setup.limit:
        c.status = MeshStatus.OVER_MEMORY
        kept = " and of one sample's activations" if setup.request.recompute == "none" else ""
        c.note = (
            f"needs at least {format_bytes(int(memory))} per device (1/pp of the parameter, "
            f"gradient and optimizer state{kept})"
        )
        return
    work_s = totals.compute_s / shard / c.replicas
    tail_s = setup.with_fsdp(c.fsdp).tail_s(
        [totals.param_bytes // (shard * c.pp)], 1, dp=c.dp, pp=c.pp, tp=c.tp
    )
    c.step_bound_s = _pipeline_bound_s(work_s, c.pp, c.options) + tail_s


def _split_bound(
    c: _Mesh, owned: NodeMemory, batch: int, setup: PlanningSetup, *, before_tp: bool = False
) -> None:
    """Reject the mesh when even the leanest fractional split of what its nodes own (state, and
    activations at its schedules' least in-flight counts) exceeds the limit: a valid lower bound
    on every split the stage ILP or the simulation could take (:mod:`~autopart.solver.\
_pipeline_memory`), so no mesh that could fit is dropped."""
    if setup.request.recompute != "none":
        owned = owned.without_activations()  # recomputed blocks may keep next to nothing
    need, kind, m = pipeline_memory_bound(
        owned, batch=batch, dp=c.replicas, pp=c.pp, options=c.options
    )
    c.memory_bound = max(c.memory_bound, need)
    if need <= setup.limit:
        return
    how = "" if c.tp == 1 else " under any TP sharding" if before_tp else " under its TP sharding"
    kept = " and in-flight activations" if setup.request.recompute == "none" else ""
    c.status = MeshStatus.OVER_MEMORY
    c.note = (
        f"needs at least {format_bytes_up(need)} per device (a lower bound on any split of its "
        f"parameter, gradient and optimizer state{kept}{how}; least with {kind} x {m})"
    )


def _pipeline_bound_s(work_s: float, p: int, options: Mapping[str, list[int]]) -> float:
    """A lower bound on a pipeline's step time when its ``p`` devices do ``work_s`` seconds of
    compute in all. Under GPipe and 1F1B (one stage per device, ``m`` micro-batches, ``t_s`` the
    compute of stage ``s`` per micro-batch), device ``s`` starts after micro-batch 0's forward
    passed the stages before it, works ``m t_s``, and its last backward still has to pass them:
    ``T >= sum_{r<s} t_r + m t_s`` for every ``s``. With ``P_s = t_0 + ... + t_s`` that gives
    ``P_s <= P_{s-1} (1 - 1/m) + T / m``, so ``P_{p-1} = work_s / m <= T (1 - (1 - 1/m)^p)``.
    Other schedules (several stages per rank, or a weight gradient deferred past the fill): the
    average, ``work_s / p``."""
    bounds = []
    for kind, counts in options.items():
        for m in counts:
            if kind not in ONE_STAGE_KINDS:
                bounds.append(work_s / p)
            else:
                bounds.append(work_s / (m * (1 - (1 - 1 / m) ** p)))
    return min(bounds)


def _beaten(c: _Mesh, best_estimate: float | None) -> bool:
    """Whether the mesh's step-time bound already loses to a plan found (then it is dropped)."""
    if best_estimate is None or c.step_bound_s < best_estimate:
        return False
    c.status = MeshStatus.BOUNDED
    c.note = (
        f"cannot win: its step takes at least {format_seconds(c.step_bound_s)} (pipeline bound "
        f"on its compute) > {format_seconds(best_estimate)} estimated for the best"
    )
    return True


def _drop_op_graph(bg: BlockGraph) -> BlockGraph:
    """``bg`` without its node graph: scaling it then costs blocks, not nodes."""
    return dataclasses.replace(bg, op_graph=None)


def _estimate(c: _Mesh, bg: BlockGraph, setup: PlanningSetup, most: int) -> None:
    """The mesh's best simulated step on the chain DP's split of ``bg`` (the coarse graph at one
    replica's share of the batch); where nothing fits and recomputation is allowed, with every
    block recomputed (slower than the stage ILP's choice, so an estimate that fits is one the
    full plan can meet or beat)."""
    if setup.request.recompute in FORCED_RECOMPUTE:
        bg = recompute_layers(bg, setup.request.recompute)
    every = schedule_layouts(c.options, setup.with_fsdp(c.fsdp), c.pp, most)
    # One stage per rank where the request allows it: the estimate ranks meshes, and the full plan
    # of the best compares every stage count.
    layouts = [lay for lay in every if lay[1] == 1] or every
    found = _estimates(c, bg, setup, layouts)
    if setup.request.recompute == "auto" and not any(f[0] for f in found):
        # Memory binds: every layer recomputed, at every stage count (recomputing makes the
        # room that more stages per rank, and their smaller bubble, need)
        everything = recompute_layers(bg, "full")
        if everything.recomputed:
            whole = [lay for lay in every if lay[0] not in SPLIT_BACKWARD]
            found += _estimates(c, everything, setup, whole)
    if not found:
        c.status, c.note = MeshStatus.SKIPPED, f"too few blocks for {c.pp} stages"
        return
    fits = [f for f in found if f[0]]
    ok, step_s, peak, kind, m = (
        min(fits, key=lambda f: f[1]) if fits else min(found, key=lambda f: f[2])
    )
    c.estimate_s, c.estimate_fits, c.estimate_peak, c.estimate_kind = step_s, ok, peak, (kind, m)


def _estimates(
    c: _Mesh,
    bg: BlockGraph,
    setup: PlanningSetup,
    layouts: Sequence[tuple[str, int, Sequence[int]]],
) -> list[tuple[bool, float, int, str, int]]:
    """(fits, step, peak, schedule, micro-batches) of each layout and count on ``bg``."""
    spec = pipeline_device(setup.spec, pp=c.pp, tp=c.tp, replicas=c.replicas)
    fsdp_setup = setup.with_fsdp(c.fsdp)
    found: list[tuple[bool, float, int, str, int]] = []
    splits: dict[tuple[int, int], list[int]] = {}  # the chain DP's, per stage count and count
    for kind, v, counts in layouts:
        if len(bg.blocks) < c.pp * v:
            continue
        key = (c.pp * v, counts[0])
        if key not in splits:
            splits[key] = baselines.chain_dp(per_micro_batch(bg, counts[0]), c.pp * v, spec)
        stage_of = splits[key]
        params = per_device(bg.stage_param_bytes(stage_of, c.pp * v), stage_ranks(kind, c.pp, v))
        for m in counts:
            tail_s = fsdp_setup.tail_s(params, m, dp=c.dp, pp=c.pp, tp=c.tp)
            tl = fsdp_setup.simulate(bg, stage_of, c.pp, v, spec, kind, m)
            peak = int(max(tl.peak_memory_bytes))
            found.append((peak <= setup.limit, tl.step_time_s + tail_s, peak, kind, m))
    return found


def _tp_of(costs: Mapping[tuple[int, int | None], TPCostsOf | None], c: _Mesh) -> TPCostsOf:
    found = costs[c.tp_key]
    assert found is not None
    return found


def _plan_of(c: _Mesh) -> Plan:
    assert c.plan is not None
    return c.plan


def _infeasible(meshes: list[_Mesh], devices: int, setup: PlanningSetup) -> InfeasibleMeshError:
    """The error when nothing fits: the least memory a mesh needs (the stage ILP's minimum where it
    planned the mesh, else the memory bound), and what is known of every mesh tried."""
    tried = [c for c in meshes if c.status != MeshStatus.SKIPPED]
    # A mesh planned in full that failed for another reason than memory (the stage solver ran out
    # of time) is unsettled: its memory bound is below the limit and says nothing of its need.
    unsettled = [c for c in tried if c.status == MeshStatus.NO_FIT and c.unsettled]
    need = [(_need(c), c) for c in tried if c not in unsettled]
    if not need and not unsettled:
        reasons = "; ".join(sorted({c.note for c in meshes}))
        return InfeasibleMeshError(
            f"no mesh of {devices} devices can run this model: {reasons}.", 0
        )
    open_text = ""
    timed_out = [c for c in unsettled if not c.note.startswith("not planned")]
    out_of_budget = [c for c in unsettled if c not in timed_out]
    if timed_out:
        labels = ", ".join(format_mesh(c.mesh) for c in timed_out)
        open_text = (
            f"{len(timed_out)} mesh{'es' if len(timed_out) > 1 else ''} ({labels}) found no plan "
            "within the solver's time limit and may still fit: raise --time-limit to settle them"
        )
    if out_of_budget:
        labels = ", ".join(format_mesh(c.mesh) for c in out_of_budget)
        open_text += (
            ("; " if open_text else "")
            + f"{len(out_of_budget)} mesh{'es' if len(out_of_budget) > 1 else ''} ({labels}) "
            f"{'were' if len(out_of_budget) > 1 else 'was'} not planned: the search's time for "
            f"planning meshes in full ({_FALLBACK_BUDGET} x --time-limit) ran out; raise "
            "--time-limit to plan them"
        )
    listing = _listing(tried, unsettled, setup)
    if not need:
        return InfeasibleMeshError(
            f"no mesh of {devices} devices fits {format_bytes(setup.limit)} per device: "
            f"{open_text}, or raise --memory or --devices. {listing}",
            setup.limit + 1,
        )
    least, c = min(need, key=lambda x: (x[0], x[1].pp, x[1].tp))
    least = max(least, setup.limit + 1)  # nothing fits the limit
    recomputes = setup.request.recompute != "none"
    kept = ", with layers recomputed where that saves memory" if recomputes else ""
    fix = "" if recomputes else ", or let layers recompute (--recompute auto)"
    return InfeasibleMeshError(
        f"no mesh of {devices} devices fits {format_bytes(setup.limit)} per device: the least "
        f"demanding, {format_mesh(c.mesh)}, needs at least {format_bytes_up(least)} per device "
        f"(parameters, gradients, optimizer state and in-flight activations{kept}). Raise "
        f"--memory to {format_bytes_up(least)} or more, or use more --devices"
        + (f"; {open_text}" if open_text else "")
        + f"{fix}. {listing}",
        least,
    )


def _need(c: _Mesh) -> int:
    """The most memory per device the mesh is proven to need: the stage ILP's minimum where it was
    planned in full, and the memory bound."""
    if c.minimum_bytes is not None:
        return max(c.minimum_bytes, c.memory_bound)
    return c.memory_bound


def _listing(tried: list[_Mesh], unsettled: list[_Mesh], setup: PlanningSetup) -> str:
    """Each mesh tried and what is known of its need, least first."""
    known = sorted((c for c in tried if c not in unsettled), key=lambda c: (_need(c), c.pp, c.tp))
    parts = []
    for c in known:
        if _need(c) > setup.limit:
            parts.append(f"{format_mesh(c.mesh)} >= {format_bytes_up(_need(c))}")
        else:  # planned in full; the simulation, not the bound, showed it over the limit
            parts.append(f"{format_mesh(c.mesh)} > {format_bytes(setup.limit)} (simulated)")
    for c in unsettled:
        what = "not planned (time ran out)" if c.note.startswith("not planned") else "timed out"
        parts.append(f"{format_mesh(c.mesh)} {what}")
    return f"Per mesh (memory per device): {'; '.join(parts)}."


def _record(c: _Mesh) -> MeshCandidate:
    bound = c.step_bound_s or None
    plan = c.plan
    if plan is not None:
        return MeshCandidate(
            mesh=c.mesh,
            status=c.status,
            step_time_s=plan.step_time_s,
            step_bound_s=bound,
            estimate_s=c.estimate_s,
            memory_bytes=max(s.peak_memory_bytes for s in plan.stages),
            schedule=plan.schedule,
            micro_batches=plan.micro_batches,
            note=c.note,
        )
    memory = c.minimum_bytes or c.estimate_peak
    if c.status == MeshStatus.OVER_MEMORY:
        memory = c.memory_bound
    kind, m = c.estimate_kind
    return MeshCandidate(
        mesh=c.mesh,
        status=c.status,
        step_bound_s=bound,
        estimate_s=c.estimate_s,
        memory_bytes=memory,
        schedule=kind,
        micro_batches=m,
        note=c.note,
    )


_STATUS_ORDER = (
    MeshStatus.CHOSEN,
    MeshStatus.PLANNED,
    MeshStatus.ESTIMATED,
    MeshStatus.BOUNDED,
    MeshStatus.NO_FIT,
    MeshStatus.OVER_MEMORY,
    MeshStatus.SKIPPED,
)


def _table_order(c: _Mesh) -> tuple[int, float, int, int]:
    if c.plan is not None:
        t = c.plan.step_time_s
    elif c.estimate_s is not None:
        t = c.estimate_s
    elif c.status == MeshStatus.OVER_MEMORY:
        t = c.memory_bound
    else:
        t = c.step_bound_s
    return (_STATUS_ORDER.index(c.status), t, c.pp, c.tp)


def _count(micro_batches: int) -> str:
    return f"{micro_batches} micro-batch{'es' if micro_batches != 1 else ''}"


def _pct(value: float, best: float | None) -> str:
    return f"{value / best - 1:+.1%}" if best else "n/a"


def _reason(best: _Mesh, meshes: list[_Mesh], setup: PlanningSetup) -> str:
    plan = _plan_of(best)
    text = (
        f"chose {format_mesh(best.mesh)} because its predicted step, "
        f"{format_seconds(plan.step_time_s)} ({plan.schedule}, {_count(plan.micro_batches)}), "
        f"is the fastest that fits {format_bytes(setup.limit)} per device"
    )
    rivals = [
        (_plan_of(c).step_time_s, "planned", c)
        for c in meshes
        if c.plan is not None and c is not best
    ] + [
        (c.estimate_s, "estimated", c)
        for c in meshes
        if c.status == MeshStatus.ESTIMATED and c.estimate_fits and c.estimate_s is not None
    ]
    if rivals:
        t, how, runner = min(rivals, key=lambda r: (r[0], r[2].pp, r[2].tp))
        text += (
            f"; the next best, {format_mesh(runner.mesh)}, is {how} at {format_seconds(t)} "
            f"({_pct(t, plan.step_time_s)})"
        )
    counts = [
        (sum(c.status == status for c in meshes), what)
        for status, what in (
            (MeshStatus.BOUNDED, "cannot win by a lower bound on their step"),
            (MeshStatus.OVER_MEMORY, "cannot fit memory"),
            (MeshStatus.NO_FIT, "found no plan that fits memory"),
            (MeshStatus.SKIPPED, "are not valid here"),
        )
    ]
    others = [f"{n} {what}" for n, what in counts if n]
    if others:
        text += f"; of the other meshes, {', '.join(others)}"
    return text + "."
