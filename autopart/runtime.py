"""The runtime: a Plan becomes a program that trains on ``torch.distributed.pipelining``.

This is the only module that touches process groups. Every rank traces, plans and splits the model
itself; tracing and planning are deterministic, so all ranks agree on the stages without sending
anything. Each rank then wraps its stage(s) in ``PipelineStage`` and runs the schedule the plan
chose (``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``).

Parameters used on two stages (tied embeddings) live on both. After backward their gradients are
summed across the stages that hold them, as Megatron does for its embedding group, so both copies
take the same optimizer step and stay identical.
"""

from __future__ import annotations

import math
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
from torch.utils._pytree import tree_unflatten

from autopart.errors import AutopartError
from autopart.plans import Plan, parse_mesh

__all__ = ["ParallelProgram", "RuntimeSetupError", "compile"]

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


class RuntimeSetupError(AutopartError):
    """The distributed set-up does not match what was asked for."""


def compile(
    model: torch.nn.Module,
    mesh: DeviceMesh | str,
    *,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    micro_batches: int | None = None,
    schedule: str = "auto",
    device: str | None = None,
) -> ParallelProgram:
    """Plan ``model`` for ``mesh`` and build this rank's part of the pipeline program.

    ``mesh`` is a DeviceMesh with a ``"pp"`` dimension or a spec such as ``"pp=2"`` resolved against
    the default process group. ``example_inputs`` is one global batch (it fixes the shapes every
    step must have). ``device`` names the cost model used for planning (default: ``cpu`` on a CPU
    mesh, ``h100`` on CUDA).
    """
    from autopart.passes.annotate import annotate
    from autopart.passes.split_stages import split_stages, stage_info
    from autopart.planner import _batch_size, plan_graph
    from autopart.tracing import trace

    dm = _resolve_mesh(mesh)
    pp = dm.size()
    torch_device = _torch_device(dm)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if example_kwargs:
        raise RuntimeSetupError(
            "keyword inputs cannot be fed through a pipeline yet; pass every model input positionally in example_inputs."
        )
    gm = annotate(trace(model, args))
    batch = _batch_size(args)
    if micro_batches is not None and (micro_batches < 1 or batch % micro_batches):
        raise RuntimeSetupError(
            f"a batch of {batch} does not split into {micro_batches} equal micro-batches; choose a divisor of {batch}."
        )
    plan = plan_graph(
        gm,
        batch=batch,
        mesh=f"pp={pp}",
        device=device or ("h100" if torch_device.type == "cuda" else "cpu"),
        memory=None,
        micro_batches=micro_batches,
        schedule=schedule,
        name=type(model).__name__,
    )
    run_gm = _micro_batch_graph(model, gm, args, batch, plan.micro_batches)
    # Export specializes dimensions of size 1, so a micro-batch of one sample can trace to another
    # graph; when the count was not fixed by the caller, fewer, larger micro-batches are tried.
    fewer = [m for m in range(plan.micro_batches - 1, 0, -1) if batch % m == 0]
    while run_gm is None and micro_batches is None and fewer:
        try:
            plan = plan_graph(
                gm,
                batch=batch,
                mesh=f"pp={pp}",
                device=plan.device,
                micro_batches=fewer.pop(0),
                schedule=schedule,
                name=plan.model,
            )
        except AutopartError:
            continue
        run_gm = _micro_batch_graph(model, gm, args, batch, plan.micro_batches)
    if run_gm is None:
        raise RuntimeSetupError(
            f"{type(model).__name__} traces to a different graph at micro-batch size {batch // plan.micro_batches} "
            f"than at batch size {batch} (its graph depends on the batch size), so the plan cannot be reused; "
            "choose another micro_batches or make the model's graph independent of the batch size."
        )
    stages = split_stages(run_gm, plan)
    rank = dm.get_local_rank()
    local = [s.to(torch_device) for s in stages if plan.stages[stage_info(s).index].device == rank]
    for stage in local:
        # Tensors cross ranks through contiguous buffers (gloo and NCCL require it); a stage
        # output that is a strided view (e.g. a permute feeding a skip connection) is copied.
        stage.register_forward_hook(_contiguous_outputs)
        stage.register_forward_pre_hook(_contiguous_input_grads)  # the same for gradients sent back
    return ParallelProgram(plan, dm, local, [stage_info(s) for s in stages], loss_fn, torch_device)


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
    ) -> None:
        from autopart.passes.split_stages import stage_info

        self.plan = plan
        self._mesh = mesh
        self._group = mesh.get_group()
        self._stages = stages
        self._infos = {i.index: i for i in infos}
        self._local = [stage_info(s) for s in stages]
        self._loss_fn = loss_fn
        self._device = device
        self._pp_rank = mesh.get_local_rank()
        pp = mesh.size()
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

        self._pipeline_stages = [
            PipelineStage(s, i.index, plan.num_stages, device, group=self._group)
            for s, i in zip(stages, self._local)
        ]
        kind = _SCHEDULES[plan.schedule]
        if plan.stages_per_device > 1:
            self._schedule = kind(self._pipeline_stages, plan.micro_batches, loss_fn=wrapped_loss)
        else:
            self._schedule = kind(
                self._pipeline_stages[0], plan.micro_batches, loss_fn=wrapped_loss
            )
        self._tied = self._tied_groups(pp)

    # -- training --------------------------------------------------------------------------

    def step(self, *inputs: Any, target: Any = None) -> float:
        """One training step over all micro-batches; returns the mean loss (the same float on
        every rank). Gradients accumulate into :meth:`parameters`; call the optimizer after."""
        losses: list[torch.Tensor] = []
        args = tuple(_to(x, self._device) for x in inputs) if self._first_local else ()
        kwargs: dict[str, Any] = {}
        if self._last_local:
            if target is None:
                raise RuntimeSetupError(
                    "program.step(..., target=...) needs the target on the last stage's rank."
                )
            kwargs = {"target": _to(target, self._device), "losses": losses}
        self._schedule.step(*args, **kwargs)
        self._sync_tied_grads()
        value = torch.zeros(1, dtype=torch.float64)
        if self._last_local:
            value[0] = float(torch.stack([loss.detach().double().cpu() for loss in losses]).mean())
        dist.broadcast(value, src=self._last_rank)
        return float(value[0])

    def __call__(self, *inputs: Any) -> Any:
        """Inference: the model's full output on every rank."""
        args = tuple(_to(x, self._device) for x in inputs) if self._first_local else ()
        # torch's eval() still computes the loss when the schedule has one, which needs a target;
        # inference has none, so the loss is switched off for the forward-only pass.
        loss_fn, self._schedule._loss_fn = self._schedule._loss_fn, None
        try:
            with torch.no_grad():
                out = self._schedule.eval(*args)
        finally:
            self._schedule._loss_fn = loss_fn
        box = [out if self._last_local else None]
        dist.broadcast_object_list(box, src=self._last_rank)
        result = box[0]
        if isinstance(result, (tuple, list)):
            result = tree_unflatten(list(result), self._infos[self.plan.num_stages - 1].output_spec)
        return result

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """This rank's parameters, one per name (tied copies share storage), for any optimizer."""
        seen: set[str] = set()
        for stage in self._stages:
            for name, p in stage.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield p

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter of the model under its own name, on every rank (CPU tensors)."""
        mine: dict[str, torch.Tensor] = {}
        for stage in self._stages:
            for name, p in stage.named_parameters():
                mine.setdefault(name, p.detach().cpu())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            for name, t in part.items():
                out.setdefault(name, t)
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
        groups: dict[tuple[int, ...], Any] = {}
        mine: list[tuple[str, Any]] = []
        for name in sorted(holders):
            ranks = holders[name]
            if ranks not in groups:
                global_ranks = [dist.get_global_rank(self._group, r) for r in ranks]
                groups[ranks] = dist.new_group(global_ranks)
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


def _micro_batch_graph(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    batch: int,
    micro_batches: int,
) -> torch.fx.GraphModule | None:
    """The graph the stages run: traced with one micro-batch's shapes, because export bakes static
    shapes (e.g. ``view(x, [batch, seq, 3 * hidden])``) into the graph. The plan was made on the
    full batch's graph, so both must have the same nodes for its stage assignment to carry over."""
    from autopart.tracing import trace

    if micro_batches == 1:
        return gm
    size = batch // micro_batches
    small = tuple(
        a[:size] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        for a in args
    )
    run = trace(model, small)
    want = [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]
    got = [(n.name, n.op, str(n.target)) for n in run.graph.nodes]
    return run if want == got else None


def _resolve_mesh(mesh: DeviceMesh | str) -> DeviceMesh:
    if isinstance(mesh, DeviceMesh):
        names = mesh.mesh_dim_names or ()
        if "pp" not in names:
            raise RuntimeSetupError(
                f"the DeviceMesh has dims {names}; autopart needs one named 'pp'."
            )
        extra = [n for n in names if n != "pp" and mesh[n].size() > 1]
        if extra:
            raise RuntimeSetupError(
                f"mesh dims {extra} are not supported yet; only pipeline parallelism (pp) runs so far."
            )
        return mesh["pp"] if len(names) > 1 else mesh
    sizes = parse_mesh(mesh)
    if set(sizes) - {"pp"} and any(v > 1 for k, v in sizes.items() if k != "pp"):
        raise RuntimeSetupError(
            f"mesh {mesh!r}: only pipeline parallelism (pp) runs so far; use e.g. 'pp=2'."
        )
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
    return init_device_mesh(device_type, (sizes["pp"],), mesh_dim_names=("pp",))


def _torch_device(dm: DeviceMesh) -> torch.device:
    if dm.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; its backward hands a contiguous gradient to the previous stage."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_input_grads(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        _ContiguousGrad.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
        for a in args
    )


def _contiguous_outputs(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in output)
    return output.contiguous() if isinstance(output, torch.Tensor) else output


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x
