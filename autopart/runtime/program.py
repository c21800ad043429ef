"""The runtime: a Plan becomes a program that trains on ``torch.distributed.pipelining``.

This is the only module that touches process groups. Every rank traces, plans and splits the model
itself; tracing and planning are deterministic, so all ranks agree on the stages without sending
anything. Each rank then wraps its stage(s) in ``PipelineStage`` and runs the schedule the plan
chose (``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``).

Parameters used on two stages (tied embeddings) live on both. After backward their gradients are
summed across the stages that hold them, as Megatron does for its embedding group, so both copies
take the same optimizer step and stay identical.

Tensor parallelism (a ``tp`` mesh dimension): each stage is rewritten for this rank's place in its
``tp`` group by :func:`autopart.passes.shard_tp.shard_tp` (its shard of every split weight, local
shapes, collectives with Megatron's autograd semantics). The mesh is laid out ``(dp, pp, tp)`` with
``tp`` innermost; every ``tp`` rank of a stage runs the same schedule, pipeline messages go between
the ranks of equal ``(dp, tp)`` coordinates, and a tensor crossing a stage boundary travels in the
plan's placement (a shard or a partial sum travels as this rank's local tensor). Tied parameters
are summed per ``(dp, tp)`` coordinate; data parallelism stays torch's DDP over ``dp``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.utils._pytree import tree_flatten, tree_unflatten

from autopart.codegen.templates.run import BindConstants, contiguous_input_grads, contiguous_outputs
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.planning.plans import Plan, TPSection, parse_mesh

# The emitted launcher's helpers (torch only): the runtime and the programs autopart.emit writes
# bind non-tensor inputs and make cross-rank tensors contiguous with the same code.
from autopart.planning.schedule import ScheduleKind
from autopart.runtime.stage_io import (
    ProgramInputs,
    RuntimeSetupError,
    micro_batch_graph,
    plan_that_runs,
    stage_io,
    value_metas,
)

__all__ = ["ParallelProgram", "PeerFailureError", "RuntimeSetupError", "compile"]

_SCHEDULES = {
    ScheduleKind.GPIPE: ScheduleGPipe,
    ScheduleKind.ONE_F_ONE_B: Schedule1F1B,
    ScheduleKind.INTERLEAVED: ScheduleInterleaved1F1B,
}


class PeerFailureError(AutopartError):
    """Another rank died or stopped answering during a collective step."""


_PEER_FAILURE_MARKS = ("gloo", "Connection", "connection", "Timed out", "timed out", "NCCL")


def compile(
    model: torch.nn.Module,
    mesh: DeviceMesh | str,
    *,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    micro_batches: int | None = None,
    schedule: str = "auto",
    device: str | DeviceSpec | None = None,
    verify: bool = False,
) -> ParallelProgram:
    """Plan ``model`` for ``mesh`` and build this rank's part of the pipeline program.

    ``mesh`` is a DeviceMesh with a ``"pp"`` dimension (and optionally ``"dp"`` and ``"tp"``) or a
    spec such as ``"pp=2"`` or ``"dp=2,pp=2,tp=2"`` resolved against the default process group.
    ``example_inputs`` is one global batch (it fixes the shapes every step must have). ``device``
    names (or is) the cost model used for planning (default: ``cpu`` on a CPU mesh, ``h100`` on
    CUDA). ``verify=True`` checks each tensor-parallel stage against the unsharded stage on the
    first micro-batch before returning (:mod:`autopart.runtime.verify`), raising
    :class:`~autopart.runtime.verify.TPVerificationError` naming the first node that differs.
    """
    from autopart.capture.tracing import trace
    from autopart.passes.annotate import annotate
    from autopart.passes.split_stages import split_stages, stage_info
    from autopart.passes.tp_check import check_tp_plan
    from autopart.planning.mesh_plan import batch_size

    dm = _resolve_mesh(mesh)
    dp, pp, tp = _axis_size(dm, "dp"), _axis_size(dm, "pp"), _axis_size(dm, "tp")
    torch_device = _torch_device(dm)
    cost_device = device or ("h100" if torch_device.type == "cuda" else "cpu")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    inputs = ProgramInputs.of(args, kwargs)
    gm = annotate(trace(model, args, kwargs))
    inputs.check_graph(gm)
    batch = batch_size(inputs.flat)
    if batch % dp:
        raise RuntimeSetupError(
            f"a batch of {batch} does not split across dp={dp} data-parallel replicas; use a batch "
            f"that is a multiple of {dp}."
        )
    replica = batch // dp  # each data-parallel replica pipelines its share of the batch
    if micro_batches is not None and (micro_batches < 1 or replica % micro_batches):
        raise RuntimeSetupError(
            f"a batch of {replica} per replica does not split into {micro_batches} equal micro-batches; "
            f"choose a divisor of {replica}."
        )

    def make(m: int | None) -> Plan:
        sizes = {"dp": dp, "pp": pp, "tp": tp}
        name = type(model).__name__
        return _plan(
            gm,
            batch=batch,
            mesh=sizes,
            device=cost_device,
            micro_batches=m,
            schedule=schedule,
            name=name,
        )

    plan, run_gm = plan_that_runs(make, micro_batches, model, gm, args, kwargs, batch, dp)
    if run_gm is None:
        same = micro_batch_graph(model, gm, args, kwargs, batch, dp * plan.micro_batches)
        if same is not None and plan.tp is not None:
            check_tp_plan(same, plan.tp)  # raises, naming the node whose placement does not hold
        raise RuntimeSetupError(
            f"{type(model).__name__} traces to a different graph at micro-batch size {replica // plan.micro_batches} "
            f"than at batch size {batch} (its graph depends on the batch size), so the plan cannot be reused; "
            "choose another micro_batches or make the model's graph independent of the batch size."
        )
    stages = split_stages(run_gm, plan)
    rank = _pp_mesh(dm).get_local_rank()
    local = [s for s in stages if plan.stages[stage_info(s).index].device == rank]
    if plan.tp is not None and plan.tp.degree > 1:
        local = _shard_stages(stages, local, plan.tp, dm)
    local = [s.to(torch_device) for s in local]
    if verify and plan.tp is not None and plan.tp.degree > 1:
        _verify_tp(run_gm, inputs.micro_batch(batch, dp * plan.micro_batches), stages, local, dm)
    for stage in local:
        # Tensors cross ranks through contiguous buffers (gloo and NCCL require it); a stage
        # output that is a strided view (e.g. a permute feeding a skip connection) is copied.
        stage.register_forward_hook(contiguous_outputs)
        stage.register_forward_pre_hook(contiguous_input_grads)  # the same for gradients sent back
    metas = value_metas(run_gm, inputs.micro_batch(batch, dp * plan.micro_batches))
    program = ParallelProgram(
        plan,
        dm,
        local,
        [stage_info(s) for s in stages],
        loss_fn,
        torch_device,
        inputs,
        {info.index: stage_io(metas, plan.tp, info) for info in (stage_info(s) for s in local)},
    )
    # for autopart.emit, which writes every stage's code and its inputs' and outputs' metadata
    program._all_stages = stages
    program._all_metas = {i.index: stage_io(metas, plan.tp, i) for i in map(stage_info, stages)}
    return program


def _plan(
    gm: torch.fx.GraphModule,
    *,
    batch: int,
    mesh: Mapping[str, int],
    device: str | DeviceSpec,
    micro_batches: int | None,
    schedule: str,
    name: str,
) -> Plan:
    """The plan for ``mesh`` ({"dp", "pp", "tp"} sizes); with ``tp > 1`` its ``tp`` section places
    every node of ``gm``."""
    from autopart.planning.planner import plan_graph

    sizes = {k: v for k, v in mesh.items() if k != "tp" or v > 1}
    plan = plan_graph(
        gm,
        batch=batch,
        mesh=sizes,
        device=device,
        memory=None,
        micro_batches=micro_batches,
        schedule=schedule,
        name=name,
    )
    assert (plan.tp is not None) == (sizes.get("tp", 1) > 1), "the planner ignored the tp axis"
    return plan


def _shard_stages(
    stages: list[torch.fx.GraphModule],
    local: list[torch.fx.GraphModule],
    tp: TPSection,
    mesh: DeviceMesh,
) -> list[torch.fx.GraphModule]:
    """This rank's stages rewritten for its place in the tp group (new modules: ``stages`` keep the
    unsharded code that autopart.emit writes)."""
    from autopart.passes.shard_tp import param_placements, shard_tp

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
) -> None:
    """Check this rank's TP stages against the unsharded ones (:mod:`autopart.runtime.verify`)."""
    from autopart.passes.split_stages import stage_info
    from autopart.runtime.verify import draws_random_numbers, record_values, verify_tp_stage

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
        verify_tp_stage(whole, sharded, values, group, _torch_device(mesh))


class ParallelProgram:
    """This rank's share of a pipeline-parallel training program (see :func:`compile`)."""

    def __init__(
        self,
        plan: Plan,
        mesh: DeviceMesh,
        stages: list[torch.fx.GraphModule],
        infos: list[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        device: torch.device,
        inputs: ProgramInputs,
        stage_metas: Mapping[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]],
    ) -> None:
        from autopart.passes.split_stages import stage_info

        self.plan = plan
        self._mesh = mesh
        self._group = _pp_mesh(mesh).get_group()
        self._dp = _axis_size(mesh, "dp")
        self._dp_group = mesh["dp"].get_group() if self._dp > 1 else None
        self._dp_rank = mesh["dp"].get_local_rank() if self._dp > 1 else 0
        self._tp_rank = mesh["tp"].get_local_rank() if _axis_size(mesh, "tp") > 1 else 0
        self._stages = stages
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
        self._pp_rank = _pp_mesh(mesh).get_local_rank()
        pp = _axis_size(mesh, "pp")
        self._last_rank = dist.get_global_rank(self._group, plan.stages[-1].device)
        self._first_local = any(i.is_first for i in self._local)
        self._last_local = any(i.is_last for i in self._local)
        output_spec = self._infos[plan.num_stages - 1].output_spec

        def wrapped_loss(output: Any, target: Any) -> torch.Tensor:
            if self._loss_fn is None:
                raise RuntimeSetupError(
                    "program.step needs a loss: pass loss_fn=... to autopart.compile."
                )
            out = output if isinstance(output, (tuple, list)) else (output,)
            return self._loss_fn(tree_unflatten(list(out), output_spec), target)

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
        if self._dp_group is not None:
            submods = [_data_parallel(s, self._dp_group, device) for s in submods]
        self._pipeline_stages = [
            PipelineStage(
                s,
                i.index,
                plan.num_stages,
                device,
                input_args=_on(stage_metas[i.index][0], device),
                output_args=_on(stage_metas[i.index][1], device),
                group=self._group,
            )
            for s, i in zip(submods, self._local)
        ]
        kind = _SCHEDULES[ScheduleKind(plan.schedule)]
        if plan.stages_per_device > 1:
            self._schedule = kind(self._pipeline_stages, plan.micro_batches, loss_fn=wrapped_loss)
        else:
            self._schedule = kind(
                self._pipeline_stages[0], plan.micro_batches, loss_fn=wrapped_loss
            )
        self._tied = self._tied_groups(pp)

    # -- training --------------------------------------------------------------------------

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> float:
        """One training step over all micro-batches; returns the mean loss (the same float on
        every rank). Inputs are passed as to the model itself (keyword inputs included).
        Gradients accumulate into :meth:`parameters`; call the optimizer after."""
        losses: list[torch.Tensor] = []
        args = self._stage_args(inputs, kwargs)
        loss_args: dict[str, Any] = {}
        if self._last_local:
            if target is None:
                raise RuntimeSetupError(
                    "program.step(..., target=...) needs the target on the last stage's rank."
                )
            share = self._replica_share(target, self._inputs.batch)
            loss_args = {"target": _to(share, self._device), "losses": losses}
        with self._peer_failures("step()"):
            self._schedule.step(*args, **loss_args)
            self._sync_tied_grads()
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
        """Inference: the model's full output on every rank."""
        args = self._stage_args(inputs, kwargs)
        # torch's eval() still computes the loss when the schedule has one, which needs a target;
        # inference has none, so the loss is switched off for the forward-only pass.
        loss_fn, self._schedule._loss_fn = self._schedule._loss_fn, None
        try:
            with torch.no_grad(), self._peer_failures("inference"):
                out = self._schedule.eval(*args)
        finally:
            self._schedule._loss_fn = loss_fn
        box = [out if self._last_local else None]
        with self._peer_failures("inference"):
            dist.broadcast_object_list(box, src=self._last_rank, group=self._group)
            result = box[0]
            if self._dp_group is not None:  # every replica computed its share of the batch
                shares: list[Any] = [None] * self._dp
                dist.all_gather_object(shares, result, group=self._dp_group)
                result = _concat_batch(shares)
        if isinstance(result, (tuple, list)):
            result = tree_unflatten(list(result), self._infos[self.plan.num_stages - 1].output_spec)
        return result

    def _stage_args(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The first stage's positional inputs: the model's inputs flattened as at compile time,
        this replica's share of the batch."""
        flat = self._inputs.flatten(inputs, kwargs)
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

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """This rank's parameters, one per name (tied copies share storage), for any optimizer."""
        seen: set[str] = set()
        for stage in self._stages:
            for name, p in stage.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield p

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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter of the model under its own name, on every rank (CPU tensors); the
        shards of a TP-split parameter are joined back into the whole tensor."""
        return self._gather_state(buffers=False)

    def _gather_state(self, *, buffers: bool, to: int | None = None) -> dict[str, torch.Tensor]:
        """:meth:`full_state_dict`, with the stages' persistent buffers too when ``buffers``
        (collective: every rank calls it). With ``to`` only that global rank receives the tensors
        (the others return ``{}``), so the whole model is never held by every rank."""
        from autopart.passes.shard_tp import TP_META_KEY, unshard_tensor

        mine: dict[str, tuple[str, int, torch.Tensor]] = {}
        for stage in self._stages if self._dp_rank == 0 else ():  # replicas hold the same values
            info = stage.meta.get(TP_META_KEY)
            stored = info.param_placements if info is not None else {}
            tensors = stage.state_dict().items() if buffers else stage.named_parameters()
            for name, t in tensors:
                mine.setdefault(name, (stored.get(name, "R"), self._tp_rank, t.detach().cpu()))
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

    def _tied_groups(self, pp: int) -> list[tuple[str, Any]]:
        """One process group per set of ranks that share a parameter; created in the same order on
        every rank (all ranks see the same plan), as ``new_group`` requires."""
        holders: dict[str, tuple[int, ...]] = {}
        for info in self._infos.values():
            for name, stages in sorted(info.shared_params.items()):
                ranks = tuple(sorted({self.plan.stages[s].device for s in stages}))
                if len(ranks) > 1:
                    holders[name] = ranks
        # Global ranks of every pipeline (one row per (dp, tp) coordinate), the same on every rank.
        rows = _pipeline_rows(self._mesh)
        me = dist.get_rank()
        groups: dict[tuple[int, ...], Any] = {}
        mine: list[tuple[str, Any]] = []
        for name in sorted(holders):
            ranks = holders[name]
            if ranks not in groups:
                for row in rows:
                    group = dist.new_group([row[r] for r in ranks])
                    if me in row:
                        groups[ranks] = group
            if self._pp_rank in ranks:
                mine.append((name, groups[ranks]))
        del pp
        return mine

    def _sync_tied_grads(self) -> None:
        params: dict[str, list[torch.nn.Parameter]] = {}
        for stage in self._stages:
            for name, p in stage.named_parameters():
                params.setdefault(name, []).append(p)
        for name, group in self._tied:
            copies = params[name]
            grad = sum((p.grad for p in copies if p.grad is not None), torch.zeros_like(copies[0]))
            dist.all_reduce(grad, group=group)
            for p in copies:
                p.grad = grad.clone()


def _axis_size(mesh: DeviceMesh, name: str) -> int:
    names = mesh.mesh_dim_names or ()
    return (
        mesh[name].size()
        if name in names and len(names) > 1
        else (mesh.size() if name in names else 1)
    )


def _pipeline_rows(mesh: DeviceMesh) -> list[list[int]]:
    """Global ranks of every pipeline: one row of pp ranks per coordinate of the other dims."""
    names = list(mesh.mesh_dim_names or ())
    ranks = mesh.mesh
    if len(names) > 1:
        pp = names.index("pp")
        ranks = ranks.permute([i for i in range(len(names)) if i != pp] + [pp])
    return ranks.reshape(-1, _axis_size(mesh, "pp")).tolist()


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


def _concat_batch(shares: list[Any]) -> Any:
    """The replicas' outputs (flat tuples or tensors, or pytrees of them) joined along the batch."""
    first = shares[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(shares) if first.dim() > 0 else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat_batch([s[i] for s in shares]) for i in range(len(first)))
    flat = [tree_flatten(s) for s in shares]
    joined = [_concat_batch([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
    return tree_unflatten(joined, flat[0][1])


def _on(metas: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Example tensors for ``PipelineStage``: empty, on ``device``, with the metas' flags."""
    return tuple(
        torch.empty(m.shape, dtype=m.dtype, device=device).requires_grad_(m.requires_grad)
        for m in metas
    )


def _resolve_mesh(mesh: DeviceMesh | str) -> DeviceMesh:
    if isinstance(mesh, DeviceMesh):
        names = mesh.mesh_dim_names or ()
        if "pp" not in names:
            raise RuntimeSetupError(
                f"the DeviceMesh has dims {names}; autopart needs one named 'pp' (of size 1 "
                "for no pipeline), beside optional 'dp' and 'tp'."
            )
        extra = [n for n in names if n not in ("dp", "pp", "tp")]
        if extra:
            raise RuntimeSetupError(
                f"mesh dims {extra} are not autopart's; name the dims dp (data), pp (pipeline) "
                "and tp (tensor parallelism)."
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
    # (dp, pp, tp), tp innermost: a TP group's ranks are neighbours (one node's fast links)
    names = tuple(n for n in ("dp", "pp", "tp") if n == "pp" or sizes.get(n, 1) > 1)
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
