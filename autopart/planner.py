"""``autopart.plan``: trace -> annotate -> OpGraph -> coarsen -> stage ILP -> simulate -> Plan.

Costs are measured once for the example batch and scaled to one micro-batch (``batch / m``
samples): compute, activations and boundary bytes are linear in the micro-batch size, parameters
are not. The schedule (GPipe or 1F1B) and the micro-batch count are chosen by simulating every
candidate on the solved stages and keeping the fastest one that fits memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.devices import DeviceSpec, get_device
from autopart.cost_models.memory import Optimizer
from autopart.errors import AutopartError
from autopart.graph import BlockGraph, OpGraph, coarsen
from autopart.plans import BaselineResult, Plan, SolverInfo, StagePlan, parse_mesh
from autopart.schedule import build_schedule, simulate
from autopart.solver import baselines
from autopart.solver.cost import lower_bound_s, stage_times_s
from autopart.solver.stage_ilp import solve_stages

__all__ = ["plan", "plan_graph", "simulate_plan"]

_SCHEDULES = ("gpipe", "1f1b")


def plan(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    mesh: str | Mapping[str, int] = "pp=2",
    device: str | DeviceSpec = "h100",
    memory: int | str | None = None,
    micro_batches: int | None = None,
    schedule: str = "auto",
    example_kwargs: Mapping[str, Any] | None = None,
    optimizer: str = "adamw",
    time_limit_s: float = 10.0,
    name: str | None = None,
) -> Plan:
    """Plan ``model`` (called as ``model(*example_inputs, **example_kwargs)``; the example batch is
    the global batch of one training step) for a pipeline mesh. No process group is needed, and a
    meta-device model is planned without allocating its weights."""
    from autopart.passes.annotate import annotate
    from autopart.tracing import trace

    gm = annotate(trace(model, example_inputs, example_kwargs))
    batch = _batch_size(example_inputs)
    return plan_graph(
        gm,
        batch=batch,
        mesh=mesh,
        device=device,
        memory=memory,
        micro_batches=micro_batches,
        schedule=schedule,
        optimizer=optimizer,
        time_limit_s=time_limit_s,
        name=name or type(model).__name__,
    )


@dataclass(frozen=True, slots=True)
class _Candidate:
    schedule: str
    micro_batches: int
    stage_of: tuple[int, ...]
    timeline: Any
    status: str
    solve_s: float
    bound_s: float


def plan_graph(
    gm: torch.fx.GraphModule,
    *,
    batch: int,
    mesh: str | Mapping[str, int] = "pp=2",
    device: str | DeviceSpec = "h100",
    memory: int | str | None = None,
    micro_batches: int | None = None,
    schedule: str = "auto",
    optimizer: str = "adamw",
    time_limit_s: float = 10.0,
    name: str = "model",
    max_blocks: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Plan an already annotated graph (see :func:`plan`)."""
    from autopart.units import parse_bytes

    axes = parse_mesh(mesh)
    if set(axes) - {"pp"}:
        raise AutopartError(
            f"mesh {mesh!r} has axes {sorted(set(axes) - {'pp'})}: only pipeline parallelism (pp) is planned so far; use e.g. 'pp=4'."
        )
    p = axes["pp"]
    spec = get_device(device)
    limit = parse_bytes(memory) if memory is not None else spec.memory_bytes
    opt = Optimizer(optimizer)
    state_per_byte = 2 + opt.states_per_param  # parameter + gradient + optimizer states
    kinds = _SCHEDULES if schedule == "auto" else (schedule,)
    if schedule not in ("auto", *_SCHEDULES):
        raise AutopartError(f"unknown schedule {schedule!r}; use auto, gpipe or 1f1b.")
    options = _micro_batch_options(batch, p, micro_batches, kinds)

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    say("building the op graph")
    og = OpGraph.from_graph_module(gm, spec)
    bg = coarsen(og, max_blocks=max_blocks or max(64, 24 * p), num_stages=p)
    candidates: list[_Candidate] = []
    for kind in kinds:
        m = options[kind][0] if micro_batches is None else micro_batches
        scaled = _scale(bg, 1.0 / m)
        in_flight = _in_flight(kind, p, m)
        say(f"solving {p} stages for {kind}, {m} micro-batches ({len(bg.blocks)} blocks)")
        hint = baselines.chain_dp(scaled, p, spec)
        sol = solve_stages(
            scaled,
            p,
            spec,
            in_flight=in_flight,
            state_bytes_per_param_byte=state_per_byte,
            memory_limit_bytes=limit,
            hint=hint,
            time_limit_s=time_limit_s,
        )
        for mm in options[kind] if micro_batches is None else (micro_batches,):
            timeline = _simulate(bg, sol.stage_of, p, spec, kind, mm, state_per_byte)
            if max(timeline.peak_memory_bytes) <= limit:
                candidates.append(
                    _Candidate(
                        kind,
                        mm,
                        sol.stage_of,
                        timeline,
                        sol.status,
                        sol.time_s,
                        sol.objective_bound_s,
                    )
                )
    if not candidates:
        raise AutopartError(
            f"no schedule and micro-batch count fits {limit / (1 << 30):.2f} GiB per device once "
            "in-flight activations are simulated; raise --memory, use more stages or a larger --batch."
        )
    best = min(
        candidates, key=lambda c: (c.timeline.step_time_s, c.micro_batches, kinds.index(c.schedule))
    )
    return _make_plan(
        gm,
        bg,
        og,
        best,
        p,
        spec,
        limit,
        optimizer,
        name,
        state_per_byte,
        time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------


def _make_plan(
    gm: torch.fx.GraphModule,
    bg: BlockGraph,
    og: OpGraph,
    best: _Candidate,
    p: int,
    spec: DeviceSpec,
    limit: int,
    optimizer: str,
    name: str,
    state_per_byte: float,
    elapsed_s: float,
) -> Plan:
    m = best.micro_batches
    scaled = _scale(bg, 1.0 / m)
    times = stage_times_s(scaled, best.stage_of, p, spec)
    bottleneck = max(times)
    bound = lower_bound_s(scaled, p, spec)
    stage_of_node: dict[str, int] = {}
    for blk, s in zip(bg.blocks, best.stage_of):
        for n in blk.nodes:
            stage_of_node[n] = s
    stages = []
    for s in range(p):
        blocks = [b for b, st in zip(scaled.blocks, best.stage_of) if st == s]
        stages.append(
            StagePlan(
                index=s,
                device=s,
                modules=_summarize_modules([mod for b in blocks for mod in b.modules]),
                node_count=sum(len(b.nodes) for b in blocks),
                forward_s=sum(b.forward_s for b in blocks),
                backward_s=sum(b.backward_s for b in blocks),
                predicted_s=times[s],
                param_bytes=bg.stage_param_bytes(best.stage_of, p)[s],
                peak_memory_bytes=int(best.timeline.peak_memory_bytes[s]),
                activation_bytes=sum(b.activation_bytes for b in blocks),
            )
        )
    base = {}
    for label, fn in (
        ("equal_layers", baselines.equal_layers),
        ("equal_params", baselines.equal_params),
    ):
        stage_of = fn(scaled, p)
        tl = _simulate(bg, stage_of, p, spec, best.schedule, m, state_per_byte)
        base[label] = BaselineResult(max(stage_times_s(scaled, stage_of, p, spec)), tl.step_time_s)
    return Plan(
        model=name,
        mesh={"pp": p},
        device=spec.name,
        memory_limit_bytes=limit,
        schedule=best.schedule,
        micro_batches=m,
        stages_per_device=1,
        stages=tuple(stages),
        stage_of=stage_of_node,
        bottleneck_s=bottleneck,
        lower_bound_s=bound,
        gap=bottleneck / bound - 1 if bound > 0 else 0.0,
        step_time_s=best.timeline.step_time_s,
        bubble_fraction=best.timeline.bubble_fraction,
        solver=SolverInfo(
            status=best.status,
            time_s=elapsed_s,
            blocks=len(bg.blocks),
            objective_bound_s=best.bound_s,
        ),
        baselines=base,
        optimizer=optimizer,
        boundary_bytes=tuple(scaled.boundary_bytes(best.stage_of, p)),
    )


def simulate_plan(plan: Plan) -> Any:
    """The schedule timeline of a plan (for Gantt charts), from the costs it records."""
    spec = get_device(plan.device)
    state_per_byte = 2 + Optimizer(plan.optimizer).states_per_param
    schedule = build_schedule(plan.schedule, plan.num_stages, plan.micro_batches)
    return simulate(
        schedule,
        [s.forward_s for s in plan.stages],
        [s.backward_s for s in plan.stages],
        comm_s=[p2p_time_s(b, spec) for b in plan.boundary_bytes],
        activation_bytes=[s.activation_bytes for s in plan.stages],
        static_bytes=[int(s.param_bytes * state_per_byte) for s in plan.stages],
    )


def _simulate(
    bg: BlockGraph,
    stage_of: Sequence[int],
    p: int,
    spec: DeviceSpec,
    kind: str,
    m: int,
    state_per_byte: float,
) -> Any:
    scaled = _scale(bg, 1.0 / m)
    fwd = [0.0] * p
    bwd = [0.0] * p
    act = [0] * p
    for b, s in zip(scaled.blocks, stage_of):
        fwd[s] += b.forward_s
        bwd[s] += b.backward_s
        act[s] += b.activation_bytes
    comm = [p2p_time_s(nb, spec) for nb in scaled.boundary_bytes(stage_of, p)]
    static = [int(x * state_per_byte) for x in bg.stage_param_bytes(stage_of, p)]
    return simulate(
        build_schedule(kind, p, m), fwd, bwd, comm_s=comm, activation_bytes=act, static_bytes=static
    )


def _scale(bg: BlockGraph, factor: float) -> BlockGraph:
    return bg.scaled(factor)


def _in_flight(kind: str, p: int, m: int) -> list[int]:
    return [m if kind == "gpipe" else min(p - s, m) for s in range(p)]


def _micro_batch_options(
    batch: int, p: int, micro_batches: int | None, kinds: Sequence[str]
) -> dict[str, list[int]]:
    if micro_batches is not None:
        if micro_batches < 1 or batch % micro_batches:
            raise AutopartError(
                f"the batch of {batch} does not split into {micro_batches} equal micro-batches; pick a divisor of {batch} "
                "(or change --batch)."
            )
        if "1f1b" in kinds and len(kinds) == 1 and micro_batches < p:
            raise AutopartError(
                f"1f1b needs at least as many micro-batches as stages ({p}); got {micro_batches}."
            )
    divisors = [d for d in range(1, batch + 1) if batch % d == 0 and d <= 8 * p]
    options: dict[str, list[int]] = {}
    for kind in kinds:
        valid = [d for d in divisors if kind == "gpipe" or d >= p]
        if micro_batches is not None:
            valid = [micro_batches]
        if not valid:
            continue
        # Most micro-batches first: the smallest bubble; the simulation makes the final choice.
        options[kind] = sorted(valid, reverse=True)
    if not options:
        raise AutopartError(
            f"a batch of {batch} cannot feed {p} pipeline stages with 1f1b (needs >= {p} micro-batches); raise --batch "
            "to a multiple of the stage count or use --schedule gpipe."
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


def _batch_size(example_inputs: Any) -> int:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    raise AutopartError(
        "cannot tell the batch size: no example input is a tensor with a batch dimension."
    )
