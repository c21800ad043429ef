"""The runtime: a Plan becomes a program that trains on ``torch.distributed.pipelining``.

This is the only module that touches process groups. Every rank traces, plans and splits the model
itself; tracing and planning are deterministic, so all ranks agree on the stages without sending
anything. Each rank then wraps its stage(s) in ``PipelineStage`` and runs the schedule the plan
chose (``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble`` or ``ScheduleDualPipeV``).

Parameters used on two stages (tied embeddings) live on both. After backward their gradients are
summed across the stages that hold them, as Megatron does for its embedding group, so both copies
take the same optimizer step and stay identical.

Tensor parallelism (a ``tp`` mesh dimension): each stage is rewritten for this rank's place in its
``tp`` group by :func:`autopart.passes.tp.shard.shard_tp` (its shard of every split weight, local
shapes, collectives with Megatron's autograd semantics). The mesh is laid out ``(dp, pp, tp)`` with
``tp`` innermost; every ``tp`` rank of a stage runs the same schedule, pipeline messages go between
the ranks of equal ``(dp, tp)`` coordinates, and a tensor crossing a stage boundary travels in the
plan's placement (a shard or a partial sum travels as this rank's local tensor). Tied parameters
are summed per ``(dp, tp)`` coordinate; data parallelism stays torch's DDP over ``dp``.

Sharded data parallelism (an ``fsdp`` mesh dimension, laid out ``(dp, fsdp, pp, tp)``): each
stage module, after the TP pass, is wrapped in torch's FSDP2 (``fully_shard``) over ``fsdp``, or
over ``(dp, fsdp)`` as HSDP when both are there, in place of DDP, as torchtitan wraps its pipeline
stages; ``PipelineStage`` then defers FSDP's gradient reduce-scatter to the step's last backward.
One FSDP unit per stage: a stage is a GraphModule that reads its parameters itself rather than
calling its layers' modules, so per-layer units would never see their forward hooks.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from autopart.codegen.templates.run import (
    BindConstants,
    contiguous_input_grads,
    contiguous_outputs,
    copied_outputs,
    fully_shard_stage,
    no_weight_pass,
    pipeline_rows,
    sync_tied_grads,
    tied_process_groups,
)
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.planning.plans import Plan, TPSection, format_mesh, parse_mesh, replica_label
from autopart.planning.request import PlanRequest

# The emitted launcher's helpers (torch only): the runtime and the programs autopart.emit writes
# bind non-tensor inputs and make cross-rank tensors contiguous with the same code.
from autopart.planning.schedule import SPLIT_BACKWARD, ScheduleKind
from autopart.precision import (
    Precision,
    as_precision,
    cast_floating,
    check_master_dtypes,
    check_runs_on,
    computing_in,
    traced_as_computed,
)
from autopart.runtime.checkpoint import CheckpointError, ShardedState
from autopart.runtime.outputs import OutputMerge, OutputMergeError
from autopart.runtime.stage_io import (
    ProgramInputs,
    RuntimeSetupError,
    StateLayout,
    micro_batch_graph,
    plan_that_runs,
    stage_io,
    value_metas,
)
from autopart.runtime.weight_grads import stages_keeping_weight_grads

__all__ = ["CheckpointError", "ParallelProgram", "PeerFailureError", "RuntimeSetupError", "compile"]

_MESH_DIMS = ("dp", "fsdp", "pp", "tp")
"""The mesh's dimensions, outermost first."""

_SCHEDULES: dict[ScheduleKind, type[PipelineScheduleSingle] | type[PipelineScheduleMulti]] = {
    ScheduleKind.GPIPE: ScheduleGPipe,
    ScheduleKind.ONE_F_ONE_B: Schedule1F1B,
    ScheduleKind.INTERLEAVED: ScheduleInterleaved1F1B,
    ScheduleKind.INTERLEAVED_ZB: ScheduleInterleavedZeroBubble,
    ScheduleKind.ZBV: ScheduleZBVZeroBubble,
    ScheduleKind.DUALPIPEV: ScheduleDualPipeV,
}


@dataclass(frozen=True, slots=True)
class LocalStage:
    """One pipeline stage this rank runs."""

    index: int
    """The stage's index in the plan."""
    module: torch.nn.Module
    """Its (TP-sharded) GraphModule, wrapped in DDP where there is a dp axis."""
    pipeline_stage: PipelineStage
    """The ``torch.distributed.pipelining`` stage the schedule runs it as."""


class PeerFailureError(AutopartError):
    """Another rank died or stopped answering during a collective step."""


_PEER_FAILURE_MARKS = ("gloo", "Connection", "connection", "Timed out", "timed out", "NCCL")


def compile(
    model: torch.nn.Module,
    mesh: DeviceMesh | str,
    *,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    request: PlanRequest | None = None,
    micro_batches: int | None = None,
    schedule: str | None = None,
    stages_per_rank: int | None = None,
    device: str | DeviceSpec | None = None,
    verify: bool = False,
    profile: bool | None = None,
    precision: str | None = None,
    reshard_after_forward: bool | None = None,
) -> ParallelProgram:
    """Plan ``model`` for ``mesh`` and build this rank's part of the pipeline program.

    ``mesh`` is a DeviceMesh with a ``"pp"`` dimension (and optionally ``"dp"``, ``"fsdp"`` and
    ``"tp"``) or a spec such as ``"pp=2"``, ``"fsdp=2,pp=2"`` or ``"dp=2,pp=2,tp=2"`` resolved
    against the default process group.
    ``example_inputs`` is one global batch (it fixes the shapes every step must have). ``device``
    names (or is) the cost model used for planning (default: ``cpu`` on a CPU mesh, ``h100`` on
    CUDA). ``request`` (a :class:`~autopart.planning.request.PlanRequest`) sets the other planning
    options (``memory``, ``optimizer``, ``time_limit_s``, ...); its mesh is ``mesh``'s, and
    ``micro_batches``, ``schedule``, ``stages_per_rank`` (the pipeline stages each rank runs)
    and ``device``, when given, replace its fields.
    ``verify=True`` checks each tensor-parallel stage against the unsharded stage on the
    first micro-batch before returning (:mod:`autopart.runtime.verify`), raising
    :class:`~autopart.runtime.verify.TPVerificationError` naming the first node that differs.
    ``profile=True`` plans on times measured on this machine (the graph that runs, at its
    micro-batch shapes; ``PlanRequest.profile``), and ``program.plan.profile_s`` says how long
    measuring took.
    ``precision="bf16-mixed"`` trains with float32 masters and bfloat16 compute under FSDP2's
    ``MixedPrecisionPolicy`` on every mesh (:mod:`autopart.precision`); the model must be float32.
    ``reshard_after_forward=True`` (an fsdp axis and ``schedule="gpipe"``): each layer's FSDP2
    unit is freed after each forward and gathered again by the next
    (``PlanRequest.reshard_after_forward``).
    """
    from autopart.passes.split_stages import stage_info

    policy = as_precision(precision or (request.precision if request else Precision.MODEL))
    check_master_dtypes(model, policy)
    dm = _resolve_mesh(mesh, policy)
    check_runs_on(policy, _torch_device(dm))
    options: dict[str, Any] = {"micro_batches": micro_batches, "schedule": schedule}
    options |= {"stages_per_rank": stages_per_rank, "device": device, "profile": profile}
    options |= {"reshard_after_forward": reshard_after_forward, "mesh": _spec(_sizes(dm))}
    req = _compile_request(request, options | {"precision": policy.value}, _torch_device(dm))
    dtype = policy.compute_dtype
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    # planned, split and described as it computes (bf16-mixed: bfloat16 parameters); the stages
    # then hold the model's own parameters again, the masters FSDP2 casts each step
    with traced_as_computed(dtype, model, args, dict(example_kwargs or {})) as (cargs, ckwargs):
        planned = _planned(model, dm, req, cargs, ckwargs)
    stages, local = _stages(planned, dm, verify=verify)
    tp = planned.plan.tp
    metas = {i.index: stage_io(planned.values, tp, i) for i in map(stage_info, stages)}
    program = ParallelProgram(
        planned.plan,
        dm,
        local,
        [stage_info(s) for s in stages],
        loss_fn,
        _torch_device(dm),
        planned.inputs,
        {i: metas[i] for i in (stage_info(s).index for s in local)},
        planned.merge,
        layout=StateLayout.of(model, planned.run_gm, stages),
    )
    # for autopart.emit, which writes every stage's code and its inputs' and outputs' metadata
    program._all_stages = stages
    program._all_metas = metas
    return program


@dataclass(frozen=True, slots=True)
class _Planned:
    """What :func:`compile` plans before it splits: the plan, the graph that runs and what it
    takes and gives."""

    plan: Plan
    run_gm: torch.fx.GraphModule
    inputs: ProgramInputs
    batch: int
    values: Any
    """The value of every node of ``run_gm`` on a micro-batch, as metadata (``value_metas``)."""
    merge: OutputMerge


def _planned(
    model: torch.nn.Module,
    dm: DeviceMesh,
    req: PlanRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Planned:
    """Trace and plan ``model`` for ``dm``."""
    from autopart.capture.tracing import trace
    from autopart.passes.annotate import annotate
    from autopart.planning.mesh_plan import batch_size

    sizes = _sizes(dm)
    dp, fsdp = sizes["dp"], sizes["fsdp"]
    replicas = dp * fsdp
    inputs = ProgramInputs.of(args, kwargs)
    gm = annotate(trace(model, args, kwargs), expert_imbalance=req.expert_imbalance)
    inputs.check_graph(gm)
    batch = batch_size(inputs.flat)
    if batch % replicas:
        axes = replica_label(dp, fsdp)
        raise RuntimeSetupError(
            f"a batch of {batch} does not split across the {replicas} data-parallel replicas of "
            f"{axes}; use a batch that is a multiple of {replicas}, or other {axes} sizes."
        )
    replica = batch // replicas  # each data-parallel replica pipelines its share of the batch
    if req.micro_batches is not None and replica % req.micro_batches:
        raise RuntimeSetupError(
            f"a batch of {replica} per replica does not split into {req.micro_batches} equal "
            f"micro-batches; choose a divisor of {replica}."
        )

    def make(graph: torch.fx.GraphModule, graph_batch: int, m: int | None) -> Plan:
        name = req.name or type(model).__name__
        return _plan(
            graph, req, batch=batch, mesh=sizes, micro_batches=m, name=name, graph_batch=graph_batch
        )

    if req.profile and dist.is_initialized() and dist.get_world_size() > 1:
        plan, run_gm = _plan_on_rank_zero(
            make, req.micro_batches, model, gm, args, kwargs, batch, replicas
        )
    else:
        plan, run_gm = plan_that_runs(
            make, req.micro_batches, model, gm, args, kwargs, batch, replicas, profile=req.profile
        )
    metas = value_metas(run_gm, inputs.micro_batch(batch, replicas * plan.micro_batches))
    return _Planned(
        plan,
        run_gm,
        inputs,
        batch,
        metas,
        OutputMerge.of(gm, run_gm),
    )


def _stages(
    planned: _Planned, dm: DeviceMesh, *, verify: bool
) -> tuple[list[torch.fx.GraphModule], list[torch.fx.GraphModule]]:
    """Every stage of the plan, and this rank's (TP-sharded, recomputing what the plan
    recomputes) over the model's own parameters."""
    from autopart.passes.split_stages import split_stages, stage_info

    plan, torch_device = planned.plan, _torch_device(dm)
    stages = split_stages(planned.run_gm, plan)
    rank = _pp_mesh(dm).get_local_rank()
    local = [s for s in stages if plan.stages[stage_info(s).index].device == rank]
    _warn_without_parameters(local, rank, plan)
    if plan.tp is not None and plan.tp.degree > 1:
        local = _shard_stages(stages, local, plan.tp, dm)
    local = _share_tied_copies([s.to(torch_device) for s in local])
    if verify and plan.tp is not None and plan.tp.degree > 1:
        replicas = _axis_size(dm, "dp") * _axis_size(dm, "fsdp")
        chunks = replicas * plan.micro_batches
        precision = as_precision(plan.precision)
        with computing_in(precision.compute_dtype, planned.run_gm, *stages, *local):
            micro_batch = planned.inputs.micro_batch(planned.batch, chunks)
            _verify_tp(planned.run_gm, micro_batch, stages, local, dm, precision)
    local = [_recomputing(s, plan) for s in local]
    if plan.under_fsdp:  # one FSDP unit per layer, as torchtitan shards each block
        from autopart.passes.fsdp_units import model_layers, split_layer_units

        layers = model_layers(planned.run_gm)
        for stage in local:
            _check_resharded(stage, split_layer_units(stage, layers), layers, plan)
    split = plan.schedule in SPLIT_BACKWARD
    for stage in local:
        # Tensors cross ranks through contiguous buffers (gloo and NCCL require it); a stage
        # output that is a strided view (e.g. a permute feeding a skip connection) is copied, and
        # every output where the schedule splits the backward (copied_outputs says why).
        stage.register_forward_hook(copied_outputs if split else contiguous_outputs)
        stage.register_forward_pre_hook(contiguous_input_grads)  # the same for gradients sent back
    return stages, local


def _check_resharded(
    stage: torch.fx.GraphModule, units: Sequence[str], layers: Collection[str], plan: Plan
) -> None:
    """Raise where the plan reshards layers after forward and one of ``layers`` whose parameters
    ``stage`` holds could not be its own FSDP2 unit (``units``): the plan counted every layer
    as resharded (``stage_memory.deferred_state``), so its memory would be under-predicted."""
    from autopart.passes.split_stages import stage_info

    if not plan.reshard_after_forward:
        return
    names = [name for name, _ in stage.named_parameters()]
    held = {path for path in layers if any(n.startswith(f"{path}.") for n in names)}
    whole = sorted(held - set(units))
    if whole:
        raise AutopartError(
            f"stage {stage_info(stage).index}: layer(s) {', '.join(whole[:3])} cannot be FSDP2 "
            "units of their own (their parameters are read outside the layer, or the layer calls "
            "a module), so they cannot reshard after forward as the plan counts; plan without "
            "--reshard-after-forward."
        )


def _recomputing(stage: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """``stage`` running the blocks the plan recomputes under torch's checkpointing."""
    from autopart.passes.recompute import checkpoint_blocks
    from autopart.passes.split_stages import stage_info

    index = stage_info(stage).index
    mine = [r for r in plan.recompute if r.stage == index]
    return checkpoint_blocks(stage, [r.nodes for r in mine], selective=[r.selective for r in mine])


def _plan_on_rank_zero(
    make: Callable[[torch.fx.GraphModule, int, int | None], Plan],
    micro_batches: int | None,
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    dp: int,
) -> tuple[Plan, torch.fx.GraphModule]:
    """The profiled plan, made once: measurements differ from rank to rank (and from run to run),
    so the ranks cannot each plan for themselves as they do on the cost model. Rank 0 measures and
    plans, the plan is broadcast, and every other rank traces the graph that runs at its count."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        plan, run_gm = plan_that_runs(
            make, micro_batches, model, gm, args, kwargs, batch, dp, profile=True
        )
        box = [plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() == 0:
        return plan, run_gm
    plan = Plan.from_json(box[0])  # only rank 0 plans, so the graph that runs needs no costs
    return plan, micro_batch_graph(model, gm, args, kwargs, batch, dp * plan.micro_batches)


def _sizes(dm: DeviceMesh) -> dict[str, int]:
    """The size of each axis of ``dm`` (1 where it has none)."""
    return {axis: _axis_size(dm, axis) for axis in ("dp", "fsdp", "pp", "tp")}


def _spec(sizes: Mapping[str, int]) -> str:
    """The mesh spec a plan of these axis sizes is requested with (``tp`` and ``fsdp`` only
    where more than one rank)."""
    return format_mesh({k: v for k, v in sizes.items() if k not in ("tp", "fsdp") or v > 1})


def _compile_request(
    request: PlanRequest | None, given: Mapping[str, Any], torch_device: torch.device
) -> PlanRequest:
    """``request`` with the keywords given to :func:`compile` (``None``: not given); the cost
    model defaults to the device the program runs on (``cpu`` on a CPU mesh, ``h100`` on CUDA)."""
    options = {k: v for k, v in given.items() if v is not None}
    if request is None and given.get("device") is None:
        options["device"] = "h100" if torch_device.type == "cuda" else "cpu"
    return PlanRequest.of(request, options)


def _plan(
    gm: torch.fx.GraphModule,
    request: PlanRequest,
    *,
    batch: int,
    mesh: Mapping[str, int],
    micro_batches: int | None,
    name: str,
    graph_batch: int,
) -> Plan:
    """The plan for ``mesh`` ({"dp", "fsdp", "pp", "tp"} sizes) of ``gm``, traced at
    ``graph_batch`` samples; with ``tp > 1`` its ``tp`` section places every node of ``gm``."""
    from autopart.planning.planner import plan_graph

    fixed = request.with_options(mesh=_spec(mesh), devices=None)
    plan = plan_graph(
        gm, fixed, batch=batch, micro_batches=micro_batches, name=name, graph_batch=graph_batch
    )
    assert (plan.tp is not None) == (mesh.get("tp", 1) > 1), "the planner ignored the tp axis"
    return plan


def _warn_without_parameters(local: list[torch.fx.GraphModule], rank: int, plan: Plan) -> None:
    """The planner gives every pipeline rank a parameter when the model has a parameter-holding
    block per stage; a model with fewer (two linears on four ranks) leaves some rank without."""
    if any(True for stage in local for _ in stage.parameters()):
        return
    warnings.warn(
        f"pipeline rank {rank} holds no parameters: the model has fewer parameter-holding "
        f"blocks than the plan's {plan.num_stages} stages, so program.parameters() is empty "
        "there and torch optimizers refuse an empty list. Build the optimizer only where "
        "program.parameters() is not empty, or use fewer pipeline stages.",
        stacklevel=3,
    )


def _share_tied_copies(stages: list[torch.fx.GraphModule]) -> list[torch.fx.GraphModule]:
    """Make a parameter that several of this rank's stages read one tensor again (the TP pass
    gives each stage its own shard of it): one copy for the optimizer and the checkpoint, whose
    gradient accumulates from every stage that reads it."""
    from autopart.passes.split_stages import set_attr_at

    first: dict[str, torch.nn.Parameter] = {}
    for stage in stages:
        for name, param in list(stage.named_parameters()):
            kept = first.setdefault(name, param)
            if kept is param:
                continue
            if kept.shape != param.shape:
                raise RuntimeSetupError(
                    f"parameter {name!r} is held by two stages of this rank with different "
                    f"shapes {tuple(kept.shape)} and {tuple(param.shape)} (sharded differently); "
                    "plan with schedule='1f1b' (one stage per rank) or without tensor parallelism."
                )
            set_attr_at(stage, name, kept)
    return stages


def _shard_stages(
    stages: list[torch.fx.GraphModule],
    local: list[torch.fx.GraphModule],
    tp: TPSection,
    mesh: DeviceMesh,
) -> list[torch.fx.GraphModule]:
    """This rank's stages rewritten for its place in the tp group (new modules: ``stages`` keep the
    unsharded code that autopart.emit writes)."""
    from autopart.passes.tp.shard import param_placements, shard_tp

    if tp.fallbacks and dist.get_rank() == 0:
        first, why = next(iter(tp.fallbacks.items()))
        warnings.warn(
            f"tensor parallelism: {len(tp.fallbacks)} node(s) run replicated on the {tp.degree} TP "
            f"ranks because the degree does not divide a size they would split (or they write a "
            f"tensor in place), e.g. {first!r}: {why}. The result is exact; "
            "program.plan.tp.fallbacks lists every node and why.",
            stacklevel=3,
        )
    # one layout per parameter across all stages, so the copies of a tied weight are the same shard
    storage = param_placements(stages, tp)
    tp_mesh = mesh["tp"]
    rank, group = tp_mesh.get_local_rank(), tp_mesh.get_group()
    return [shard_tp(s, tp, rank, group, storage=storage) for s in local]


def _verify_tp(
    run_gm: torch.fx.GraphModule,
    micro_batch: list[Any],
    stages: list[torch.fx.GraphModule],
    local: list[torch.fx.GraphModule],
    mesh: DeviceMesh,
    precision: Precision,
) -> None:
    """Check this rank's TP stages against the unsharded ones (:mod:`autopart.runtime.verify`),
    at bfloat16's resolution where they compute in it."""
    from autopart.passes.split_stages import stage_info
    from autopart.runtime.verify import (
        HALF_RELATIVE_TOLERANCE,
        RELATIVE_TOLERANCE,
        draws_random_numbers,
        record_values,
        verify_tp_stage,
    )

    values = record_values(run_gm, micro_batch)
    full = {stage_info(s).index: s for s in stages}
    group = mesh["tp"].get_group()
    for sharded in local:
        whole = full[stage_info(sharded).index]
        if draws_random_numbers(whole):
            warnings.warn(
                f"verify: stage {stage_info(whole).index} samples random numbers (dropout), so its "
                "sharded and unsharded runs cannot be compared; it was not checked.",
                stacklevel=3,
            )
            continue
        tolerance = HALF_RELATIVE_TOLERANCE if precision.is_mixed else RELATIVE_TOLERANCE
        verify_tp_stage(whole, sharded, values, group, _torch_device(mesh), tolerance=tolerance)


class ParallelProgram:
    """This rank's share of a pipeline-parallel training program (see :func:`compile`)."""

    def __init__(
        self,
        plan: Plan,
        mesh: DeviceMesh,
        stages: list[torch.fx.GraphModule],
        infos: list[Any],
        loss_fn: Callable[..., torch.Tensor] | None,
        device: torch.device,
        inputs: ProgramInputs,
        stage_metas: Mapping[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]],
        merge: OutputMerge,
        *,
        layout: StateLayout,
    ) -> None:
        from autopart.passes.split_stages import rebuild_output, stage_info

        self.plan = plan
        self._mesh = mesh
        self._group = _pp_mesh(mesh).get_group()
        # the data-parallel replicas (dp x fsdp): each pipelines its share of the batch
        replica_mesh = _replica_mesh(mesh)
        self._dp = replica_mesh.size() if replica_mesh is not None else 1
        self._dp_group = replica_mesh.get_group() if replica_mesh is not None else None
        self._dp_rank = replica_mesh.get_local_rank() if replica_mesh is not None else 0
        self._fsdp = _axis_size(mesh, "fsdp")
        self._precision = as_precision(plan.precision)
        self._sharded = plan.under_fsdp
        self._tp_rank = mesh["tp"].get_local_rank() if _axis_size(mesh, "tp") > 1 else 0
        self._stages = stages
        self._state = ShardedState(
            stages, layout, mesh["tp"] if _axis_size(mesh, "tp") > 1 else None
        )
        # Every stage of the pipeline (compile sets it; other ranks' stages hold this rank's
        # untrained copy of their weights): autopart.emit writes their code.
        self._all_stages: list[torch.fx.GraphModule] = list(stages)
        self._all_metas: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {
            k: v for k, v in stage_metas.items()
        }
        self._infos = {i.index: i for i in infos}
        self._local = [stage_info(s) for s in stages]
        self._loss_fn = loss_fn
        self._device = device
        self._inputs = inputs
        self._merge = merge  # how program(x) joins micro-batches' and replicas' outputs
        self._pp_rank = _pp_mesh(mesh).get_local_rank()
        self._last_rank = dist.get_global_rank(self._group, plan.stages[-1].device)
        self._first_local = any(i.is_first for i in self._local)
        self._last_local = any(i.is_last for i in self._local)
        last = self._infos[plan.num_stages - 1]
        self._without_target = False  # this step's loss is loss_fn(output), without a target
        self._loss_sink: list[float] | None = None  # time_loss's

        def wrapped_loss(output: Any, target: Any) -> torch.Tensor:
            if self._loss_fn is None:
                raise RuntimeSetupError(
                    "program.step needs a loss: pass loss_fn=... to autopart.compile."
                )
            start = time.perf_counter()
            out = output if isinstance(output, (tuple, list)) else (output,)
            if self._precision.is_mixed:  # the loss in float32, as the masters
                out = cast_floating(tuple(out), torch.float32)
            model_output = rebuild_output(last, out)
            if self._without_target:
                loss = self._loss_fn(model_output)
            else:
                loss = self._loss_fn(model_output, target)
            if self._loss_sink is not None:
                self._loss_sink.append(time.perf_counter() - start)
            return loss

        # Static metadata: each stage's micro-batch inputs and outputs (shapes, dtypes, which
        # need gradients) from the traced graph. Without it torch infers them by running each
        # stage on uninitialised tensors, and a stage that indexes with a received integer
        # tensor (token ids, positions) reads garbage indices.
        # Data parallelism is torch's own: each stage is wrapped in DistributedDataParallel over
        # the dp dimension; PipelineStage skips its all-reduce until a step's last backward.
        submods: list[torch.nn.Module] = [
            BindConstants(s, inputs.constants, _arity(s)) if i.is_first and inputs.constants else s
            for s, i in zip(stages, self._local)
        ]
        if self._sharded:
            # FSDP2, a unit per layer (split_layer_units in _stages) and the stage, gathered for
            # the step (torch's pipelining keeps them whole from the first backward to the
            # reduction: decisions.md, "Sharded data parallelism"); mixed precision is its
            # MixedPrecisionPolicy
            mixed, reshard = self._precision.is_mixed, plan.reshard_after_forward
            submods = [fully_shard_stage(s, mesh, mixed, reshard) for s in submods]
        elif self._dp_group is not None:
            submods = [_data_parallel(s, self._dp_group, device) for s in submods]
        keep = _keeping_weight_grads(plan, stages, self._local, stage_metas)
        self._pipeline_stages = [
            PipelineStage(
                s,
                i.index,
                plan.num_stages,
                device,
                input_args=_on(stage_metas[i.index][0], device),
                output_args=_on(stage_metas[i.index][1], device),
                group=self._group,
                dw_builder=no_weight_pass if i.index in keep else None,
            )
            for s, i in zip(submods, self._local)
        ]
        self._schedule = _schedule(plan, self._pipeline_stages, wrapped_loss, merge)
        self._tied = self._tied_groups()

    # -- training --------------------------------------------------------------------------

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> float:
        """One training step over all micro-batches; returns the mean loss (the same float on
        every rank). Inputs are passed as to the model itself (keyword inputs included). Each
        micro-batch's loss is ``loss_fn(output, target)``, or ``loss_fn(output)`` when no
        ``target`` is given (a loss the model computes itself, a self-supervised objective).
        Gradients accumulate into :meth:`parameters`; call the optimizer after."""
        losses: list[torch.Tensor] = []
        args = self._stage_args(inputs, kwargs)
        if target is None:  # on every rank, so that none waits for a last stage that failed
            _check_loss_of_output(self._loss_fn)
        loss_args: dict[str, Any] = {}
        if self._last_local:
            self._without_target = target is None
            # torch's schedules hand each micro-batch its slice of a target; without one, each
            # gets a row of a placeholder that the loss never sees.
            share = (
                torch.zeros(self.plan.micro_batches)
                if target is None
                else self._replica_share(target, self._inputs.batch)
            )
            loss_args = {"target": _to(share, self._device), "losses": losses}
        with self._peer_failures("step()"):
            self._schedule.step(*args, return_outputs=False, **loss_args)
            sync_tied_grads(self._stages, self._tied)
            # The mean over replicas of each replica's mean loss: the last stage of each replica
            # (its first TP rank: all of them hold the same loss) contributes it, every other rank
            # zero.
            value = torch.zeros(1, dtype=torch.float64, device=self._device)
            if self._last_local and self._tp_rank == 0:
                value[0] = float(
                    torch.stack([loss.detach().double().cpu() for loss in losses]).mean()
                )
            dist.all_reduce(value)
        return float(value[0]) / self._dp

    @contextlib.contextmanager
    def _peer_failures(self, what: str) -> Iterator[None]:
        """Turn a communication failure (a peer that died, or did not answer within the process
        group's timeout) into a :class:`PeerFailureError` that says so; other errors pass."""
        try:
            yield
        except RuntimeError as exc:
            text = str(exc)
            if not isinstance(exc, dist.DistError) and not any(
                key in text for key in _PEER_FAILURE_MARKS
            ):
                raise
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise PeerFailureError(
                f"rank {dist.get_rank()}: {what} failed because another rank died or stopped "
                f"answering ({first[:300]}). Check the other ranks' logs for the first error; a "
                "rank that stops answering is given up on after the process group's timeout "
                "(init_process_group(timeout=...))."
            ) from exc

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        """Inference: the model's full output on every rank (joined over micro-batches and
        replicas as :mod:`autopart.runtime.outputs` says)."""
        from autopart.passes.split_stages import rebuild_output

        args = self._stage_args(inputs, kwargs)
        # torch's eval() still computes the loss when the schedule has one, which needs a target;
        # inference has none, so the loss is switched off for the forward-only pass.
        loss_fn, self._schedule._loss_fn = self._schedule._loss_fn, None
        try:
            with torch.no_grad(), self._peer_failures("inference"):
                out = self._schedule.eval(*args)  # joins the micro-batches (self._merge)
        except OutputMergeError as exc:
            out = exc  # sent on and raised on every rank, so that none waits for the output
        finally:
            self._schedule._loss_fn = loss_fn
        box = [out if self._last_local else None]
        with self._peer_failures("inference"):
            dist.broadcast_object_list(box, src=self._last_rank, group=self._group)
            shares: list[Any] = box
            if self._dp_group is not None:  # every replica computed its share of the batch
                shares = [None] * self._dp
                dist.all_gather_object(shares, box[0], group=self._dp_group)
        failed = [s for s in shares if isinstance(s, OutputMergeError)]
        if failed:
            raise failed[0]
        result = self._merge.merge(shares) if len(shares) > 1 else shares[0]
        flat = result if isinstance(result, (tuple, list)) else (result,)
        if self._precision.is_mixed:  # outputs in the masters' dtype
            flat = cast_floating(tuple(flat), torch.float32)
        return rebuild_output(self._infos[self.plan.num_stages - 1], flat)

    def _stage_args(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The first stage's positional inputs: the model's inputs flattened as at compile time,
        this replica's share of the batch."""
        dtype = self._precision.compute_dtype
        flat = self._inputs.flatten(cast_floating(inputs, dtype), cast_floating(kwargs, dtype))
        if not self._first_local:
            return ()
        return tuple(
            _to(self._replica_share(x, self._inputs.batch), self._device)
            for i, x in enumerate(flat)
            if i not in self._inputs.constants
        )

    def _replica_share(self, x: Any, batch: int) -> Any:
        """This data-parallel replica's rows of ``x`` (all of it without data parallelism)."""
        if self._dp == 1 or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
            return x
        size = batch // self._dp
        return x[self._dp_rank * size : (self._dp_rank + 1) * size]

    @property
    def local_stages(self) -> tuple[LocalStage, ...]:
        """The stages this rank runs, in plan order (for instrumenting them, e.g. timing)."""
        return tuple(
            LocalStage(info.index, module, stage)
            for info, module, stage in zip(self._local, self._stages, self._pipeline_stages)
        )

    def time_loss(self, sink: list[float]) -> None:
        """Append the seconds of every loss this rank computes (one per micro-batch, on the last
        stage's rank; its backward runs within the stage's backward) to ``sink``, for timing as
        :attr:`local_stages` allows."""
        self._loss_sink = sink

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """This rank's parameters, one per name (a parameter several of its stages read is one
        tensor: ``_share_tied_copies``), for any optimizer.
        The planner gives every pipeline rank at least one (see ``_warn_without_parameters``)."""
        yield from self._named_parameters().values()

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        named: dict[str, torch.nn.Parameter] = {}
        for stage in self._stages:
            for name, p in stage.named_parameters():
                named.setdefault(name, p)
        return named

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's buffers under the model's own names (BatchNorm's running statistics are
        written by the stage that runs the BatchNorm; with data parallelism each replica keeps
        its own, see README "Buffers")."""
        seen: set[str] = set()
        for stage in self._stages:
            for name, b in stage.named_buffers():
                if name not in seen:
                    seen.add(name)
                    yield name, b

    # -- checkpoints (autopart.runtime.checkpoint) ----------------------------------------------

    def full_state_dict(self) -> dict[str, Any]:
        """The model's ``state_dict()`` on every rank (CPU tensors): the same keys in the same
        order (tied aliases and persistent buffers included, non-persistent buffers not), the
        shards of a TP-split tensor joined whole. Collective: every rank calls it."""
        return self._state.whole(self._gather_state())

    def state_dict(self) -> dict[str, Any]:
        """This rank's entries of the model's state dict for ``torch.distributed.checkpoint``:
        ``dcp.save(program.state_dict(), checkpoint_id=...)`` on every rank writes each tensor
        once, a TP shard as a ``DTensor``; the values alias the program's tensors, so
        ``dcp.load(sd := program.state_dict(), ...)`` fills them (then ``load_state_dict(sd)``
        for tensors saved whole, see :mod:`autopart.runtime.checkpoint`). Collective."""
        return self._state.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
        """Load the model's state dict (whole tensors, e.g. ``model.state_dict()`` or
        :meth:`full_state_dict`, or :meth:`state_dict`'s form after ``dcp.load``): every rank
        copies the tensors of its stages, its shard of TP-split ones. ``strict`` as torch's:
        missing or unexpected keys raise :class:`CheckpointError`."""
        self._state.load_state_dict(state_dict, strict=strict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer``'s state (an optimizer over :meth:`parameters`) keyed by parameter names,
        for ``torch.distributed.checkpoint``; loads on another mesh too."""
        return self._state.optimizer_state_dict(optimizer, self._named_parameters())

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
    ) -> None:
        """Load :meth:`optimizer_state_dict`'s form (after ``dcp.load``) into ``optimizer``."""
        self._state.load_optimizer_state_dict(optimizer, self._named_parameters(), state_dict)

    def _gather_state(self, *, to: int | None = None) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers by stage name, whole (collective: every rank
        calls it). With ``to`` only that global rank receives the tensors (the others return
        ``{}``), so the whole model is never held by every rank."""
        from autopart.passes.tp.local import unshard_tensor
        from autopart.passes.tp.shard import TP_META_KEY

        mine: dict[str, tuple[str, int, torch.Tensor]] = {}
        # replicas hold the same values; FSDP's shards are joined by every rank that holds one
        for stage in self._stages if self._dp_rank == 0 or self._sharded else ():
            info = stage.meta.get(TP_META_KEY)
            stored = info.param_placements if info is not None else {}
            for name, t in _whole_of_fsdp(stage.state_dict()).items():
                if self._dp_rank == 0:
                    mine.setdefault(name, (stored.get(name, "R"), self._tp_rank, t.cpu()))
        gathered: list[Any] = [None] * dist.get_world_size()
        if to is None:
            dist.all_gather_object(gathered, mine)
        else:
            dist.gather_object(mine, gathered if dist.get_rank() == to else None, dst=to)
            if dist.get_rank() != to:
                return {}
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        placement: dict[str, str] = {}
        for part in gathered:
            for name, (where, tp_rank, t) in part.items():
                placement.setdefault(name, where)
                pieces.setdefault(name, {}).setdefault(tp_rank, t)
        out = {
            name: unshard_tensor([by_rank[r] for r in sorted(by_rank)], placement[name])
            if placement[name].startswith("S")
            else by_rank[min(by_rank)]
            for name, by_rank in pieces.items()
        }
        return dict(sorted(out.items()))

    # -- tied parameters --------------------------------------------------------------------

    def _tied_groups(self) -> list[tuple[str, Any]]:
        """The process groups of the tied parameters this rank holds (one protocol with the
        emitted program: :func:`~autopart.codegen.templates.run.tied_process_groups`)."""
        holders: dict[str, list[int]] = {}
        for info in self._infos.values():
            for name, stages in info.shared_params.items():
                holders.setdefault(name, []).extend(self.plan.stages[s].device for s in stages)
        return tied_process_groups(holders, pipeline_rows(self._mesh), dist.get_rank())


def _schedule(
    plan: Plan,
    stages: list[PipelineStage],
    loss_fn: Callable[..., torch.Tensor],
    merge: OutputMerge,
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """torch's schedule class for ``plan.schedule`` over this rank's ``stages``; a class that runs
    several stages per rank must place them where the plan does."""
    kind = _SCHEDULES[ScheduleKind(plan.schedule)]
    spec = merge.spec(plan.micro_batches)
    if not issubclass(kind, PipelineScheduleMulti):
        return kind(stages[0], plan.micro_batches, loss_fn=loss_fn, output_merge_spec=spec)
    mine: list[Any] = list(stages)  # a list even of one
    schedule = kind(mine, plan.micro_batches, loss_fn=loss_fn, output_merge_spec=spec)
    placed = schedule.stage_index_to_group_rank
    assert placed == {s.index: s.device for s in plan.stages}, (
        f"{kind.__name__} places stages {placed}; the plan {plan.stages}"
    )
    return schedule


def _keeping_weight_grads(
    plan: Plan,
    stages: list[torch.fx.GraphModule],
    infos: list[Any],
    metas: Mapping[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]],
) -> list[int]:
    """This rank's stages that compute their weight gradients with their input gradients under a
    zero-bubble schedule (:mod:`autopart.runtime.weight_grads`); none under the others."""
    if ScheduleKind(plan.schedule) not in SPLIT_BACKWARD:
        return []
    return stages_keeping_weight_grads(
        {i.index: s for i, s in zip(infos, stages)},
        {i.index: [m.requires_grad for m in metas[i.index][0]] for i in infos},
    )


def _check_loss_of_output(loss_fn: Callable[..., torch.Tensor] | None) -> None:
    """Raise unless ``loss_fn(output)`` is a valid call (a step without a target makes it)."""
    if loss_fn is None:
        return  # the step says that compile needs a loss
    try:
        inspect.signature(loss_fn).bind(None)
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        return
    except TypeError as exc:
        raise RuntimeSetupError(
            f"program.step() got no target, so the loss is called as loss_fn(output), but "
            f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)} takes other arguments "
            f"({exc}); pass target=..., or compile with a loss of the output alone."
        ) from None


def _axis_size(mesh: DeviceMesh, name: str) -> int:
    names = mesh.mesh_dim_names or ()
    return (
        mesh[name].size()
        if name in names and len(names) > 1
        else (mesh.size() if name in names else 1)
    )


def _pp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return mesh["pp"] if len(mesh.mesh_dim_names or ()) > 1 else mesh


def _data_parallel(stage: torch.nn.Module, group: Any, device: torch.device) -> torch.nn.Module:
    """``stage`` under torch's DistributedDataParallel over ``group`` (a stage without trainable
    parameters has nothing to synchronise and stays as it is)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in stage.parameters()):
        return stage
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(stage, device_ids=ids, process_group=group)


def _whole_of_fsdp(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` (a stage's state dict) with FSDP's sharded ``DTensor`` values joined whole
    (collective over the fsdp group: every rank of it calls this in the same order)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        for name, t in state.items()
    }


def _replica_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The data-parallel replicas (``dp`` and ``fsdp`` as one dimension, dp-major), or ``None``
    without data parallelism."""
    axes = [a for a in ("dp", "fsdp") if _axis_size(mesh, a) > 1]
    if not axes:
        return None
    if len(axes) == 1:
        return mesh[axes[0]]
    return mesh["dp", "fsdp"]._flatten("dp_fsdp")


def _on(metas: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Example tensors for ``PipelineStage``: empty, on ``device``, with the metas' flags."""
    return tuple(
        torch.empty(m.shape, dtype=m.dtype, device=device).requires_grad_(m.requires_grad)
        for m in metas
    )


def _resolve_mesh(mesh: DeviceMesh | str, precision: Precision = Precision.MODEL) -> DeviceMesh:
    """``mesh``, or the DeviceMesh its spec names on the default group; under mixed precision
    (FSDP2 on every mesh) with an ``fsdp`` dimension, of size 1 where the spec has none."""
    if isinstance(mesh, DeviceMesh):
        names = mesh.mesh_dim_names or ()
        if precision.is_mixed and "fsdp" not in names:
            raise RuntimeSetupError(
                f"{precision.value} runs torch's FSDP2 on every mesh, over its 'fsdp' dim; the "
                f"DeviceMesh has dims {names}: add an 'fsdp' dim (of size 1 to shard nothing), "
                "or pass the mesh as a spec string such as 'pp=2'."
            )
        if "pp" not in names:
            raise RuntimeSetupError(
                f"the DeviceMesh has dims {names}; autopart needs one named 'pp' (of size 1 "
                "for no pipeline), beside optional 'dp' and 'tp'."
            )
        extra = [n for n in names if n not in _MESH_DIMS]
        if extra:
            raise RuntimeSetupError(
                f"mesh dims {extra} are not autopart's; name the dims dp (data), fsdp (sharded "
                "data), pp (pipeline) and tp (tensor parallelism)."
            )
        return mesh
    sizes = parse_mesh(mesh)
    sizes.setdefault("pp", 1)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeSetupError(
            "no process group is initialised: call torch.distributed.init_process_group('gloo') (CPU) or "
            "('nccl') (GPUs) first, or launch the script with torchrun."
        )
    world = dist.get_world_size()
    wanted = math.prod(sizes.values())
    if wanted != world:
        raise RuntimeSetupError(
            f"mesh {mesh!r} needs {wanted} ranks but the process group has {world}; launch {wanted} processes "
            f"(torchrun --nproc-per-node {wanted}) or use a mesh of {world}."
        )
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    # (dp, fsdp, pp, tp), tp innermost: a TP group's ranks are neighbours (one node's fast links)
    kept = ("pp", "fsdp") if precision.is_mixed else ("pp",)
    names = tuple(n for n in _MESH_DIMS if n in kept or sizes.get(n, 1) > 1)
    return init_device_mesh(
        device_type, tuple(sizes.get(n, 1) for n in names), mesh_dim_names=names
    )


def _torch_device(dm: DeviceMesh) -> torch.device:
    if dm.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _arity(stage: torch.fx.GraphModule) -> int:
    return sum(1 for n in stage.graph.nodes if n.op == "placeholder")


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x
