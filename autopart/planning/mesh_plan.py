"""Planning one mesh: the stage ILP on TP-adjusted costs, every schedule and micro-batch count
simulated, the fastest that fits memory kept (:func:`plan_mesh`), and the pieces the mesh search
shares with it (:func:`planning_setup`, :func:`solve_tp_costs`, :func:`simulate_blocks`, ...).
:mod:`autopart.planning.planner` holds the entry points, which call this or the mesh search."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autopart.cost_models.comm import all_reduce_time_s, p2p_time_s
from autopart.cost_models.devices import DeviceSpec, get_device
from autopart.cost_models.memory import Optimizer, as_optimizer
from autopart.errors import AutopartError
from autopart.planning.graph import BlockGraph, OpGraph, coarsen
from autopart.planning.plans import (
    BaselineResult,
    Plan,
    SolverInfo,
    StagePlan,
    TPSection,
)
from autopart.planning.schedule import (
    ScheduleError,
    ScheduleKind,
    build_schedule,
    in_flight_micro_batches,
    simulate,
)
from autopart.solver import baselines
from autopart.solver.cost import lower_bound_s, stage_times_s
from autopart.solver.stage_ilp import InfeasibleMemoryError, solve_stages
from autopart.solver.tp_costs import TPCosts, tp_costs
from autopart.solver.tp_ilp import TPPlan, solve_tp
from autopart.units import format_bytes, format_bytes_up

__all__ = [
    "GPUS_PER_NODE",
    "MEMORY_ERRORS",
    "NoScheduleFitsError",
    "PlanningSetup",
    "TPCostsOf",
    "batch_size",
    "dp_sync_s",
    "in_flight_per_stage",
    "is_auto_mesh",
    "micro_batch_options",
    "per_micro_batch",
    "pipeline_device",
    "plan_mesh",
    "planning_setup",
    "simulate_blocks",
    "simulate_plan",
    "solve_tp_costs",
]

_SCHEDULES = tuple(ScheduleKind)
_INTERLEAVE = 2  # stages per rank for the interleaved schedule (Megatron's virtual pipeline)


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
    """What every mesh of one planning request shares."""

    spec: DeviceSpec
    limit: int
    """Memory per device in bytes."""
    optimizer: str
    state_per_byte: float
    """Bytes of parameter + gradient + optimizer state per parameter byte."""
    schedule: str
    kinds: tuple[str, ...]
    """The schedules compared (auto: 1F1B and GPipe)."""


@dataclass(frozen=True, slots=True, eq=False)
class TPCostsOf:
    """A solved TP plan and the TP-adjusted costs of the graph it was solved on."""

    plan: TPPlan
    costs: TPCosts


def is_auto_mesh(mesh: object) -> bool:
    return isinstance(mesh, str) and mesh.strip().lower() == "auto"


def planning_setup(
    *,
    device: str | DeviceSpec,
    memory: int | str | None,
    schedule: str,
    optimizer: str,
    pp: int | None = None,
) -> PlanningSetup:
    """Check the request's options (before any tracing or solving) and resolve them."""
    from autopart.units import parse_bytes

    spec = get_device(device)
    limit = parse_bytes(memory) if memory is not None else spec.memory_bytes
    opt = as_optimizer(optimizer)
    if schedule not in ("auto", *_SCHEDULES):
        raise AutopartError(f"unknown schedule {schedule!r}; use auto, {', '.join(_SCHEDULES)}.")
    if schedule == ScheduleKind.INTERLEAVED and pp is not None and pp < 2:
        raise AutopartError(
            "the interleaved schedule needs at least 2 pipeline ranks; use --mesh pp=2 or more."
        )
    # Auto compares the two one-stage-per-rank schedules; interleaving is planned when asked for.
    kinds = ("1f1b", "gpipe") if schedule == "auto" else (schedule,)
    return PlanningSetup(spec, limit, optimizer, 2 + opt.states_per_param, schedule, kinds)


def micro_batch_options(
    batch: int, dp: int, p: int, micro_batches: int | None, kinds: Sequence[str]
) -> dict[str, list[int]]:
    """Valid micro-batch counts per schedule for each of ``dp`` replicas (most first)."""
    if batch % dp:
        raise AutopartError(
            f"a batch of {batch} does not split across dp={dp} data-parallel replicas; use a batch "
            f"that is a multiple of {dp}."
        )
    return _micro_batch_options(batch // dp, p, micro_batches, kinds)


def solve_tp_costs(
    gm: torch.fx.GraphModule,
    og: OpGraph,
    degree: int,
    setup: PlanningSetup,
    *,
    micro_batches: int,
    time_limit_s: float,
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
        time_limit_s=time_limit_s,
    )
    return TPCostsOf(tp_plan, tp_costs(og, gm, tp_plan, micro_batches=micro_batches))


def pipeline_device(spec: DeviceSpec, *, pp: int, tp: int = 1) -> DeviceSpec:
    """``spec`` with the link that pipeline sends take: the network's where one replica's ``tp *
    pp`` ranks span more than a node (every boundary priced at it: conservative for the boundaries
    inside a node)."""
    if pp == 1 or tp * pp <= GPUS_PER_NODE:
        return spec
    return dataclasses.replace(
        spec,
        link_bandwidth_bytes_per_s=spec.network_bandwidth_bytes_per_s,
        link_latency_s=spec.network_latency_s,
        link_efficiency=spec.network_efficiency,
    )


def dp_sync_s(param_bytes_per_device: int, *, dp: int, pp: int, tp: int, spec: DeviceSpec) -> float:
    """Seconds of the data-parallel gradient all-reduce of one device's parameter shard (DDP's
    buckets after the pipeline drains, counted without overlap: an upper bound)."""
    if dp == 1:
        return 0.0
    inter_node = dp * pp * tp > GPUS_PER_NODE
    return all_reduce_time_s(param_bytes_per_device, dp, spec, inter_node=inter_node)


def plan_mesh(
    og_full: OpGraph,
    tp: TPCostsOf | None,
    setup: PlanningSetup,
    *,
    batch: int,
    dp: int,
    pp: int,
    options: Mapping[str, list[int]],
    name: str,
    time_limit_s: float,
    max_blocks: int | None = None,
    progress: Callable[[str], None] | None = None,
    start_s: float | None = None,
    graph_batch: int | None = None,
) -> Plan:
    """Plan the pipeline of one ``dp x pp x tp`` mesh on ``og_full`` (the graph traced at
    ``graph_batch`` samples, by default the global ``batch``; without ``tp`` the plain costs, with
    it ``og_full`` is ignored for the TP-adjusted graph): each replica plans on its share of the
    batch. A graph traced at one micro-batch is costed at the shapes it runs with."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter() if start_s is None else start_s
    p, degree = pp, (tp.plan.degree if tp is not None else 1)
    spec = pipeline_device(setup.spec, pp=p, tp=degree)
    limit, state_per_byte = setup.limit, setup.state_per_byte
    og = tp.costs.op_graph if tp is not None else og_full
    traced = graph_batch or batch
    if traced * dp != batch:  # costs for one replica's share of the batch
        og = og.scaled(batch / (dp * traced))
    if spec is not og.device:
        og = dataclasses.replace(og, device=spec)
    # Blocks per stage: with TP the stage ILP takes far longer to prove optimality on as many
    # blocks (Llama-70B, pp=8 x tp=8: 6.3 s on 186 blocks, 0.5 s on 95, the same plan), and the
    # forced chain-DP cuts keep the best contiguous split at any block count.
    per_stage = 24 if tp is None else 12
    graphs: dict[int, BlockGraph] = {}
    solved: dict[int, tuple[tuple[int, ...], str, float]] = {}
    candidates: list[_Candidate] = []
    misses: list[tuple[str, int, InfeasibleMemoryError]] = []
    simulated: list[tuple[int, str, int]] = []  # (peak bytes, schedule, micro-batches) over limit
    for kind in options:
        v = _INTERLEAVE if kind == ScheduleKind.INTERLEAVED else 1
        if v not in graphs:
            graphs[v] = coarsen(
                og, max_blocks=max_blocks or max(64, per_stage * p * v), num_stages=p * v
            )
        bg = graphs[v]
        if len(bg.blocks) < p * v:
            continue  # too few blocks for this many stages
        m = options[kind][0]
        scaled = per_micro_batch(bg, m)
        in_flight = in_flight_per_stage(kind, p, m, v)
        reuse = solved.get(v)
        if reuse is not None and _fits(scaled, reuse[0], in_flight, p, state_per_byte, limit):
            # GPipe keeps more micro-batches in flight than 1F1B and nothing else differs, so an
            # optimal 1F1B assignment that also fits GPipe's memory is optimal for GPipe too.
            stage_of, status, bound_s = reuse
        else:
            say(f"solving {p * v} stages for {kind}, {m} micro-batches ({len(bg.blocks)} blocks)")
            try:
                sol = solve_stages(
                    scaled,
                    p * v,
                    spec,
                    in_flight=in_flight,
                    state_bytes_per_param_byte=state_per_byte,
                    memory_limit_bytes=limit,
                    stages_per_device=v,
                    hint=baselines.chain_dp(scaled, p * v, spec),
                    time_limit_s=time_limit_s,
                )
            except InfeasibleMemoryError as exc:
                # The most micro-batches is this schedule's leanest count (1F1B keeps min(p - s,
                # m) of m micro-batches in flight, GPipe all m: a share of the batch that never
                # grows with m), so no count of it fits: the other schedules may.
                misses.append((kind, m, exc))
                continue
            stage_of, status, bound_s = sol.stage_of, sol.status, sol.objective_bound_s
            solved[v] = (stage_of, status, bound_s)
        for mm in options[kind]:
            timeline = simulate_blocks(bg, stage_of, p, v, spec, kind, mm, state_per_byte)
            peak = max(timeline.peak_memory_bytes)
            if peak <= limit:
                candidates.append(_Candidate(kind, mm, v, bg, stage_of, timeline, status, bound_s))
            else:
                simulated.append((int(peak), kind, mm))
    if not candidates:
        raise _no_fit_error(limit, p, misses, simulated)
    order = list(options)
    best = min(
        candidates, key=lambda c: (c.timeline.step_time_s, c.micro_batches, order.index(c.schedule))
    )

    # Data parallelism: after the pipeline drains, each rank all-reduces its stages' gradients
    # with its dp peers; the baselines pay it too.
    def sync_s(param_bytes_per_device: Sequence[int]) -> float:
        return max(
            dp_sync_s(nbytes, dp=dp, pp=p, tp=degree, spec=setup.spec)
            for nbytes in param_bytes_per_device
        )

    result = _make_plan(
        best,
        og,
        p,
        spec,
        limit,
        setup.optimizer,
        name,
        state_per_byte,
        time.perf_counter() - start,
        sync_s,
    )
    if dp == 1 and tp is None:
        return result
    mesh = {"dp": dp, "pp": p} if tp is None else {"dp": dp, "pp": p, "tp": degree}
    return dataclasses.replace(
        result,
        mesh=mesh,
        tp=_tp_section(tp, result, batch, dp * traced) if tp is not None else None,
    )


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
        return InfeasibleMemoryError(
            f"no schedule fits {format_bytes(limit)} per device on {p} pipeline stages: the "
            f"leanest, {kind} with {m} micro-batches, {need.needs(format_bytes_up)} (parameters, "
            "gradients, optimizer state, shared parameters on every stage that uses them, and "
            f"in-flight activations). {need.raise_to(format_bytes_up)}, add devices (more "
            f"stages){fewer}.",
            exc.minimum_bytes,
            need=need,
        )
    peak, kind, m = min(simulated)
    return NoScheduleFitsError(
        f"no schedule and micro-batch count fits {format_bytes(limit)} per device once in-flight "
        f"activations are simulated: the leanest, {kind} with {m} micro-batches, peaks at "
        f"{format_bytes_up(peak)}; raise --memory, add devices (more stages) or use a larger --batch."
    )


def _tp_section(tp: TPCostsOf, plan: Plan, batch: int, per_replica: int) -> TPSection:
    """The plan's ``tp`` section; ``comm_bytes_per_step`` is what the busiest rank sends: the
    collectives of its stages, on its replica's share of the batch (``batch / per_replica`` times
    the traced graph's)."""
    p = plan.mesh["pp"]
    sent = [0] * p
    for node, nbytes in tp.costs.comm_bytes_by_node.items():
        sent[plan.stage_of[node] % p] += nbytes
    return dataclasses.replace(
        TPSection.from_tp_plan(tp.plan), comm_bytes_per_step=max(sent) * batch // per_replica
    )


# ---------------------------------------------------------------------------------------------


def _make_plan(
    best: _Candidate,
    og: OpGraph,
    p: int,
    spec: DeviceSpec,
    limit: int,
    optimizer: str,
    name: str,
    state_per_byte: float,
    elapsed_s: float,
    sync_s: Callable[[Sequence[int]], float],
) -> Plan:
    """The plan of ``best``; ``sync_s(param bytes of each device)`` is the time added to a step
    after the pipeline drains (the dp gradient all-reduce)."""
    m, v, bg = best.micro_batches, best.stages_per_device, best.bg
    num_stages = p * v

    def per_device(param_bytes: Sequence[int]) -> list[int]:
        return [sum(param_bytes[s] for s in range(d, num_stages, p)) for d in range(p)]

    scaled = per_micro_batch(bg, m)
    times = stage_times_s(scaled, best.stage_of, num_stages, spec)
    device_time = [sum(times[s] for s in range(d, num_stages, p)) for d in range(p)]
    bottleneck = max(device_time)
    bound = _device_lower_bound_s(scaled, og.scaled(1.0 / m), p, v, spec)
    stage_of_node = {n: s for blk, s in zip(bg.blocks, best.stage_of) for n in blk.nodes}
    param_bytes = bg.stage_param_bytes(best.stage_of, num_stages)
    stages = []
    for s in range(num_stages):
        blocks = [b for b, st in zip(scaled.blocks, best.stage_of) if st == s]
        stages.append(
            StagePlan(
                index=s,
                device=s % p,
                modules=_summarize_modules([mod for b in blocks for mod in b.modules]),
                node_count=sum(len(b.nodes) for b in blocks),
                forward_s=sum(b.forward_s for b in blocks),
                backward_s=sum(b.backward_s for b in blocks),
                predicted_s=times[s],
                param_bytes=param_bytes[s],
                peak_memory_bytes=int(best.timeline.peak_memory_bytes[s % p]),
                activation_bytes=sum(b.activation_bytes for b in blocks),
            )
        )
    base = {}
    for label, fn in (
        ("equal_layers", baselines.equal_layers),
        ("equal_params", baselines.equal_params),
    ):
        stage_of = fn(scaled, num_stages)
        tl = simulate_blocks(bg, stage_of, p, v, spec, best.schedule, m, state_per_byte)
        t = stage_times_s(scaled, stage_of, num_stages, spec)
        sync = sync_s(per_device(bg.stage_param_bytes(stage_of, num_stages)))
        base[label] = BaselineResult(
            max(sum(t[s] for s in range(d, num_stages, p)) for d in range(p)),
            tl.step_time_s + sync,
        )
    return Plan(
        model=name,
        mesh={"pp": p},
        device=spec.name,
        memory_limit_bytes=limit,
        schedule=best.schedule,
        micro_batches=m,
        stages_per_device=v,
        stages=tuple(stages),
        stage_of=stage_of_node,
        bottleneck_s=bottleneck,
        lower_bound_s=bound,
        gap=bottleneck / bound - 1 if bound > 0 else 0.0,
        step_time_s=best.timeline.step_time_s + sync_s(per_device(param_bytes)),
        bubble_fraction=best.timeline.bubble_fraction,
        solver=SolverInfo(
            status=best.status,
            time_s=elapsed_s,
            blocks=len(bg.blocks),
            objective_bound_s=best.bound_s,
        ),
        baselines=base,
        optimizer=optimizer,
        boundary_bytes=tuple(scaled.boundary_bytes(best.stage_of, num_stages)),
    )


def _device_lower_bound_s(bg: BlockGraph, og: OpGraph, p: int, v: int, spec: DeviceSpec) -> float:
    """A true lower bound on the slowest device's time per micro-batch. With one stage per device
    it is the stage bound of :func:`autopart.solver.cost.lower_bound_s`. With ``v`` stages per
    device, a device's time is a sum of ``v`` stage times, so it is at least the stage bound for
    ``p * v`` stages, and at least the average device load: all compute plus, for each of the
    ``p * v - 1`` boundaries, two messages of at least the smallest tensor's transfer time."""
    if v == 1:
        return lower_bound_s(bg, p, spec, og)
    stage_bound = lower_bound_s(bg, p * v, spec, og)
    smallest = min((t.nbytes for t in bg.tensors), default=0)
    average = (bg.total_compute_s + 2 * (p * v - 1) * p2p_time_s(smallest, spec)) / p
    return max(stage_bound, average)


def simulate_plan(plan: Plan) -> Any:
    """The schedule timeline of a plan (for Gantt charts), from the costs it records."""
    p = plan.mesh["pp"]
    spec = pipeline_device(get_device(plan.device), pp=p, tp=plan.mesh.get("tp", 1))
    state_per_byte = 2 + Optimizer(plan.optimizer).states_per_param
    static = [0] * p
    for st in plan.stages:
        static[st.device] += int(st.param_bytes * state_per_byte)
    return simulate(
        build_schedule(plan.schedule, p, plan.micro_batches, plan.stages_per_device),
        [s.forward_s for s in plan.stages],
        [s.backward_s for s in plan.stages],
        comm_s=[p2p_time_s(b, spec) for b in plan.boundary_bytes],
        activation_bytes=[s.activation_bytes for s in plan.stages],
        static_bytes=static,
    )


def simulate_blocks(
    bg: BlockGraph,
    stage_of: Sequence[int],
    p: int,
    v: int,
    spec: DeviceSpec,
    kind: str,
    m: int,
    state_per_byte: float,
) -> Any:
    scaled = per_micro_batch(bg, m)
    num_stages = p * v
    fwd, bwd, act = [0.0] * num_stages, [0.0] * num_stages, [0] * num_stages
    for b, s in zip(scaled.blocks, stage_of):
        fwd[s] += b.forward_s
        bwd[s] += b.backward_s
        act[s] += b.activation_bytes
    comm = [p2p_time_s(nb, spec) for nb in scaled.boundary_bytes(stage_of, num_stages)]
    static = [0] * p
    for s, nbytes in enumerate(bg.stage_param_bytes(stage_of, num_stages)):
        static[s % p] += int(nbytes * state_per_byte)
    return simulate(
        build_schedule(kind, p, m, v),
        fwd,
        bwd,
        comm_s=comm,
        activation_bytes=act,
        static_bytes=static,
    )


@functools.lru_cache(maxsize=64)
def per_micro_batch(bg: BlockGraph, micro_batches: int) -> BlockGraph:
    """``bg``'s block costs for one of ``micro_batches`` micro-batches (memoized). Its node graph
    is left out: scaling it re-derives every node of a 70B graph, and the lower bound is given
    the node graph explicitly."""
    blocks = BlockGraph(bg.blocks, bg.tensors, bg.param_bytes_by_name)
    return blocks.scaled(1.0 / micro_batches)


def _fits(
    bg: BlockGraph,
    stage_of: Sequence[int],
    in_flight: Sequence[int],
    p: int,
    state_per_byte: float,
    limit: int,
) -> bool:
    """Whether an assignment fits memory under the ILP's own accounting (see stage_ilp)."""
    num_stages = len(in_flight)
    per_device = [0.0] * p
    for s, nbytes in enumerate(bg.stage_param_bytes(stage_of, num_stages)):
        per_device[s % p] += nbytes * state_per_byte
    for b, s in zip(bg.blocks, stage_of):
        per_device[s % p] += in_flight[s] * b.activation_bytes
    return max(per_device) <= limit


def in_flight_per_stage(kind: str, p: int, m: int, v: int) -> list[int]:
    """Micro-batches whose activations each stage keeps (DESIGN.md: 1F1B keeps p - s on stage s,
    GPipe all m). Interleaved ranks hold up to the simulated count of (stage, micro-batch) pairs,
    spread over their v stages."""
    if kind == "gpipe":
        return [m] * p
    if kind == "1f1b":
        return [min(p - s, m) for s in range(p)]
    per_rank = [in_flight_micro_batches(kind, p, m, r, v) for r in range(p)]
    return [math.ceil(per_rank[s % p] / v) for s in range(p * v)]


def _micro_batch_options(
    batch: int, p: int, micro_batches: int | None, kinds: Sequence[str]
) -> dict[str, list[int]]:
    """Valid micro-batch counts per schedule, most first (the smallest bubble; simulation decides).
    A count must divide the batch and be accepted by the schedule (1F1B needs at least p)."""
    if micro_batches is not None and (micro_batches < 1 or batch % micro_batches):
        raise AutopartError(
            f"the batch of {batch} does not split into {micro_batches} equal micro-batches; pick a "
            f"divisor of {batch} for --micro-batches (or change --batch)."
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
                build_schedule(kind, p, m, _INTERLEAVE if kind == ScheduleKind.INTERLEAVED else 1)
                valid.append(m)
            except ScheduleError as exc:
                errors.append(str(exc))
        if valid:
            options[kind] = valid
    if not options and micro_batches is not None:
        raise AutopartError(
            f"{micro_batches} micro-batches cannot run on {p} pipeline stages: {errors[0]}"
        )
    if not options:
        raise AutopartError(
            f"no schedule in {', '.join(kinds)} can run {p} pipeline stages on a batch of {batch} "
            f"split into {counts} micro-batches ({errors[0] if errors else ''}); raise --batch to a "
            "multiple of the stage count or use --schedule gpipe."
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
