"""Planning one mesh: the stage ILP on TP-adjusted costs, every schedule and micro-batch count
simulated, the fastest that fits memory kept (:func:`plan_mesh`), and the pieces the mesh search
shares with it (:func:`planning_setup`, :func:`solve_tp_costs`, :func:`simulate_blocks`, ...).
:mod:`autopart.planning.planner` holds the entry points, which call this or the mesh search."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from autopart.cost_models.comm import (
    all_gather_time_s,
    all_reduce_time_s,
    p2p_time_s,
    reduce_scatter_time_s,
    ring_latency_s,
)
from autopart.cost_models.compute import update_time_s
from autopart.cost_models.devices import DeviceSpec, get_device
from autopart.cost_models.memory import (
    as_optimizer,
    state_bytes_per_param_byte,
    unsharded_bytes_per_param_byte,
)
from autopart.errors import AutopartError
from autopart.planning.graph import BlockGraph, OpGraph, coarsen, group_blocks
from autopart.planning.plans import (
    BaselineResult,
    Plan,
    RecomputedBlock,
    ScheduleOption,
    SolverInfo,
    StagePlan,
    TPSection,
    replica_label,
)
from autopart.planning.request import FORCED_RECOMPUTE, PlanRequest
from autopart.planning.schedule import (
    SPLIT_BACKWARD,
    Deferred,
    ScheduleError,
    build_schedule,
    in_flight_micro_batches,
    simulate,
    stage_ranks,
)
from autopart.planning.schedule_choice import (
    ONE_STAGE_KINDS,
    per_device,
    schedule_kinds,
    stage_counts,
)
from autopart.planning.schedule_types import ScheduleKind
from autopart.planning.selective import layer_units, recompute_layers
from autopart.planning.stage_memory import (
    deferred_state,
    reserved_bytes,
    stage_memory,
    unit_param_bytes,
    working_floor_bytes,
)
from autopart.precision import as_precision
from autopart.solver import baselines
from autopart.solver.cost import lower_bound_s, stage_times_s
from autopart.solver.stage_ilp import InfeasibleMemoryError, solve_stages
from autopart.solver.tp_costs import TPCosts, tp_costs
from autopart.solver.tp_ilp import TPPlan, solve_tp
from autopart.units import format_bytes, format_bytes_up

__all__ = [
    "FSDP_MOST_STAGES_PER_RANK",
    "GPUS_PER_NODE",
    "MEMORY_ERRORS",
    "NoScheduleFitsError",
    "PlanningSetup",
    "TPCostsOf",
    "batch_size",
    "dp_sync_s",
    "hidden_gathers_s",
    "in_flight_per_stage",
    "micro_batch_options",
    "most_stages",
    "op_graph_of",
    "per_micro_batch",
    "pipeline_device",
    "plan_mesh",
    "planning_setup",
    "regathers_s",
    "schedule_layouts",
    "simulate_blocks",
    "simulate_plan",
    "solve_tp_costs",
    "split_backward_factor",
    "step_tail_s",
]


@dataclass(frozen=True, slots=True)
class _Candidate:
    schedule: str
    micro_batches: int
    stages_per_device: int
    bg: BlockGraph
    stage_of: tuple[int, ...]
    timeline: Any
    status: str
    bound_s: float
    ranks: tuple[int, ...]
    """The pipeline rank of each stage (looped, or V-shaped)."""
    estimate: bool = False
    """Simulated on the best contiguous split (the chain DP), not on a stage ILP solution."""
    solved_at: int = 0
    """The micro-batch count the split was solved at (0: this candidate's own)."""


class _Solved(NamedTuple):
    """A solved stage layout: its blocks (those chosen to recompute marked), the stage of each,
    the solver's status and objective bound."""

    bg: BlockGraph
    stage_of: tuple[int, ...]
    status: str
    bound_s: float


class NoScheduleFitsError(AutopartError):
    """The stages fit memory in the stage ILP's accounting, but no simulated schedule does."""


MEMORY_ERRORS = (InfeasibleMemoryError, NoScheduleFitsError)
"""What planning a mesh raises when its plan does not fit memory."""

GPUS_PER_NODE = 8
"""GPUs that share one node's NVLink switch (DGX / HGX H100, H200 and A100 boards). Ranks are laid
out dp-major, tp-minor, so a pipeline whose ``tp * pp`` ranks span more than a node sends activations
over the network, and a dp all-reduce over more than a node runs at the network's rate."""


@dataclass(frozen=True, slots=True)
class PlanningSetup:
    """A :class:`PlanRequest` resolved: what every mesh of the request shares."""

    request: PlanRequest
    spec: DeviceSpec
    limit: int
    """Memory per device in bytes."""
    state_per_byte: float
    """Bytes of parameter + gradient + optimizer state per parameter byte (on one of ``fsdp``
    ranks that shard it: :func:`~autopart.cost_models.memory.state_bytes_per_param_byte`)."""
    kinds: tuple[str, ...]
    """The schedules compared (auto: every kind torch runs,
    :data:`~autopart.planning.schedule_choice.AUTO_KINDS`)."""
    fsdp: int = 1
    """The FSDP ranks ``state_per_byte`` is sharded over."""

    def with_fsdp(self, fsdp: int) -> PlanningSetup:
        """This setup for a mesh whose ``fsdp`` ranks shard the training state."""
        if fsdp == self.fsdp:
            return self
        factor = state_bytes_per_param_byte(
            self.request.optimizer, fsdp=fsdp, mixed_precision=self.mixed_precision
        )
        return dataclasses.replace(self, state_per_byte=factor, fsdp=fsdp)

    def reshards(self, kind: str) -> bool:
        """Whether each layer's FSDP2 unit reshards after its forward under ``kind``: where the
        request asks, the mesh shards (``fsdp > 1``) and ``kind`` is GPipe."""
        return self.request.reshard_after_forward and self.fsdp > 1 and kind == ScheduleKind.GPIPE

    @property
    def deferred_grad_per_byte(self) -> float:
        """Bytes per parameter byte of the unsharded gradients FSDP2 holds only from a stage's
        first backward on (its whole state less the gathered parameter: 1, or 3 under mixed
        precision), where FSDP2 holds the parameters (an fsdp axis, or mixed precision); else 0."""
        if self.fsdp <= 1 and not self.mixed_precision:
            return 0.0
        return unsharded_bytes_per_param_byte(mixed_precision=self.mixed_precision) - 1.0

    def simulate(
        self,
        bg: BlockGraph,
        stage_of: Sequence[int],
        p: int,
        v: int,
        spec: DeviceSpec,
        kind: str,
        m: int,
    ) -> Any:
        """:func:`simulate_blocks` with this setup's training state."""
        return simulate_blocks(
            bg,
            stage_of,
            p,
            v,
            spec,
            kind,
            m,
            self.state_per_byte,
            grad_per_byte=self.deferred_grad_per_byte,
            reshard=self.reshards(kind),
        )

    @property
    def mixed_precision(self) -> bool:
        """Whether the request trains in bf16 mixed precision (:mod:`autopart.precision`)."""
        return as_precision(self.request.precision).is_mixed

    def tail_s(
        self,
        param_bytes_per_device: Sequence[float],
        micro_batches: int,
        *,
        dp: int,
        pp: int,
        tp: int,
        hidden_s: Sequence[float] = (),
        regather_bytes: Sequence[float] = (),
    ) -> float:
        """:func:`step_tail_s` of a mesh with this setup's fsdp ranks."""
        return step_tail_s(
            param_bytes_per_device,
            micro_batches,
            optimizer=self.optimizer,
            mixed_precision=self.mixed_precision,
            spec=self.spec,
            dp=dp,
            pp=pp,
            tp=tp,
            fsdp=self.fsdp,
            hidden_s=hidden_s,
            regather_bytes=regather_bytes,
        )

    def stage_counts(self, kind: str) -> tuple[int, ...]:
        """The stages per rank ``kind`` is planned at: on an fsdp mesh at most
        :data:`FSDP_MOST_STAGES_PER_RANK`."""
        counts = stage_counts(kind, self.request.stages_per_rank)
        if self.fsdp > 1:
            counts = tuple(v for v in counts if v <= FSDP_MOST_STAGES_PER_RANK)
        return counts

    @property
    def optimizer(self) -> str:
        return self.request.optimizer

    @property
    def name(self) -> str:
        return self.request.name or "model"


@dataclass(frozen=True, slots=True, eq=False)
class TPCostsOf:
    """A solved TP plan and the TP-adjusted costs of the graph it was solved on."""

    plan: TPPlan
    costs: TPCosts


FSDP_MOST_STAGES_PER_RANK = 3
"""The most stages per rank planned on an fsdp mesh. torch's multi-stage schedules keep at most
three stages of a rank gathered (``_add_unshard_reshard``'s ``max_active_stages``) and gather
the others again whenever the order comes back to them (interleaved 1F1B with four stages per
rank: nine all-gathers a step instead of four), which the model does not count."""


def planning_setup(
    request: PlanRequest, *, pp: int | None = None, dp: int | None = None, fsdp: int = 1
) -> PlanningSetup:
    """Resolve the request's device, memory, optimizer and schedules (before any tracing or
    solving); ``pp``, ``dp`` and ``fsdp`` check the schedule against a fixed mesh (and set the
    state's sharding)."""
    from autopart.units import parse_bytes

    spec = get_device(request.device)
    limit = parse_bytes(request.memory) if request.memory is not None else spec.memory_bytes
    opt = as_optimizer(request.optimizer)
    kinds = schedule_kinds(
        request.schedule,
        pp,
        request.stages_per_rank,
        dp,
        full_recompute=request.recompute in FORCED_RECOMPUTE,
    )
    state = state_bytes_per_param_byte(
        opt, mixed_precision=as_precision(request.precision).is_mixed
    )
    if fsdp > 1 and (request.stages_per_rank or 0) > FSDP_MOST_STAGES_PER_RANK:
        raise AutopartError(
            f"stages_per_rank={request.stages_per_rank} on a mesh with fsdp={fsdp}: torch's "
            f"pipeline schedules keep at most {FSDP_MOST_STAGES_PER_RANK} stages of a rank "
            "gathered under FSDP and gather the others again at every switch; ask for at most "
            f"{FSDP_MOST_STAGES_PER_RANK} stages per rank (--stages-per-rank), or replicate over "
            "dp instead of sharding over fsdp."
        )
    setup = PlanningSetup(request, spec, limit, state, kinds)
    return setup.with_fsdp(fsdp)


def op_graph_of(
    gm: torch.fx.GraphModule, setup: PlanningSetup, say: Callable[[str], None]
) -> tuple[OpGraph, float | None]:
    """The solver's graph of ``gm`` on the request's device, the loss's time on its outputs
    included (:mod:`autopart.planning.loss`): on the cost model, or with ``profile`` on times
    measured on this machine (with the seconds that took, else ``None``)."""
    from autopart.planning.loss import loss_times_s

    if not setup.request.profile:
        loss, _ = loss_times_s(gm, setup.spec)
        return OpGraph.from_graph_module(gm, setup.spec).with_added_time(loss), None
    from autopart.cost_models.profiling import profiled_compute

    say(f"profiling the graph's ops for {setup.spec.name}")
    compute, profile_s = profiled_compute(gm, setup.spec)
    loss, loss_s = loss_times_s(gm, setup.spec, profile=True)
    og = OpGraph.from_graph_module(gm, setup.spec, compute=compute).with_added_time(loss)
    return og, profile_s + loss_s


def micro_batch_options(
    batch: int,
    dp: int,
    p: int,
    micro_batches: int | None,
    kinds: Sequence[str],
    *,
    fsdp: int = 1,
) -> dict[str, list[int]]:
    """Valid micro-batch counts per schedule for each of the ``dp x fsdp`` replicas (most
    first)."""
    replicas = dp * fsdp
    if batch % replicas:
        axes = replica_label(dp, fsdp)
        raise AutopartError(
            f"a batch of {batch} does not split across the {replicas} data-parallel replicas of "
            f"{axes}; use a batch that is a multiple of {replicas}, or other {axes} sizes.",
            reason=f"the batch of {batch} does not split over {axes}",
        )
    return _micro_batch_options(batch // replicas, p, micro_batches, kinds)


def solve_tp_costs(
    gm: torch.fx.GraphModule,
    og: OpGraph,
    degree: int,
    setup: PlanningSetup,
    *,
    micro_batches: int,
    memory: int | None = None,
) -> TPCostsOf:
    """The TP plan of ``gm`` on ``degree`` ranks and ``og``'s costs under it. ``memory`` limits
    what one rank would hold of the whole graph (``solve_tp``'s limit); by default the plan is the
    fastest, whatever it holds."""
    tp_plan = solve_tp(
        gm,
        degree,
        device=setup.spec,
        memory=memory,
        micro_batches=micro_batches,
        optimizer=setup.optimizer,
        time_limit_s=setup.request.time_limit_s,
    )
    return TPCostsOf(tp_plan, tp_costs(og, gm, tp_plan, micro_batches=micro_batches))


def pipeline_device(spec: DeviceSpec, *, pp: int, tp: int = 1, replicas: int = 1) -> DeviceSpec:
    """``spec`` with the link that pipeline sends take: the network's where one replica's ``tp *
    pp`` ranks span more than a node (every boundary priced at it: conservative for the boundaries
    inside a node). On a CPU host (``shared_cores``) the pipeline's share of the cores, counted in
    its devices of ``tp`` ranks beside the ``replicas`` pipelines that run at the same time."""
    if spec.shared_cores is not None:
        spec = dataclasses.replace(spec, shared_cores=spec.shared_cores / (tp * replicas))
    if pp == 1 or tp * pp <= GPUS_PER_NODE:
        return spec
    return dataclasses.replace(
        spec,
        link_bandwidth_bytes_per_s=spec.network_bandwidth_bytes_per_s,
        link_latency_s=spec.network_latency_s,
        link_efficiency=spec.network_efficiency,
    )


def dp_sync_s(
    param_bytes_per_device: int,
    *,
    dp: int,
    pp: int,
    tp: int,
    spec: DeviceSpec,
    fsdp: int = 1,
    mixed_precision: bool = False,
) -> float:
    """Seconds of a step's data-parallel communication of one device's parameters, counted
    without overlap (an upper bound): DDP's gradient all-reduce over ``dp`` after the pipeline
    drains; with ``fsdp`` ranks (FSDP2, one unit per stage) the all-gather of the stage's
    parameters before its first forward (kept whole for the step: ``reshard_after_forward=False``)
    and the reduce-scatter of its gradients after the last backward, then the all-reduce of the
    gradient shard over ``dp`` (HSDP). Ranks are laid out ``(dp, fsdp, pp, tp)``: an fsdp group
    stays in a node while ``fsdp * pp * tp`` does. Under ``mixed_precision`` the parameter bytes
    are bfloat16 (gathered as they are) and gradients are reduced in float32 (twice the bytes)."""
    grad_bytes = param_bytes_per_device * (2 if mixed_precision else 1)
    seconds = 0.0
    if fsdp > 1:
        across = fsdp * pp * tp > GPUS_PER_NODE
        seconds += all_gather_time_s(param_bytes_per_device, fsdp, spec, inter_node=across)
        seconds += reduce_scatter_time_s(grad_bytes, fsdp, spec, inter_node=across)
    if dp > 1:
        inter_node = dp * fsdp * pp * tp > GPUS_PER_NODE
        seconds += all_reduce_time_s(grad_bytes // fsdp, dp, spec, inter_node=inter_node)
    return seconds


def step_tail_s(
    param_bytes_per_device: Sequence[float],
    micro_batches: int,
    *,
    optimizer: str,
    mixed_precision: bool,
    spec: DeviceSpec,
    dp: int,
    pp: int,
    tp: int,
    fsdp: int = 1,
    hidden_s: Sequence[float] = (),
    regather_bytes: Sequence[float] = (),
) -> float:
    """What a step adds after its pipeline drains, on its slowest device: the data-parallel
    gradient sync (:func:`dp_sync_s`, less the device's ``hidden_s``: the all-gathers that run
    behind its layers' computation, :func:`hidden_gathers_s`) and the ``optimizer``'s update of
    the parameters the device updates (:func:`~autopart.cost_models.compute.update_time_s`: its
    ``1 / fsdp`` shard, float32 masters under ``mixed_precision``) after the gradients of
    ``micro_batches`` are scaled. ``regather_bytes``: per device, the parameter bytes of layers
    that reshard after their forward (:func:`regathers_s`)."""
    states = as_optimizer(optimizer).states_per_param
    master = 2 if mixed_precision else 1
    hidden = list(hidden_s) or [0.0] * len(param_bytes_per_device)
    if regather_bytes:
        across = fsdp * pp * tp > GPUS_PER_NODE
        again = regathers_s(regather_bytes, hidden, micro_batches, spec, fsdp, across)
        hidden = [h - a for h, a in zip(hidden, again)]
    return max(
        dp_sync_s(
            int(nbytes),
            dp=dp,
            pp=pp,
            tp=tp,
            spec=spec,
            fsdp=fsdp,
            mixed_precision=mixed_precision,
        )
        - hidden_d
        + update_time_s(
            nbytes * master / fsdp, spec, states_per_param=states, micro_batches=micro_batches
        )
        for nbytes, hidden_d in zip(param_bytes_per_device, hidden, strict=True)
    )


def regathers_s(
    unit_bytes: Sequence[float],
    hidden_s: Sequence[float],
    micro_batches: int,
    spec: DeviceSpec,
    fsdp: int,
    inter_node: bool,
) -> list[float]:
    """Per device, what resharding each layer after its forward adds to a step: the device's
    layers (``unit_bytes`` of parameters) gathered again by every micro-batch's forward after the
    first and by the first backward (``m`` more ring all-gathers over ``fsdp``), less what the
    later forwards hide as the first one does (``hidden_s``, :func:`hidden_gathers_s`)."""
    m = micro_batches
    return [
        max(0.0, m * all_gather_time_s(int(b), fsdp, spec, inter_node=inter_node) - (m - 1) * h)
        for b, h in zip(unit_bytes, hidden_s)
    ]


def hidden_gathers_s(
    scaled: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    spec: DeviceSpec,
    *,
    fsdp: int,
    pp: int,
    tp: int,
    kind: str,
) -> list[float]:
    """Per stage, the seconds of its first forward's all-gathers that run behind computation.
    Each layer is its own FSDP2 unit (``passes/fsdp_units.py``). Under GPipe and 1F1B (torch's
    single-stage schedules) a unit is gathered when the stage reaches it, on FSDP2's own stream:
    on a GPU the gather of a layer runs while the computation queued before it (the previous
    layer's forward, of one micro-batch: ``scaled``) still runs, one gather at a time, and at
    most its transfer hides (each gather still pays its start-up latency). What the stage holds
    outside its layers is gathered first, with nothing to hide behind; so is its first layer,
    unless blocks outside layers compute before it. The multi-stage schedules (torch's
    ``_PipelineScheduleRuntime``) gather every unit of a stage at once before its first action
    (``UNSHARD``), counted here as hiding nothing. The reduce-scatters run after the step's last
    backward (torch's pipelining reduces there), with nothing to hide behind either. A CPU host
    (gloo, no streams) hides nothing."""
    hidden = [0.0] * num_stages
    single = ScheduleKind(kind) in ONE_STAGE_KINDS
    if fsdp <= 1 or spec.shared_cores is not None or not single:
        return hidden
    across = fsdp * pp * tp > GPUS_PER_NODE
    latency = ring_latency_s(fsdp, spec, inter_node=across)
    for s in range(num_stages):
        units: list[tuple[str | None, int, float]] = []  # (layer, param bytes, forward seconds)
        for b, st in zip(scaled.blocks, stage_of):
            if st != s:
                continue
            if units and b.layer == units[-1][0]:
                layer, nbytes, fwd = units[-1]
                units[-1] = (layer, nbytes + b.param_bytes, fwd + b.forward_s)
            else:
                units.append((b.layer, b.param_bytes, b.forward_s))
        queued = 0.0  # forward computation queued since the last gather
        for layer, nbytes, fwd in units:
            if layer is not None:
                transfer = all_gather_time_s(nbytes, fsdp, spec, inter_node=across) - latency
                hidden[s] += min(transfer, queued)
                queued = 0.0
            queued += fwd
    return hidden


def plan_mesh(
    og_full: OpGraph,
    tp: TPCostsOf | None,
    setup: PlanningSetup,
    *,
    batch: int,
    dp: int,
    pp: int,
    options: Mapping[str, list[int]],
    progress: Callable[[str], None] | None = None,
    start_s: float | None = None,
    graph_batch: int | None = None,
    fsdp: int = 1,
) -> Plan:
    """Plan the pipeline of one ``dp x fsdp x pp x tp`` mesh on ``og_full`` (the graph traced at
    ``graph_batch`` samples, by default the global ``batch``; without ``tp`` the plain costs, with
    it ``og_full`` is ignored for the TP-adjusted graph): each of the ``dp x fsdp`` replicas
    plans on its share of the batch, holding ``1 / fsdp`` of its state. A graph traced at one
    micro-batch is costed at the shapes it runs with."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter() if start_s is None else start_s
    setup = setup.with_fsdp(fsdp)
    p, degree = pp, (tp.plan.degree if tp is not None else 1)
    spec = pipeline_device(setup.spec, pp=p, tp=degree, replicas=dp * fsdp)
    og = tp.costs.op_graph if tp is not None else og_full
    traced = graph_batch or batch
    replicas = dp * fsdp
    if traced * replicas != batch:  # costs for one replica's share of the batch
        og = og.scaled(batch / (replicas * traced))
    if spec is not og.device:
        og = dataclasses.replace(og, device=spec)
    # Blocks per stage: with TP the stage ILP takes far longer to prove optimality on as many
    # blocks (Llama-70B, pp=8 x tp=8: 6.3 s on 186 blocks, 0.5 s on 95, the same plan), and the
    # forced chain-DP cuts keep the best contiguous split at any block count.
    per_stage = 24 if tp is None else 12

    # After the pipeline drains each rank syncs its stages' gradients with its dp peers and steps
    # its optimizer; the baselines pay it too.
    def tail_s(
        param_bytes_per_device: Sequence[float],
        micro_batches: int,
        hidden_s: Sequence[float],
        regather_bytes: Sequence[float],
    ) -> float:
        return setup.tail_s(
            param_bytes_per_device,
            micro_batches,
            dp=dp,
            pp=p,
            tp=degree,
            hidden_s=hidden_s,
            regather_bytes=regather_bytes,
        )

    def hidden_s(
        scaled: BlockGraph, stage_of: Sequence[int], num_stages: int, kind: str
    ) -> list[float]:
        return hidden_gathers_s(
            scaled, stage_of, num_stages, spec, fsdp=setup.fsdp, pp=p, tp=degree, kind=kind
        )

    pipe = _Pipeline(setup, spec, p, tail_s, hidden_s)
    search = _ScheduleSearch(og, spec, setup, p, per_stage, say)
    search.run(options, pipe)
    candidates = search.candidates
    if not candidates and search.failed and not search.misses and not search.simulated:
        raise search.failed[0]
    if not candidates:
        raise _no_fit_error(setup.limit, p, search.misses, search.simulated)
    order = list(options)

    def rank(c: _Candidate) -> tuple[float, int, int, int]:
        step_s = c.timeline.step_time_s + _tail_of(c, pipe)
        return (step_s, c.micro_batches, order.index(c.schedule), c.stages_per_device)

    # Steps predicted within _EQUAL_STEP of the fastest are a tie the model cannot break: the
    # leanest of them runs, by its fullest device, then by all of them (GPipe and 1F1B at one
    # step: rank 0 holds as many micro-batches in both, the later ranks fewer under 1F1B).
    fastest = min(rank(c)[0] for c in candidates)
    near = [c for c in candidates if rank(c)[0] <= fastest * (1 + _EQUAL_STEP)]

    def leanest(c: _Candidate) -> tuple[int, int, tuple[float, int, int, int]]:
        peaks = c.timeline.peak_memory_bytes
        return (max(peaks), sum(peaks), rank(c))

    best = min(near, key=leanest)
    redone = search.refined(best)
    if redone is not None and rank(redone) < rank(best):
        best = redone
    result = _make_plan(best, og, pipe, time.perf_counter() - start)
    result = dataclasses.replace(result, schedule_options=search.options(pipe))
    if replicas == 1 and tp is None:
        return result
    mesh = {"dp": dp, **({"fsdp": fsdp} if fsdp > 1 else {}), "pp": p}
    if tp is not None:
        mesh["tp"] = degree
    return dataclasses.replace(
        result,
        mesh=mesh,
        tp=_tp_section(tp, result, batch, replicas * traced) if tp is not None else None,
        reshard_after_forward=setup.reshards(result.schedule),
    )


class _ScheduleSearch:
    """Every schedule, stages-per-rank count and micro-batch count of one pipeline: the stage ILP
    solved once per stage layout (stages per rank and their ranks; reused where its assignment
    fits the next schedule's memory), each count simulated; what fits becomes a candidate, what
    misses is kept for the error and the table of options."""

    def __init__(
        self,
        og: OpGraph,
        spec: DeviceSpec,
        setup: PlanningSetup,
        p: int,
        per_stage: int,
        say: Callable[[str], None],
    ) -> None:
        self.og, self.spec, self.setup = og, spec, setup
        self.p, self.per_stage, self.say = p, per_stage, say
        self.graphs: dict[tuple[int, int], BlockGraph] = {}
        self.solved: dict[tuple[int, ...], _Solved] = {}
        """Per stage layout (the rank of each stage): the solved split."""
        self.solved_for: dict[tuple[int, ...], tuple[str, int]] = {}
        """Per stage layout: the schedule and micro-batch count its split was solved for."""
        self.candidates: list[_Candidate] = []
        self.misses: list[tuple[str, int, InfeasibleMemoryError]] = []
        self.missed: list[tuple[str, int, int, int]] = []
        """(schedule, stages per rank, micro-batches, least bytes) of each stage solve that found
        no split within the memory limit."""
        self.simulated: list[tuple[int, str, int]] = []
        """(peak bytes, schedule, micro-batches) of the simulations over the limit."""
        self.over: list[_Candidate] = []
        """The simulations over the limit, for the table of options."""
        self.failed: list[AutopartError] = []
        """Stage solves that found no split within their time limit."""
        self.infeasible: dict[
            tuple[int, ...], list[tuple[list[int], int, bool, InfeasibleMemoryError]]
        ] = {}
        """Per stage layout, the in-flight counts and micro-batch count for which no split fits
        memory (and whether recomputation was offered)."""
        self.most_micro_batches = 1
        """The most micro-batches compared: the size the layouts are cut and solved at."""
        self.estimated: list[_Candidate] = []
        """The layouts on their chain-DP split: those not solved (too far behind), and those whose
        solve found no split that fits."""

    def run(self, options: Mapping[str, Sequence[int]], pipe: _Pipeline) -> None:
        """Estimate every layout (a schedule at a stages-per-rank count) on its best contiguous
        split, then solve the stage ILP for the stage layouts (the rank of each stage) in order of
        their best estimate: every one while none fits memory, else up to
        :data:`_MOST_LAYOUT_SOLVES` within :data:`_LAYOUT_SLACK` of the fastest found (estimates
        within :data:`_NEAR_LIMIT` of the memory limit count); after a solve that stopped at
        its time limit, none with as many stages or more (they would too), and of the smaller
        ones only those whose contiguous split misses memory (they have no plan otherwise). A
        layout
        left out competes on its contiguous split (status ``HINT``)."""
        self.most_micro_batches = max(max(counts) for counts in options.values())
        layouts = [
            (kind, v, counts)
            for kind, v, counts in schedule_layouts(
                options, self.setup, self.p, most_stages(self.og)
            )
            if len(self.graph(v).blocks) >= self.p * v  # else too few blocks for the stages
        ]
        groups: dict[tuple[int, ...], list[tuple[str, int, Sequence[int]]]] = {}
        for kind, v, counts in layouts:
            groups.setdefault(stage_ranks(kind, self.p, v), []).append((kind, v, counts))
        estimates = {key: self.estimate(group, pipe) for key, group in groups.items()}
        binds = not any(self.fits(c) for cs in estimates.values() for c in cs)
        whole = self.recomputed_estimates(layouts, pipe) if binds else []
        judged = {key: [*estimates[key], *(c for c in whole if c.ranks == key)] for key in groups}
        fitting = [c for c in whole if self.fits(c)]
        solves, settled = 0, math.inf  # the fewest stages a solve stopped at its time limit on
        for key in sorted(groups, key=lambda k: _best_first(judged[k], pipe)):
            best = self.fastest(pipe, fitting)
            # the stage ILP may move a few per cent of memory off the fullest device
            near = [c for c in judged[key] if _near(c, self.limit)]
            close = best is not None and any(
                c.timeline.step_time_s + _tail_of(c, pipe) <= best * (1 + _LAYOUT_SLACK)
                for c in near
            )
            # After a solve stopped at its time limit, one as large would too; a smaller one is
            # still solved where its contiguous split misses memory (it has no plan otherwise)
            has_plan = any(max(c.timeline.peak_memory_bytes) <= self.limit for c in near)
            stopped = len(key) >= settled or (settled < math.inf and has_plan)
            if best is not None and (stopped or solves >= _MOST_LAYOUT_SOLVES or not close):
                self.estimated += estimates[key]
                continue
            solves, found, failed = solves + 1, len(self.candidates), len(self.failed)
            for kind, v, counts in groups[key]:
                self.add_layout(kind, v, counts)
            if len(self.candidates) == found:  # no solved split fits: the contiguous one may
                self.estimated += estimates[key]
            if len(self.failed) > failed or (
                key in self.solved and self.solved[key].status != "OPTIMAL"
            ):  # a solve stopped at its time limit (with a split, or none)
                settled = min(settled, len(key))
        # A layout left unsolved competes on its contiguous split: a valid plan too (the stage
        # ILP's hint), simulated as the others are.
        keeps = [
            c
            for c in (*self.candidates, *self.estimated)
            if not c.bg.recomputed and max(c.timeline.peak_memory_bytes) <= self.limit
        ]
        if self.setup.request.recompute == "auto" and not keeps:
            # Memory binds: every layer recomputed, on the contiguous split, at every count
            # (the stage ILP chose its layers at the leanest count only)
            self.estimated += whole or self.recomputed_estimates(layouts, pipe)
        for c in self.estimated:
            (self.candidates if self.fits(c) else self.over).append(c)

    def recomputed_estimates(
        self, layouts: Sequence[tuple[str, int, Sequence[int]]], pipe: _Pipeline
    ) -> list[_Candidate]:
        """The ``layouts`` that may recompute, every layer recomputed, on their contiguous split (a
        plan wherever it fits: the recompute solve's hint); none without ``--recompute auto``.
        Where memory binds on every split keeping each activation, a layout is judged by these:
        how lean its split keeping every activation is says nothing of its speed."""
        if self.setup.request.recompute != "auto":
            return []
        whole = [lay for lay in layouts if self.may_recompute(lay[0])]
        return self.estimate(whole, pipe, recomputed=True)

    def fits(self, c: _Candidate) -> bool:
        """Whether ``c``'s fullest device fits the memory limit."""
        return max(c.timeline.peak_memory_bytes) <= self.limit

    @property
    def limit(self) -> int:
        return self.setup.limit

    def estimate(
        self,
        group: Sequence[tuple[str, int, Sequence[int]]],
        pipe: _Pipeline,
        *,
        recomputed: bool = False,
    ) -> list[_Candidate]:
        """Each layout of ``group`` simulated at each count on its chain-DP split (of whole
        layers, each recomputed, with ``recomputed``)."""
        out = []
        for kind, v, counts in group:
            bg, ranks = self.graph(v), stage_ranks(kind, self.p, v)
            if recomputed:
                bg = recompute_layers(bg, "full")
                if len(bg.blocks) < self.p * v:
                    continue
            stage_of = tuple(
                baselines.chain_dp(per_micro_batch(bg, counts[0]), self.p * v, self.spec)
            )
            for m in counts:
                tl = self.setup.simulate(bg, stage_of, self.p, v, self.spec, kind, m)
                out.append(
                    _Candidate(kind, m, v, bg, stage_of, tl, "HINT", 0.0, ranks, True, counts[0])
                )
        return out

    def fastest(self, pipe: _Pipeline, also: Sequence[_Candidate] = ()) -> float | None:
        """The fastest step among the candidates that fit and ``also`` (``None`` while none)."""
        steps = [c.timeline.step_time_s + _tail_of(c, pipe) for c in (*self.candidates, *also)]
        return min(steps, default=None)

    def add_layout(self, kind: str, v: int, counts: Sequence[int]) -> None:
        """Solve (or reuse) the stage ILP for ``kind`` at ``v`` stages per rank and simulate
        every count of ``counts`` (micro-batches, most first) on it."""
        p = self.p
        bg = self.graph(v)
        ranks = stage_ranks(kind, p, v)
        solved = self.assignment(bg, kind, counts[0], v, ranks)
        if solved is None:
            return
        bg, stage_of, status, bound_s = solved
        limit = self.setup.limit
        for m in counts:
            timeline = self.setup.simulate(bg, stage_of, p, v, self.spec, kind, m)
            candidate = _Candidate(
                kind, m, v, bg, stage_of, timeline, status, bound_s, ranks, solved_at=counts[0]
            )
            peak = max(timeline.peak_memory_bytes)
            if peak <= limit:
                self.candidates.append(candidate)
            else:
                self.simulated.append((int(peak), kind, m))
                self.over.append(candidate)

    def graph(self, v: int, m: int | None = None) -> BlockGraph:
        """The coarse graph for ``v`` stages per rank, ``per_stage`` blocks a stage, with the cuts
        of the best contiguous split into ``p * v`` stages of one of ``m`` micro-batches (by
        default the most compared: costs with a fixed part balance differently at each size);
        one graph serves every count from two up (cutting the node graph at the best split costs
        seconds on a 70B model, and the ILP grows with stages x blocks)."""
        key = (min(v, 2), m or self.most_micro_batches)
        if key not in self.graphs:
            most = self.setup.request.max_blocks or max(64, self.per_stage * self.p * key[0])
            cut = coarsen(self.og.scaled(1 / key[1]), max_blocks=most, num_stages=self.p * key[0])
            bg = group_blocks(self.og, [b.nodes for b in cut.blocks])
            if self.setup.request.recompute in FORCED_RECOMPUTE:
                bg = recompute_layers(bg, self.setup.request.recompute)
            self.graphs[key] = bg
        return self.graphs[key]

    def refined(self, best: _Candidate) -> _Candidate | None:
        """``best`` solved again at its own micro-batch count, when its split was solved at
        another (the fixed part of each node weighs more on smaller micro-batches, so the best
        split depends on the count); ``None`` when there is nothing to redo or no split fits."""
        if best.estimate or best.micro_batches == (best.solved_at or best.micro_batches):
            return None
        kind, v, m = best.schedule, best.stages_per_device, best.micro_batches
        bg, p = self.graph(v, m), self.p
        if len(bg.blocks) < p * v:
            return None
        solved = self.solve(bg, kind, m, v, best.ranks, explain=False)
        if solved is None:
            return None
        bg, stage_of, status, bound_s = solved
        tl = self.setup.simulate(bg, stage_of, p, v, self.spec, kind, m)
        if max(tl.peak_memory_bytes) > self.limit:
            return None
        candidate = _Candidate(kind, m, v, bg, stage_of, tl, status, bound_s, best.ranks)
        self.candidates.append(candidate)
        return candidate

    def assignment(
        self, bg: BlockGraph, kind: str, m: int, v: int, ranks: tuple[int, ...]
    ) -> _Solved | None:
        """The split for ``kind`` at ``m`` micro-batches; ``None`` where no split fits memory
        (recorded as a miss), and where the split solved for its faster twin does not fit it
        (:data:`_FASTER_TWIN`: a split of its own would be no faster than the twin's)."""
        p, setup = self.p, self.setup
        in_flight = in_flight_per_stage(kind, p, m, v)
        reuse = self.solved.get(ranks)
        if (
            reuse is not None
            and (kind not in SPLIT_BACKWARD or not reuse.bg.recomputed)
            and _fits(
                per_micro_batch(reuse.bg, m),
                reuse.stage_of,
                (in_flight, m),
                ranks,
                setup.state_per_byte,
                setup.limit,
            )
        ):
            # GPipe keeps more micro-batches in flight than 1F1B and nothing else differs, so an
            # optimal 1F1B assignment that also fits GPipe's memory is optimal for GPipe too; the
            # same holds between any two schedules of one stage layout.
            return reuse
        if reuse is not None and self.solved_for[ranks] == (_FASTER_TWIN.get(kind), m):
            return None  # its own split could not run faster than the twin's (_FASTER_TWIN)
        for failed, failed_m, offered, exc in self.infeasible.get(ranks, []):
            if (
                failed_m == m
                and offered >= self.may_recompute(kind)
                and all(a >= b for a, b in zip(in_flight, failed))
            ):
                # the same model with at least as many activations in flight: no split fits
                self.missed.append((kind, v, m, exc.minimum_bytes))
                return None
        # The least memory a split needs is found (a second solve) for the one-stage layout; the
        # others only say they miss, unless the request has no one-stage schedule to explain.
        explain = ranks == tuple(range(p)) or not any(k in ONE_STAGE_KINDS for k in setup.kinds)
        try:
            sol = self.solve_or_raise(bg, kind, m, v, ranks, explain=explain)
        except InfeasibleMemoryError as exc:
            # The most micro-batches is this schedule's leanest count (1F1B keeps min(p - s, m)
            # of m micro-batches in flight, GPipe all m: a share of the batch that never grows
            # with m), so no count of it fits: the other schedules may.
            if explain:
                self.misses.append((kind, m, exc))
            self.missed.append((kind, v, m, exc.minimum_bytes))
            offered = self.may_recompute(kind)
            self.infeasible.setdefault(ranks, []).append((in_flight, m, offered, exc))
            return None
        except AutopartError as exc:  # no split within the time limit: the other layouts may
            self.failed.append(exc)
            return None
        self.solved[ranks], self.solved_for[ranks] = sol, (kind, m)
        return self.solved[ranks]

    def may_recompute(self, kind: str) -> bool:
        """Whether the stage ILP may choose to recompute blocks under ``kind`` (``--recompute
        auto``, and a schedule that runs the whole backward at once: torch's split backward
        would run a recomputed forward twice)."""
        return self.setup.request.recompute == "auto" and kind not in SPLIT_BACKWARD

    def solve_or_raise(
        self, bg: BlockGraph, kind: str, m: int, v: int, ranks: tuple[int, ...], *, explain: bool
    ) -> _Solved:
        """The stage ILP for ``kind`` at ``m`` micro-batches; raises where no split fits or none
        is found in time."""
        if not self.may_recompute(kind):
            return self.solve_once(bg, kind, m, v, ranks, explain=explain)
        layers = layer_units(bg)
        if len(layers.blocks) < self.p * v:  # too few layers to cut: keep every activation
            return self.solve_once(bg, kind, m, v, ranks, explain=explain)
        try:
            return self.solve_once(bg, kind, m, v, ranks, explain=False)
        except InfeasibleMemoryError as exc:
            if not explain:  # a schedule that cannot recompute, as many in flight: none fits
                in_flight = in_flight_per_stage(kind, self.p, m, v)
                self.infeasible.setdefault(ranks, []).append((in_flight, m, False, exc))
            # no split keeps every activation: offer recomputation, on blocks of whole layers
            return self.solve_once(layers, kind, m, v, ranks, explain=explain, recompute=True)

    def solve_once(
        self,
        bg: BlockGraph,
        kind: str,
        m: int,
        v: int,
        ranks: tuple[int, ...],
        *,
        explain: bool,
        recompute: bool = False,
    ) -> _Solved:
        """One stage ILP solve of ``bg``'s blocks (``recompute``: each may recompute)."""
        p, setup, scaled = self.p, self.setup, per_micro_batch(bg, m)
        self.say(f"solving {p * v} stages for {kind}, {m} micro-batches ({len(bg.blocks)} blocks)")
        in_flight = in_flight_per_stage(kind, p, m, v)
        # with recomputation, from every layer recomputed: a plan wherever that fits
        hint_recompute = tuple(b.index for b in scaled.blocks if recompute and b.can_recompute)
        hinted = scaled.with_recompute(hint_recompute) if hint_recompute else scaled
        hint = baselines.chain_dp(hinted, p * v, self.spec)
        sol = solve_stages(
            scaled,
            p * v,
            self.spec,
            in_flight=in_flight,
            reserved_bytes=reserved_bytes(scaled, ranks, in_flight),
            working_floor_bytes=working_floor_bytes(scaled, ranks),
            micro_batches=m,
            state_bytes_per_param_byte=setup.state_per_byte,
            memory_limit_bytes=setup.limit,
            stages_per_device=v,
            device_of_stage=ranks,
            hint=hint,
            hint_recompute=hint_recompute,
            time_limit_s=setup.request.time_limit_s,
            explain=explain,
            recompute=recompute,
        )
        recomputes = sol.recompute or sol.selective
        solved_bg = bg.with_recompute(sol.recompute, sol.selective) if recomputes else bg
        return _Solved(solved_bg, sol.stage_of, sol.status, sol.objective_bound_s)

    def solve(
        self, bg: BlockGraph, kind: str, m: int, v: int, ranks: tuple[int, ...], *, explain: bool
    ) -> _Solved | None:
        """:meth:`solve_or_raise`, ``None`` where it finds no split."""
        try:
            return self.solve_or_raise(bg, kind, m, v, ranks, explain=explain)
        except AutopartError:
            return None

    def options(self, pipe: _Pipeline) -> tuple[ScheduleOption, ...]:
        """Every schedule compared, fastest first, then those that do not fit (leanest first)."""
        rows = [
            ScheduleOption(
                c.schedule,
                c.stages_per_device,
                c.micro_batches,
                c.timeline.step_time_s + _tail_of(c, pipe),
                int(max(c.timeline.peak_memory_bytes)),
                int(max(c.timeline.peak_memory_bytes)) <= self.limit,
                estimate=c.estimate,
            )
            for c in (*self.candidates, *self.over)
        ]
        rows += [ScheduleOption(k, v, m, 0.0, need, False) for k, v, m, need in self.missed]
        return tuple(
            sorted(
                rows, key=lambda o: (not o.fits, o.step_time_s if o.fits else o.peak_memory_bytes)
            )
        )


_LAYOUT_SLACK = 0.10
_EQUAL_STEP = 0.01
"""Predicted steps this close to the fastest are taken as equal, and the least peak memory among
them chosen (the fullest device's, then the sum over devices): the simulation is not that exact (measured on CPU, GPipe ran 10% slower than 1F1B
predicted 0.2% apart: benchmarks/results/2026-12-04-schedule-oracle.md)."""
"""A stage layout is solved when its estimate is within this of the fastest plan found (the ILP
rarely beats the chain DP's split by more where memory does not bind)."""

_NEAR_LIMIT = 0.10
"""A layout whose contiguous split misses the memory limit by at most this share is still solved
when its estimate is close to the fastest found: the stage ILP, minding memory, may find a split
that fits at little cost (gpt2 on pp=4 at 1,100 MiB, ``--recompute none``: 1F1B's contiguous
split misses by 9%, its ILP split fits, 13.9 ms against the 14.8 ms interleaved plan auto kept
before). A heuristic: at 1,000 MiB (20% over) 1F1B is still not solved and auto keeps 16.7 ms
where ``--schedule 1f1b`` plans 16.3."""

_FASTER_TWIN = {"gpipe": "1f1b"}
"""A schedule -> one that runs any split at least as fast at the same micro-batch count while
keeping no more micro-batches in flight on any stage (GPipe keeps all ``m``, 1F1B at most
``p - s``): every split that fits the first fits the second, and the stage ILP's objective (the
slowest device's time) does not depend on the schedule, so the second's optimum is no slower. Its
stage solve is skipped once the twin's split is solved for the same layout and count."""

_MOST_LAYOUT_SOLVES = 3
"""Stage layouts solved at most once one fits (each solve may take the time limit)."""


def _near(c: _Candidate, limit: int) -> bool:
    """Whether ``c``'s fullest device is within :data:`_NEAR_LIMIT` of ``limit``."""
    return max(c.timeline.peak_memory_bytes) <= limit * (1 + _NEAR_LIMIT)


def _best_first(estimates: Sequence[_Candidate], pipe: _Pipeline) -> tuple[bool, float]:
    """Sort key of a stage layout: fitting ones by their fastest estimate, then by the leanest."""
    limit = pipe.setup.limit
    fits = [c for c in estimates if max(c.timeline.peak_memory_bytes) <= limit]
    if fits:
        return (False, min(c.timeline.step_time_s + _tail_of(c, pipe) for c in fits))
    return (True, min((max(c.timeline.peak_memory_bytes) for c in estimates), default=0))


def _tail_of(c: _Candidate, pipe: _Pipeline) -> float:
    """The dp gradient sync and the optimizer step after ``c``'s pipeline drains."""
    return _tail(c.bg, c.stage_of, c.ranks, c.micro_batches, c.schedule, pipe)


def _tail(
    bg: BlockGraph,
    stage_of: Sequence[int],
    ranks: Sequence[int],
    m: int,
    kind: str,
    pipe: _Pipeline,
) -> float:
    """The dp gradient sync and the optimizer step after the pipeline of ``bg`` split as
    ``stage_of`` over ``ranks`` at ``m`` micro-batches of schedule ``kind`` drains."""
    params = bg.stage_param_bytes(stage_of, len(ranks))
    hidden = _hidden(bg, stage_of, len(ranks), m, kind, pipe)
    again: list[float] = []
    if pipe.setup.reshards(kind):
        units = unit_param_bytes(bg, stage_of, len(ranks))  # parameters: not scaled
        again = per_device([sum(u.values()) for u in units], ranks)
    return pipe.tail_s(per_device(params, ranks), m, per_device(hidden, ranks), again)


def _hidden(
    bg: BlockGraph, stage_of: Sequence[int], num_stages: int, m: int, kind: str, pipe: _Pipeline
) -> list[float]:
    """Per stage, the all-gathers its layers hide (:func:`hidden_gathers_s`; none without fsdp,
    where the block graph need not be scaled)."""
    if pipe.setup.fsdp <= 1:
        return [0.0] * num_stages
    return pipe.hidden_s(per_micro_batch(bg, m), stage_of, num_stages, kind)


def most_stages(og: OpGraph) -> int:
    """The most pipeline stages worth cutting ``og`` into: one per repeated layer (a graph without
    repeated layers: one per computing node)."""
    layers = len({n.layer for n in og.nodes.values() if n.layer is not None})
    return layers if layers >= 2 else len(og.order)


def schedule_layouts(
    options: Mapping[str, Sequence[int]], setup: PlanningSetup, p: int, most: int
) -> list[tuple[str, int, Sequence[int]]]:
    """Every (schedule, stages per rank, micro-batch counts) to compare on ``p`` ranks: each
    schedule at its least stage count, and at more only while every stage can still hold a layer
    (``p * v <= most``, :func:`most_stages`)."""
    out = []
    for kind, counts in options.items():
        per_rank = setup.stage_counts(kind)
        out += [(kind, v, counts) for v in per_rank if v == per_rank[0] or p * v <= most]
    return out


def _no_fit_error(
    limit: int,
    p: int,
    misses: Sequence[tuple[str, int, InfeasibleMemoryError]],
    simulated: Sequence[tuple[int, str, int]],
) -> AutopartError:
    """The error when no schedule fits: the stage ILP's proven need where every schedule it solved
    missed the limit, else the leanest simulated schedule."""
    if misses and not simulated:
        kind, m, exc = min(misses, key=lambda miss: miss[2].minimum_bytes)
        need = exc.need
        fewer = "" if any(k == "1f1b" for k, _, _ in misses) else ", or use the 1f1b schedule"
        kept = "in-flight activations"
        if exc.recomputed:
            kept += ", with every layer recomputed where that saves memory"
        return InfeasibleMemoryError(
            f"no schedule fits {format_bytes(limit)} per device on {p} pipeline stages: the "
            f"leanest, {kind} with {m} micro-batches, {need.needs(format_bytes_up)} (parameters, "
            f"gradients, optimizer state, shared parameters on every stage that uses them, and "
            f"{kept}). {need.raise_to(format_bytes_up)}, add devices (more stages){fewer}.",
            exc.minimum_bytes,
            need=need,
            reason=f"the leanest, {kind} with {m} micro-batches, {need.needs(format_bytes_up)}",
            recomputed=exc.recomputed,
        )
    peak, kind, m = min(simulated)
    return NoScheduleFitsError(
        f"no schedule and micro-batch count fits {format_bytes(limit)} per device once in-flight "
        f"activations are simulated: the leanest, {kind} with {m} micro-batches, peaks at "
        f"{format_bytes_up(peak)}; raise --memory, add devices (more stages) or use a larger --batch.",
        reason=f"the leanest, {kind} with {m} micro-batches, peaks at {format_bytes_up(peak)}",
    )


def _tp_section(tp: TPCostsOf, plan: Plan, batch: int, per_replica: int) -> TPSection:
    """The plan's ``tp`` section; ``comm_bytes_per_step`` is what the busiest rank sends: the
    collectives of its stages, on its replica's share of the batch (``batch / per_replica`` times
    the traced graph's)."""
    p = plan.mesh["pp"]
    sent = [0] * p
    for node, nbytes in tp.costs.comm_bytes_by_node.items():
        sent[plan.stages[plan.stage_of[node]].device] += nbytes
    return dataclasses.replace(
        TPSection.from_tp_plan(tp.plan), comm_bytes_per_step=max(sent) * batch // per_replica
    )


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pipeline:
    """The pipeline a plan is made for."""

    setup: PlanningSetup
    spec: DeviceSpec
    """The setup's device with the link that pipeline sends take (:func:`pipeline_device`)."""
    p: int
    tail_s: Callable[[Sequence[float], int, Sequence[float], Sequence[float]], float]
    """Time added to a step after the pipeline drains (the dp gradient sync and the optimizer
    step, :func:`step_tail_s`), from the parameter bytes of each device, the micro-batch count,
    the gathers each device hides and the bytes of its layers that reshard after forward."""
    hidden_s: Callable[[BlockGraph, Sequence[int], int, str], list[float]]
    """:func:`hidden_gathers_s` on this pipeline: per stage, from a block graph at one
    micro-batch, a split and its stage count."""


def _make_plan(best: _Candidate, og: OpGraph, pipe: _Pipeline, elapsed_s: float) -> Plan:
    """The plan of ``best``."""
    p, spec, ranks = pipe.p, pipe.spec, best.ranks
    m, v, bg = best.micro_batches, best.stages_per_device, best.bg
    num_stages = p * v
    scaled = per_micro_batch(bg, m)
    times = stage_times_s(scaled, best.stage_of, num_stages, spec, ranks=ranks)
    bottleneck = max(per_device(times, ranks))
    bound = _device_lower_bound_s(scaled, og.scaled(1.0 / m), ranks, spec)
    stage_of_node = {n: s for blk, s in zip(bg.blocks, best.stage_of) for n in blk.nodes}
    param_bytes = bg.stage_param_bytes(best.stage_of, num_stages)
    split = split_backward_factor(best.schedule, spec)
    memory = stage_memory(scaled, best.stage_of, num_stages, m)
    hidden = _hidden(bg, best.stage_of, num_stages, m, best.schedule, pipe)
    setup = pipe.setup
    later = deferred_state(
        scaled,
        best.stage_of,
        num_stages,
        m,
        grad_per_byte=setup.deferred_grad_per_byte,
        reshard=setup.reshards(best.schedule),
    )
    resharded = [0] * num_stages
    if setup.reshards(best.schedule):
        resharded = [sum(u.values()) for u in unit_param_bytes(scaled, best.stage_of, num_stages)]
    stages = []
    for s in range(num_stages):
        blocks = [b for b, st in zip(scaled.blocks, best.stage_of) if st == s]
        stages.append(
            StagePlan(
                index=s,
                device=ranks[s],
                modules=_summarize_modules([mod for b in blocks for mod in b.modules]),
                node_count=sum(len(b.nodes) for b in blocks),
                forward_s=sum(b.forward_s for b in blocks),
                backward_s=sum(b.backward_s for b in blocks) * split,
                backward_weight_s=sum(b.backward_weight_s for b in blocks) * split,
                predicted_s=times[s],
                param_bytes=param_bytes[s],
                peak_memory_bytes=int(best.timeline.peak_memory_bytes[ranks[s]]),
                activation_bytes=memory.kept[s],
                recompute_s=sum(b.recompute_s for b in blocks),
                rematerialized_bytes=max(b.rematerialized_bytes for b in blocks),
                working_bytes=memory.working[s],
                buffer_bytes=memory.buffers[s],
                hidden_gather_s=hidden[s],
                deferred_bytes=int(later.deferred[s]),
                forward_gathered_bytes=int(later.forward[s]),
                first_backward_bytes=int(later.first_backward[s]) if later.deferred[s] else 0,
                resharded_param_bytes=resharded[s],
            )
        )
    return Plan(
        model=pipe.setup.name,
        mesh={"pp": p},
        device=spec.name,
        memory_limit_bytes=pipe.setup.limit,
        schedule=best.schedule,
        micro_batches=m,
        stages_per_device=v,
        stages=tuple(stages),
        stage_of=stage_of_node,
        bottleneck_s=bottleneck,
        lower_bound_s=bound,
        gap=bottleneck / bound - 1 if bound > 0 else 0.0,
        step_time_s=best.timeline.step_time_s + _tail_of(best, pipe),
        bubble_fraction=best.timeline.bubble_fraction,
        solver=SolverInfo(
            status=best.status,
            time_s=elapsed_s,
            blocks=len(bg.blocks),
            objective_bound_s=best.bound_s,
        ),
        baselines=_baselines(scaled, best, pipe),
        optimizer=pipe.setup.optimizer,
        precision=pipe.setup.request.precision,
        boundary_bytes=tuple(scaled.boundary_bytes(best.stage_of, num_stages)),
        recompute=_recomputed(scaled, best.stage_of),
    )


def _recomputed(scaled: BlockGraph, stage_of: Sequence[int]) -> tuple[RecomputedBlock, ...]:
    """The plan's record of the blocks that recompute (``scaled``: costs of one micro-batch)."""
    return tuple(
        RecomputedBlock(
            name=b.name,
            stage=s,
            nodes=b.nodes,
            recompute_s=b.recompute_s,
            # what it no longer keeps: in full, all but its inputs; selectively, what it rebuilds
            saved_bytes=b.rematerialized_bytes - (0 if b.selectively else b.activation_bytes),
            selective=b.selectively,
        )
        for b, s in zip(scaled.blocks, stage_of)
        if b.recomputed
    )


def _baselines(scaled: BlockGraph, best: _Candidate, pipe: _Pipeline) -> dict[str, BaselineResult]:
    """The equal-layers and equal-parameters splits under ``best``'s schedule, on ``scaled``
    (``best``'s block graph at one micro-batch)."""
    p, spec, bg, v, m = pipe.p, pipe.spec, best.bg, best.stages_per_device, best.micro_batches
    num_stages, ranks = p * v, best.ranks
    base = {}
    for label, fn in (
        ("equal_layers", baselines.equal_layers),
        ("equal_params", baselines.equal_params),
    ):
        stage_of = fn(scaled, num_stages)
        tl = pipe.setup.simulate(bg, stage_of, p, v, spec, best.schedule, m)
        t = stage_times_s(scaled, stage_of, num_stages, spec, ranks=ranks)
        tail = _tail(bg, stage_of, ranks, m, best.schedule, pipe)
        base[label] = BaselineResult(max(per_device(t, ranks)), tl.step_time_s + tail)
    return base


def _state_per_device(
    bg: BlockGraph, stage_of: Sequence[int], ranks: Sequence[int], state_per_byte: float
) -> list[float]:
    """Parameter, gradient and optimizer-state bytes each pipeline rank holds (a parameter shared
    by several stages counted on each: :meth:`BlockGraph.stage_param_bytes`)."""
    param_bytes = bg.stage_param_bytes(stage_of, len(ranks))
    return per_device([nbytes * state_per_byte for nbytes in param_bytes], ranks)


def _device_lower_bound_s(
    bg: BlockGraph, og: OpGraph, ranks: Sequence[int], spec: DeviceSpec
) -> float:
    """A true lower bound on the slowest device's time per micro-batch. With one stage per device
    it is the stage bound of :func:`autopart.solver.cost.lower_bound_s`. With several stages per
    device, a device's time is a sum of stage times, so it is at least the stage bound for all
    the stages (a stage at a V's turn hands one boundary over locally, but shares its device with
    the stage across it, which pays at least as much on its other side), and at least the average
    device load: all compute plus, for each boundary between two devices, two messages of at
    least the smallest tensor's transfer time."""
    p, num_stages = max(ranks) + 1, len(ranks)
    if num_stages == p:
        return lower_bound_s(bg, p, spec, og)
    stage_bound = lower_bound_s(bg, num_stages, spec, og)
    smallest = min((t.nbytes for t in bg.tensors), default=0)
    crossings = sum(a != b for a, b in itertools.pairwise(ranks))
    average = (bg.total_compute_s + 2 * crossings * p2p_time_s(smallest, spec)) / p
    return max(stage_bound, average)


def simulate_plan(plan: Plan, device: DeviceSpec | None = None) -> Any:
    """The schedule timeline of a plan (for Gantt charts), from the costs it records (without
    the output gradients a deferred weight gradient keeps, which a plan does not record), the
    step ending after the gradient sync and the optimizer step (:func:`step_tail_s`).
    ``device`` is the spec it was planned on where that is not the table's (measured links)."""
    p = plan.mesh["pp"]
    spec = pipeline_device(
        device or get_device(plan.device),
        pp=p,
        tp=plan.mesh.get("tp", 1),
        replicas=plan.mesh.get("dp", 1) * plan.mesh.get("fsdp", 1),
    )
    state_per_byte = state_bytes_per_param_byte(
        plan.optimizer,
        fsdp=plan.mesh.get("fsdp", 1),
        mixed_precision=as_precision(plan.precision).is_mixed,
    )
    state = [st.param_bytes * state_per_byte - st.deferred_bytes for st in plan.stages]
    ranks = [st.device for st in plan.stages]
    tail_s = step_tail_s(
        per_device([st.param_bytes for st in plan.stages], ranks),
        plan.micro_batches,
        optimizer=plan.optimizer,
        mixed_precision=as_precision(plan.precision).is_mixed,
        spec=device or get_device(plan.device),
        dp=plan.mesh.get("dp", 1),
        pp=p,
        tp=plan.mesh.get("tp", 1),
        fsdp=plan.mesh.get("fsdp", 1),
        hidden_s=per_device([st.hidden_gather_s for st in plan.stages], ranks),
        regather_bytes=per_device([st.resharded_param_bytes for st in plan.stages], ranks)
        if plan.reshard_after_forward
        else (),
    )
    rebuilt = [0] * p
    for st in plan.stages:
        rebuilt[st.device] = max(rebuilt[st.device], st.rematerialized_bytes)
    buffers = per_device([st.buffer_bytes for st in plan.stages], ranks)
    return simulate(
        build_schedule(plan.schedule, p, plan.micro_batches, plan.stages_per_device),
        [s.forward_s for s in plan.stages],
        [s.backward_s for s in plan.stages],
        backward_weight_s=[s.backward_weight_s for s in plan.stages],
        comm_s=[p2p_time_s(b, spec) for b in plan.boundary_bytes],
        activation_bytes=[s.activation_bytes for s in plan.stages],
        static_bytes=[
            int(b) + r + int(extra)
            for b, r, extra in zip(per_device(state, ranks), rebuilt, buffers)
        ],
        working_bytes=[s.working_bytes for s in plan.stages],
        action_overhead_s=spec.pipeline_action_s,
        tail_s=tail_s,
        cores=spec.shared_cores,
        deferred=_deferred(plan),
    )


def _deferred(plan: Plan) -> Deferred | None:
    """The state a plan records as held from each stage's first backward on (``None``: none,
    as in a plan without FSDP)."""
    if not any(st.deferred_bytes for st in plan.stages):
        return None
    return Deferred(
        [st.deferred_bytes for st in plan.stages],
        [st.forward_gathered_bytes for st in plan.stages],
        [st.first_backward_bytes for st in plan.stages],
    )


def split_backward_factor(kind: str, spec: DeviceSpec) -> float:
    """What a stage's backward time is multiplied by under ``kind`` on ``spec``: the device's
    :attr:`~autopart.cost_models.devices.DeviceSpec.split_backward_factor` for the schedules
    that split it (:data:`SPLIT_BACKWARD`), else 1."""
    if kind in SPLIT_BACKWARD and spec.split_backward_factor is not None:
        return spec.split_backward_factor
    return 1.0


def simulate_blocks(
    bg: BlockGraph,
    stage_of: Sequence[int],
    p: int,
    v: int,
    spec: DeviceSpec,
    kind: str,
    m: int,
    state_per_byte: float,
    *,
    grad_per_byte: float = 0.0,
    reshard: bool = False,
) -> Any:
    """The simulated step of ``bg`` split as ``stage_of`` over ``p`` ranks, ``v`` stages each,
    under schedule ``kind`` at ``m`` micro-batches, each device holding ``state_per_byte`` bytes
    per parameter byte of its stages; of those, ``grad_per_byte`` (FSDP2's unsharded gradients)
    and, with ``reshard``, its layers' parameters are held only from each stage's first backward
    on (:func:`~autopart.planning.stage_memory.deferred_state`)."""
    scaled = per_micro_batch(bg, m)
    num_stages, ranks = p * v, stage_ranks(kind, p, v)
    fwd, bwd, weight = [0.0] * num_stages, [0.0] * num_stages, [0.0] * num_stages
    grads = [0] * num_stages
    for b, s in zip(scaled.blocks, stage_of):
        fwd[s] += b.forward_s
        bwd[s] += b.backward_s
        weight[s] += b.backward_weight_s
        grads[s] += b.weight_grad_bytes
    memory = stage_memory(scaled, stage_of, num_stages, m)
    comm = [p2p_time_s(nb, spec) for nb in scaled.boundary_bytes(stage_of, num_stages)]
    split = split_backward_factor(kind, spec)
    bwd, weight = [b * split for b in bwd], [w * split for w in weight]
    static = _held_per_device(scaled, stage_of, ranks, state_per_byte)
    later = None
    if grad_per_byte > 0 or reshard:
        later = deferred_state(
            scaled, stage_of, num_stages, m, grad_per_byte=grad_per_byte, reshard=reshard
        )
        static = [b - d for b, d in zip(static, per_device(later.deferred, ranks))]
    return simulate(
        build_schedule(kind, p, m, v),
        fwd,
        bwd,
        backward_weight_s=[min(w, b) for w, b in zip(weight, bwd)],
        comm_s=comm,
        activation_bytes=memory.kept,
        weight_grad_bytes=grads,
        static_bytes=[
            int(b + extra) for b, extra in zip(static, per_device(memory.buffers, ranks))
        ],
        working_bytes=memory.working,
        action_overhead_s=spec.pipeline_action_s,
        cores=spec.shared_cores,
        deferred=later,
    )


def _held_per_device(
    scaled: BlockGraph, stage_of: Sequence[int], ranks: Sequence[int], state_per_byte: float
) -> list[float]:
    """What each device holds besides in-flight activations: its training state and, where a
    block recomputes, the most one such block rebuilds during its backward."""
    state = _state_per_device(scaled, stage_of, ranks, state_per_byte)
    rebuilt = scaled.rematerialized_bytes(stage_of, ranks)
    return [held + extra for held, extra in zip(state, rebuilt)]


@functools.lru_cache(maxsize=64)
def per_micro_batch(bg: BlockGraph, micro_batches: int) -> BlockGraph:
    """``bg``'s block costs for one of ``micro_batches`` micro-batches (memoized). Its node graph
    is left out: scaling it re-derives every node of a 70B graph, and the lower bound is given
    the node graph explicitly."""
    return dataclasses.replace(bg, op_graph=None).scaled(1.0 / micro_batches)


def _fits(
    bg: BlockGraph,
    stage_of: Sequence[int],
    flight: tuple[Sequence[int], int],
    ranks: Sequence[int],
    state_per_byte: float,
    limit: int,
) -> bool:
    """Whether an assignment fits memory, counted as the stage ILP counts it: ``flight =
    (in_flight, m)``, each stage's in-flight micro-batches kept at once (:func:`stage_memory`),
    its pipeline buffers for ``m``, and each device's largest working set on top."""
    in_flight, m = flight
    held = _held_per_device(bg, stage_of, ranks, state_per_byte)
    memory = stage_memory(bg, stage_of, len(ranks), m)
    working = [0] * len(held)
    for s, device in enumerate(ranks):
        held[device] += in_flight[s] * memory.kept[s] + memory.buffers[s]
        working[device] = max(working[device], memory.working[s])
    return max(h + w for h, w in zip(held, working)) <= limit


def in_flight_per_stage(kind: str, p: int, m: int, v: int) -> list[int]:
    """Micro-batches whose activations each stage keeps (DESIGN.md: 1F1B keeps p - s on stage s,
    GPipe all m). Ranks of several stages hold up to the simulated count of (stage, micro-batch)
    pairs (:func:`~autopart.planning.schedule.in_flight_micro_batches`), spread over their v
    stages."""
    if kind == "gpipe":
        return [m] * p
    if kind == "1f1b":
        return [min(p - s, m) for s in range(p)]
    per_rank = [in_flight_micro_batches(kind, p, m, r, v) for r in range(p)]
    return [math.ceil(per_rank[r] / v) for r in stage_ranks(kind, p, v)]


def _micro_batch_options(
    batch: int, p: int, micro_batches: int | None, kinds: Sequence[str]
) -> dict[str, list[int]]:
    """Valid micro-batch counts per schedule, most first (the smallest bubble; simulation decides).
    A count must divide the batch and be accepted by the schedule (1F1B needs at least p)."""
    if micro_batches is not None and (micro_batches < 1 or batch % micro_batches):
        raise AutopartError(
            f"the batch of {batch} does not split into {micro_batches} equal micro-batches; pick a "
            f"divisor of {batch} for --micro-batches (or change --batch).",
            reason=f"the batch of {batch} does not split into {micro_batches} micro-batches",
        )
    counts = (
        [micro_batches]
        if micro_batches is not None
        else [d for d in range(1, batch + 1) if batch % d == 0 and d <= 8 * p]
    )
    options: dict[str, list[int]] = {}
    errors: list[str] = []
    for kind in kinds:
        valid = []
        for m in sorted(counts, reverse=True):
            try:
                build_schedule(kind, p, m, stage_counts(kind)[0])
                valid.append(m)
            except ScheduleError as exc:
                errors.append(str(exc))
        if valid:
            options[kind] = valid
    if not options and micro_batches is not None:
        raise AutopartError(
            f"{micro_batches} micro-batches cannot run on {p} pipeline stages: {errors[0]}",
            reason=f"{micro_batches} micro-batches cannot run on {p} pipeline stages",
        )
    if not options:
        raise AutopartError(
            f"no schedule in {', '.join(kinds)} can run {p} pipeline stages on a batch of {batch} "
            f"split into {counts} micro-batches ({errors[0] if errors else ''}); raise --batch to a "
            "multiple of the stage count or use --schedule gpipe.",
            reason=f"no schedule in {', '.join(kinds)} can run {p} stages on a batch of {batch}",
        )
    return options


def _summarize_modules(modules: Sequence[str]) -> tuple[str, ...]:
    """Distinct module paths in order, shortened to their repeated-layer prefix where possible."""
    out: dict[str, None] = {}
    for mod in modules:
        parts = mod.split(".")
        cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts))
        out[".".join(parts[:cut]) or "<root>"] = None
    return tuple(out)


def batch_size(example_inputs: Any) -> int:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    raise AutopartError(
        "cannot tell the batch size: no example input is a tensor with a batch dimension."
    )
