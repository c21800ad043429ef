"""``autopart.emit``: write a parallel program (any dp x pp x tp mesh) as a standalone Python
program run with torchrun.

``emit(plan_or_program, out_dir, ...)`` writes into ``out_dir``::

    run.py          the launcher, copied verbatim from autopart/codegen/templates/run.py (the same file for
                    every model): torchrun --nproc-per-node N run.py [--steps S] [--lr LR]
    config.json     what run.py reads: the mesh, schedule, micro-batches, stage -> pipeline rank,
                    tied parameters, the batch's shapes, each stage's micro-batch inputs and outputs
                    (local TP shapes), default steps and learning rate, and which stage tensor
                    holds each key of the model's state_dict() (``--save-weights`` writes those)
    plan.json       the plan the stages come from (for reference; run.py does not read it)
    stage_K.py      one file per pipeline stage: class ``StageK(torch.nn.Module)``; with tp > 1 the
                    code every TP rank of the stage runs (``SHARDED`` names the split tensors)
    collectives.py  (tp > 1) the TP collectives, copied from autopart/codegen/templates/collectives.py
    checkpointing.py (selective recomputation) the checkpoint policy, copied from
                    autopart/codegen/templates/checkpointing.py
    loss.py         the loss: the user's loss function as source, wrapped for the last stage
    weights.pt      every parameter and buffer, whole, under the model's own names (torch.save),
                    and the model's state-dict entries that no stage reads
    data.pt         the batch the program trains on: {"inputs": [...], "target": tensor}

The program needs torch only: no autopart and no planning at run time.

Decisions:

- **Stage code is fx's code.** A stage's ``forward`` is the ``python_code`` of the stage
  GraphModule that :func:`~autopart.passes.split_stages.split_stages` makes (the graph the runtime
  runs), inside an ``nn.Module`` class whose parameters and buffers are declared by name, shape and
  dtype (``PARAMETERS``, ``BUFFERS``) and registered under the model's own names, so
  ``state_dict()`` keys are the model's (``transformer.h.0.attn.c_attn.weight``). Globals the code
  uses are imported from torch or the standard library; anything else is an :class:`EmitError`.
- **Devices are the stage's.** The trace bakes the device it ran on into factory calls
  (``arange(..., device=cpu)``); the emitted code reads ``self.device`` there instead, the device
  run.py builds the stage on, so the same files run on CPU (gloo) and on GPUs (NCCL).
- **fx fallback graphs.** A ``call_module`` node is emitted when its module is a leaf of ``torch.nn``
  whose ``repr`` rebuilds it (``torch.nn.Linear(in_features=16, ...)``, checked at emit time);
  any other module (or an export subgraph read by ``get_attr``) raises :class:`EmitError`.
- **Loss as source.** A torch function (``torch.nn.functional.mse_loss``) or a ``torch.nn`` loss
  module is imported or rebuilt; a Python function is copied with ``inspect.getsource``. Its
  globals must be torch, standard-library modules or objects, or plain constants; closures may
  close over constants only. Otherwise :class:`EmitError` asks for a module-level function that
  uses only torch. ``loss.py`` rebuilds the model's output structure from the last stage's flat
  outputs (tensor, tuple, list, dict, namedtuple, or a dict-like stand-in for Hugging Face's
  ``ModelOutput``) before calling the loss, as the runtime does.
- **Weights and data in one file each**, ``torch.save`` of plain tensors, read back with
  ``torch.load(weights_only=True, mmap=True)``: each rank copies only its stages' tensors.
  A tied parameter is stored once; every stage that reads it loads a copy and run.py sums the
  copies' gradients (on the same rank, then across the ranks that hold one) before each step.
- **emit(program) is collective.** Parameters of other ranks' stages are only reachable through a
  gather, so every rank of the program must call ``emit``; rank 0 writes the files and every rank
  returns once they exist. ``emit(plan, model=..., example_inputs=..., target=..., loss_fn=...)``
  needs no process group: it traces and splits the model the way :func:`autopart.compile` does
  (trace, the micro-batch graph, ``split_stages``), so the stages are those the runtime would run.
- **Deterministic.** Sources, config, weights and data are byte-identical for the same inputs;
  no absolute path or memory address is written. ``tests/golden/emit`` pins the sources.

Imports, torch.nn rebuilds and loss.py are made in :mod:`autopart.codegen._source`.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import re
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_flatten

from autopart.codegen._source import (
    EmitError,
    global_names,
    import_block,
    import_line,
    loss_file,
    torch_module_expr,
)
from autopart.codegen.templates import collectives
from autopart.codegen.templates.checkpointing import checkpoint_saving_matmuls
from autopart.passes.fsdp_units import layer_units, model_layers, split_layer_units
from autopart.passes.recompute import checkpoint_blocks
from autopart.planning.plans import Plan
from autopart.planning.request import PlanRequest
from autopart.planning.schedule import SPLIT_BACKWARD
from autopart.precision import as_precision, traced_as_computed
from autopart.runtime.weight_grads import stages_keeping_weight_grads

if TYPE_CHECKING:
    from autopart.passes.split_stages import StageInfo
    from autopart.passes.tp.placements import Placement
    from autopart.runtime.program import ParallelProgram
    from autopart.runtime.stage_io import StateLayout

__all__ = ["CONFIG_FORMAT_VERSION", "EmitError", "emit", "emit_model"]

CONFIG_FORMAT_VERSION = 3


@dataclass(frozen=True, slots=True)
class _Program:
    """Everything emit writes, gathered from a plan or a ParallelProgram."""

    plan: Plan
    stages: tuple[GraphModule, ...]
    infos: tuple[StageInfo, ...]
    inputs: tuple[Any, ...]
    """The first stage's positional inputs: the model's inputs flattened, one global batch."""
    target: torch.Tensor
    loss_fn: Callable[[Any, Any], torch.Tensor]
    steps: int
    lr: float
    io: Mapping[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    """Stage -> meta tensors of one micro-batch's tensor inputs and outputs as a rank sends and
    receives them (local TP shapes); run.py gives them to ``PipelineStage``."""
    layout: StateLayout
    """Which stage tensor holds each key of the model's state dict (run.py's ``--save-weights``)."""


def emit(
    plan_or_program: Plan | ParallelProgram,
    out_dir: str | PathLike[str],
    *,
    model: nn.Module | None = None,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    target: torch.Tensor | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    steps: int = 10,
    lr: float = 0.01,
) -> Path:
    """Write a standalone program that trains like ``plan_or_program``; returns ``out_dir``.

    From a :class:`~autopart.runtime.program.ParallelProgram`: call it on every rank (the weights are
    gathered to rank 0, which writes); ``example_inputs`` and ``loss_fn`` default to those given to
    :func:`autopart.compile`, ``target`` is required. From a :class:`Plan`: ``model`` (with real
    weights), ``example_inputs`` (one global batch, the shapes the plan was made for), ``target``
    and ``loss_fn`` are required. ``steps`` and ``lr`` are run.py's defaults (SGD). Existing files
    of the same names in ``out_dir`` are replaced.
    """
    from autopart.runtime.program import ParallelProgram

    if steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise EmitError(f"steps must be >= 1 and lr a positive number, got steps={steps}, lr={lr}.")
    out = Path(out_dir)
    if isinstance(plan_or_program, ParallelProgram):
        return _emit_program(
            plan_or_program, out, example_inputs, example_kwargs, target, loss_fn, steps, lr
        )
    if not isinstance(plan_or_program, Plan):
        raise EmitError(
            f"emit() takes a Plan or a ParallelProgram, got {type(plan_or_program).__name__}; "
            "pass autopart.plan(...) or autopart.compile(...)'s result."
        )
    program = _from_plan(
        plan_or_program, model, example_inputs, example_kwargs, target, loss_fn, steps, lr
    )
    _write(program, out, _state_of(program.stages))
    return out


def emit_model(
    spec: str,
    out_dir: str | PathLike[str],
    request: PlanRequest | None = None,
    *,
    batch: int | None = None,
    seq: int | None = None,
    config: str | None = None,
    steps: int = 10,
    lr: float = 0.01,
    **options: Any,
) -> tuple[Plan, Path]:
    """``autopart emit``: build the MODEL string ``spec`` (seed 0), a random target and loss for
    its example batch (:func:`autopart.runtime.launch.training_batch`), plan it as ``request``
    asks (default: pp=2 on the ``cpu`` cost model, the gloo runtime's; ``options`` replace its
    fields), and :func:`emit` it. When the model's graph changes at the planned micro-batch size,
    that graph is planned itself, as :func:`compile` does
    (:func:`autopart.runtime.stage_io.plan_that_runs`)."""
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate
    from autopart.planning.mesh_plan import batch_size
    from autopart.planning.planner import plan_graph
    from autopart.planning.plans import parse_mesh
    from autopart.runtime.launch import training_batch
    from autopart.runtime.stage_io import plan_that_runs

    req = (request or PlanRequest(device="cpu")).with_options(**options)
    sizes = parse_mesh(req.mesh)  # a bad mesh is an error before any tracing
    replicas = sizes.get("dp", 1) * sizes.get("fsdp", 1)
    overrides = parse_config_overrides(config) if config else None
    loaded = load_model(spec, batch=batch, seq=seq, config=overrides, device="cpu", seed=0)
    args, kwargs = tuple(loaded.example_inputs), dict(loaded.example_kwargs)
    target, loss_fn = training_batch(loaded)
    size = batch_size(tree_flatten((args, kwargs))[0])

    def make(graph: GraphModule, graph_batch: int, m: int | None) -> Plan:
        return plan_graph(
            graph, req, batch=size, micro_batches=m, name=loaded.name, graph_batch=graph_batch
        )

    dtype = as_precision(req.precision).compute_dtype
    # planned as it computes (autopart.precision)
    with traced_as_computed(dtype, loaded.model, args, kwargs) as (cargs, ckwargs):
        gm = annotate(trace(loaded.model, cargs, ckwargs), expert_imbalance=req.expert_imbalance)
        plan, _ = plan_that_runs(
            make,
            req.micro_batches,
            loaded.model,
            gm,
            cargs,
            ckwargs,
            size,
            replicas,
            profile=req.profile,
        )
    out = emit(
        plan,
        out_dir,
        model=loaded.model,
        example_inputs=args,
        example_kwargs=kwargs,
        target=target,
        loss_fn=loss_fn,
        steps=steps,
        lr=lr,
    )
    return plan, out


def _sources(program: _Program) -> dict[str, str]:
    """The text files of the emitted program (everything but weights.pt and data.pt), by name."""
    plan = program.plan
    files = {"run.py": _launcher_source()}
    files["config.json"] = _config(program)
    files["plan.json"] = plan.to_json() + "\n"
    last = program.infos[-1]
    files["loss.py"] = loss_file(program.loss_fn, last.output_spec, last.output_constants)
    storage = _tp_storage(program)
    if storage is not None:
        files["collectives.py"] = _template_source("collectives.py")
    if any(r.selective for r in plan.recompute):
        files["checkpointing.py"] = _template_source("checkpointing.py")
    layers = model_layers(*program.stages) if plan.under_fsdp else frozenset()
    for stage, info in zip(program.stages, program.infos):
        files[f"stage_{info.index}.py"] = _stage_file(stage, info, plan, storage, layers)
    for name, text in files.items():
        if re.search(r"\bat 0x[0-9a-fA-F]+", text):
            raise EmitError(
                f"{name} would contain a memory address ({re.search(r'at 0x[0-9a-fA-F]+', text)}): "
                "some object in the graph or loss has no source form; please report this model."
            )
    return files


# -- gathering the program -------------------------------------------------------------------------


def _from_plan(
    plan: Plan,
    model: nn.Module | None,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None,
    target: torch.Tensor | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    steps: int,
    lr: float,
) -> _Program:
    from autopart.passes.split_stages import split_stages, stage_info
    from autopart.planning.mesh_plan import batch_size
    from autopart.runtime.stage_io import (
        StateLayout,
        stage_io,
    )

    missing = [
        name
        for name, value in (
            ("model", model),
            ("example_inputs", example_inputs),
            ("target", target),
            ("loss_fn", loss_fn),
        )
        if value is None
    ]
    if missing:
        raise EmitError(
            f"emit(plan, ...) needs {', '.join(missing)}: a plan holds no model, batch or loss. Pass "
            "model=, example_inputs= (the batch the plan was made for), target= and loss_fn=, "
            "or emit the ParallelProgram that autopart.compile returned."
        )
    assert model is not None and loss_fn is not None
    meta = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.is_meta]
    if meta:
        raise EmitError(
            f"the model's tensors are on the meta device ({meta[0]!r}, ...): emit writes the weights, "
            "so build the model with real weights (device='cpu')."
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    flat, _ = tree_flatten((args, kwargs))
    batch = batch_size(flat)
    _check_target(target, batch, plan.micro_batches)
    assert target is not None
    replicas = plan.mesh.get("dp", 1) * plan.mesh.get("fsdp", 1)
    chunks = replicas * plan.micro_batches  # each replica pipelines its share of the batch
    if batch % chunks:
        raise EmitError(
            f"a batch of {batch} does not split into the plan's {plan.micro_batches} micro-batches"
            + (f" on each of {replicas} data-parallel replicas" if replicas > 1 else "")
            + "; pass the batch the plan was made for."
        )
    dtype = as_precision(plan.precision).compute_dtype
    # traced as it computes; the weights stay the masters
    with traced_as_computed(dtype, model, args, kwargs) as (cargs, ckwargs):
        run_gm, metas = _micro_batch_run(plan, model, cargs, ckwargs, batch, chunks)
    stages = split_stages(run_gm, plan)
    infos = tuple(stage_info(s) for s in stages)
    return _Program(
        plan=plan,
        stages=tuple(stages),
        infos=infos,
        inputs=tuple(flat),
        target=target,
        loss_fn=loss_fn,
        steps=steps,
        lr=lr,
        io={i.index: stage_io(metas, plan.tp, i) for i in infos},
        layout=StateLayout.of(model, run_gm, stages),
    )


def _micro_batch_run(
    plan: Plan,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    chunks: int,
) -> tuple[GraphModule, Any]:
    """The graph the plan's stages run (traced at one micro-batch) and its values' metadata;
    a plan made for another graph is an error."""
    from autopart.capture.tracing import trace
    from autopart.passes.tp.check import check_tp_plan
    from autopart.runtime.stage_io import (
        ProgramInputs,
        micro_batch_graph,
        plan_made_for,
        same_nodes,
        value_metas,
    )

    gm = trace(model, args, kwargs)
    run_gm = micro_batch_graph(model, gm, args, kwargs, batch, chunks)
    if not same_nodes(gm, run_gm) and not plan_made_for(plan, run_gm):
        raise EmitError(
            f"{type(model).__name__} traces to a different graph at micro-batch size "
            f"{batch // chunks} than at batch size {batch}, and the plan was made for the whole "
            "batch's graph, so its stages do not apply; plan the graph traced at one micro-batch "
            "(plan_graph(..., graph_batch=...)), or use autopart.compile or `autopart emit`, which "
            "do so."
        )
    if plan.tp is not None:
        check_tp_plan(run_gm, plan.tp)  # a plan for another graph is an error, never applied
    return run_gm, value_metas(run_gm, ProgramInputs.of(args, kwargs).micro_batch(batch, chunks))


def _emit_program(
    program: ParallelProgram,
    out: Path,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None,
    target: torch.Tensor | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    steps: int,
    lr: float,
) -> Path:
    import torch.distributed as dist

    from autopart.passes.split_stages import stage_info
    from autopart.planning.mesh_plan import batch_size

    plan = program.plan
    loss = loss_fn if loss_fn is not None else program._loss_fn
    if loss is None or target is None:
        raise EmitError(
            "emit(program) needs target= (the batch's target) and a loss: pass loss_fn= here or to "
            "autopart.compile."
        )
    if example_inputs is None and not example_kwargs:
        inputs = tuple(program._inputs.flat)
    else:  # checked against the structure compile saw
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        inputs = tuple(program._inputs.flatten(tuple(args), dict(example_kwargs or {})))
    _check_target(target, batch_size(inputs), plan.micro_batches)
    stages = tuple(program._all_stages)
    emitted = _Program(
        plan=plan,
        stages=stages,
        infos=tuple(stage_info(s) for s in stages),
        inputs=tuple(_cpu(x) for x in inputs),
        target=_cpu(target),
        loss_fn=loss,
        steps=steps,
        lr=lr,
        io=program._all_metas,
        layout=program._state.layout,
    )
    sources = _sources(emitted)  # every rank: a mistake raises everywhere, nobody waits
    # Every rank's parameters and buffers, TP shards joined back into whole tensors.
    state = program._gather_state(to=0)  # rank 0 writes
    status: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            _write(emitted, out, _ordered_state(stages, state), sources)
        except Exception as exc:  # told to every rank, so none waits for files that never come
            status[0] = f"rank 0 could not write {out}: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise EmitError(str(status[0]))
    return out


def _check_target(target: Any, batch: int, micro_batches: int) -> None:
    if not isinstance(target, torch.Tensor) or target.dim() == 0 or target.shape[0] != batch:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise EmitError(
            f"target must be a tensor with the batch's {batch} samples in dimension 0 (the pipeline "
            f"splits it into {micro_batches} micro-batches), got {got}."
        )


def _cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def _state_of(stages: Sequence[GraphModule]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, t in stage.state_dict().items():
            state.setdefault(name, t)
    return state


def _ordered_state(
    stages: Sequence[GraphModule], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` in stage order: the same bytes whichever rank each tensor came from."""
    names = dict.fromkeys(name for stage in stages for name in stage.state_dict())
    return {name: state[name] for name in names}


# -- writing ---------------------------------------------------------------------------------------


def _write(
    program: _Program,
    out: Path,
    state: Mapping[str, torch.Tensor],
    sources: Mapping[str, str] | None = None,
) -> None:
    files = sources if sources is not None else _sources(program)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    # clone(): a tensor that views a larger storage would otherwise save all of it.
    weights = {
        name: _cpu(t).clone() if isinstance(t, torch.Tensor) else t
        for name, t in {**state, **program.layout.constants}.items()
    }
    torch.save(weights, out / "weights.pt")
    data = {
        "inputs": [_cpu(x).clone() if isinstance(x, torch.Tensor) else x for x in program.inputs],
        "target": program.target.detach().cpu().clone(),
    }
    torch.save(data, out / "data.pt")


def _launcher_source() -> str:
    return resources.files("autopart.codegen.templates").joinpath("run.py").read_text()


def _template_source(name: str) -> str:
    return resources.files("autopart.codegen.templates").joinpath(name).read_text()


def _config(program: _Program) -> str:
    plan = program.plan
    tied: dict[str, list[int]] = {}
    for info in program.infos:
        for name, stages in info.shared_params.items():
            tied.setdefault(name, list(stages))
    # fsdp where FSDP2 holds the stages (an fsdp axis, or mixed precision: FSDP2's policy)
    axes = ("dp", "fsdp", "pp", "tp") if plan.under_fsdp else ("dp", "pp", "tp")
    mesh = {axis: plan.mesh.get(axis, 1) for axis in axes}
    config = {
        "format_version": CONFIG_FORMAT_VERSION,
        "model": plan.model,
        "world_size": math.prod(mesh.values()),
        "mesh": mesh,
        "schedule": plan.schedule,
        "micro_batches": plan.micro_batches,
        "stages_per_rank": plan.stages_per_device,
        "stage_ranks": [s.device for s in plan.stages],
        "tied_parameters": dict(sorted(tied.items())),
        "inputs": [_describe(x) for x in program.inputs],
        "target": _describe(program.target),
        "stage_io": [
            {
                "inputs": [_describe_meta(m) for m in program.io[i.index][0]],
                "outputs": [_describe_meta(m) for m in program.io[i.index][1]],
            }
            for i in program.infos
        ],
        "steps": program.steps,
        "lr": program.lr,
        # the model's state_dict() keys, in order -> the stage tensor (or weights.pt entry) holding it
        "state_dict": dict(program.layout.sources),
    }
    if plan.precision != "model":  # only then, so other programs' config is unchanged
        config["precision"] = plan.precision
    if plan.reshard_after_forward:  # the same
        config["reshard_after_forward"] = True
    if plan.schedule in SPLIT_BACKWARD:  # only then, so other programs' config is unchanged
        config["weight_grads_with_input_grads"] = stages_keeping_weight_grads(
            {i.index: s for i, s in zip(program.infos, program.stages)},
            {i.index: [m.requires_grad for m in program.io[i.index][0]] for i in program.infos},
        )
    text = json.dumps(config, indent=1)
    # Lists of numbers on one line: shapes read [8, 16], not one number a line.
    return re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]", _one_line, text) + "\n"


def _one_line(match: re.Match[str]) -> str:
    return "[" + ", ".join(x.strip() for x in match.group(1).split(",")) + "]"


def _describe_meta(meta: torch.Tensor) -> dict[str, Any]:
    return {
        "shape": list(meta.shape),
        "dtype": str(meta.dtype),
        "requires_grad": meta.requires_grad,
    }


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    return {"value": repr(x)}


# -- stage files -----------------------------------------------------------------------------------


class _Expr:
    """A value fx prints as the Python expression ``text``: a stage attribute such as
    ``self.device`` standing for a value the trace or the TP pass baked into the graph."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_TP_GROUP = "__autopart_emit_tp_group__"
"""The group name the TP template is sharded with; every use becomes ``self.tp_group``."""
_TEMPLATE_RANK = 1
"""The TP rank the template is sharded for: its rank arguments become ``self.tp_rank``."""
_RESERVED = ("device", "tp_rank", "tp_group")


def _tp_storage(program: _Program) -> dict[str, Placement] | None:
    """How every parameter and buffer is stored on a TP rank (None without TP)."""
    from autopart.passes.tp.shard import param_placements

    tp = program.plan.tp
    if tp is None or tp.degree == 1:
        return None
    return param_placements(program.stages, tp)


def _tp_template(stage: GraphModule, plan: Plan, storage: Mapping[str, Placement]) -> GraphModule:
    """``stage`` as every TP rank runs it: :func:`~autopart.passes.tp.shard.shard_tp`'s rewrite
    (local shapes, collectives) for one rank, with that rank's number and its group's name replaced
    by ``self.tp_rank`` and ``self.tp_group``: the shapes are the same on every rank (the degree
    divides every split size), only the rank and group differ."""
    from autopart.passes.tp.shard import shard_tp

    assert plan.tp is not None
    template = shard_tp(stage, plan.tp, _TEMPLATE_RANK, _TP_GROUP, storage=storage)
    rank = _Expr("self.tp_rank")
    for node in template.graph.nodes:
        if node.op != "call_function":
            continue
        args = [_Expr("self.tp_group") if a == _TP_GROUP else a for a in node.args]
        if node.target in (collectives.tp_all_gather, collectives.tp_slice):
            assert args[4] == _TEMPLATE_RANK
            args[4] = rank
        elif node.target is collectives.tp_vocab_embedding:  # start = rank * local rows
            args[2] = _Expr(f"self.tp_rank * {node.args[2] // _TEMPLATE_RANK}")
        elif node.target is collectives.tp_partial_bias:  # the bias is added by rank 0
            args[2] = _Expr("self.tp_rank == 0")
        node.args = tuple(args)
    return template


def _stage_file(
    stage: GraphModule,
    info: StageInfo,
    plan: Plan,
    storage: Mapping[str, Placement] | None,
    layers: Collection[str],
) -> str:
    """The source of stage ``info.index``; ``layers``: the model's repeated layers, each made its
    own module (an FSDP unit) where FSDP2 holds the parameters, or none."""
    k = info.index
    where = f"stage {k}"
    whole = stage
    if storage is not None:
        stage = _tp_template(stage, plan, storage)
    mine = [r for r in plan.recompute if r.stage == k]
    if mine:  # the blocks the plan recomputes, under torch's checkpointing as the runtime runs
        stage = checkpoint_blocks(
            copy.deepcopy(stage), [r.nodes for r in mine], selective=[r.selective for r in mine]
        )
    if layers:  # one FSDP unit per layer, as the runtime shards them
        stage = copy.deepcopy(stage) if not mine else stage
        split_layer_units(stage, layers)
    units = layer_units(stage)
    graph = _portable_graph(stage, where)
    modules = _called_modules(stage, graph, where, skip=units)
    subgraphs = _subgraphs(stage, graph, where)
    body, imports = _forward_source(graph, where)
    classes, more = _subgraph_classes(stage, subgraphs, where)
    unit_classes: dict[str, str] = {}
    for i, (target, unit) in enumerate(units.items()):
        unit_where = f"{where}, layer {target!r}"
        unit_graph = _portable_graph(unit, unit_where)
        inner = _subgraphs(unit, unit_graph, unit_where)
        unit_body, unit_imports = _forward_source(unit_graph, unit_where)
        inner_classes, inner_imports = _subgraph_classes(unit, inner, unit_where)
        classes += inner_classes
        more += [*unit_imports, *inner_imports]
        unit_classes[target] = _unit_class_name(i, target)
        classes += _unit_class(unit_classes[target], target, inner, unit_body)
    imports = list(dict.fromkeys([*imports, *more]))
    under = tuple(f"{m}." for m in (*modules, *subgraphs))
    params = [(n, p) for n, p in stage.named_parameters() if not n.startswith(under)]
    buffers = [(n, b) for n, b in stage.named_buffers() if not n.startswith(under)]
    names = [*(n for n, _ in params), *(n for n, _ in buffers), *modules, *subgraphs]
    clash = sorted({n.split(".")[0] for n in names} & set(_RESERVED))
    if clash:
        raise EmitError(
            f"{where} has a top-level attribute named {clash[0]!r}, which the emitted stage uses "
            f"for itself ({', '.join(_RESERVED)}); rename that submodule or parameter of the model."
        )
    frozen = [n for n, p in params if not p.requires_grad]
    sharded = {
        n: storage[n]
        for n, _ in (*params, *buffers)
        if storage is not None and n in storage and storage[n].is_shard
    }

    lines = [
        f'"""{_stage_header(whole, info, plan, sharded)}"""',
        "",
        "from __future__ import annotations",
        "",
    ]
    lines += [*imports, ""]
    if storage is not None:
        assert plan.tp is not None
        lines.append(f"TP_DEGREE = {plan.tp.degree}")
        lines.append("# Shapes as one TP rank holds them: its shard of each tensor in SHARDED")
    lines += _table("PARAMETERS", params)
    lines += _table("BUFFERS", buffers)
    if storage is not None:
        lines += _sharded_table(sharded)
    if frozen:
        names_src = ", ".join(json.dumps(n) for n in frozen)
        lines.append(f"FROZEN = ({names_src},)  # parameters the model does not train")
    lines += ["", ""]
    lines += classes
    lines.append(f"class Stage{k}(torch.nn.Module):")
    lines.append(
        f'    """Stage {k}: parameters and buffers under the model\'s own names; forward is the '
        'traced code."""'
    )
    lines.append("")
    if storage is None:
        lines.append('    def __init__(self, device: torch.device | str = "cpu") -> None:')
    else:
        lines.append(
            '    def __init__(self, device: torch.device | str = "cpu", tp_rank: int = 0, '
            'tp_group: str = "") -> None:'
        )
    lines.append("        super().__init__()")
    lines.append("        self.device = torch.device(device)")
    if storage is not None:
        lines.append("        self.tp_rank = tp_rank  # this rank's place in its TP group")
        lines.append("        self.tp_group = tp_group  # the group's name, for the collectives")
    if unit_classes:
        lines.append(
            "        # each layer its own module (an FSDP unit), its tensors registered into it below"
        )
        for target, cls in unit_classes.items():
            lines.append(f"        _register(self, {json.dumps(target)}, {cls}(self.device))")
    lines.append("        for name, (shape, dtype) in PARAMETERS.items():")
    lines.append("            param = torch.empty(shape, dtype=dtype, device=self.device)")
    lines.append("            _register(self, name, torch.nn.Parameter(param))")
    lines.append("        for name, (shape, dtype) in BUFFERS.items():")
    lines.append(
        "            _register(self, name, torch.empty(shape, dtype=dtype, device=self.device))"
    )
    if frozen:
        lines.append("        for name in FROZEN:")
        lines.append("            self.get_parameter(name).requires_grad_(False)")
    if modules:
        lines.append(
            "        # torch.nn modules the graph calls whole (the torch.fx tracer keeps them)"
        )
        for target, expr in modules.items():
            lines.append(f"        _register(self, {json.dumps(target)}, {expr}.to(self.device))")
    if subgraphs:
        lines.append("        # subgraphs the forward runs under higher-order ops")
        for target in subgraphs:
            cls = _subgraph_class_name(target)
            lines.append(f"        _register(self, {json.dumps(target)}, {cls}(self.device))")
    lines.append("")
    lines.append(body)
    lines += ["", "", _REGISTER]
    return "\n".join(lines)


def _forward_source(graph: Graph, where: str) -> tuple[str, list[str]]:
    """The ``forward`` method fx writes for ``graph`` (indented for a class body) and the import
    lines it needs."""
    code = graph.python_code(root_module="self")
    src, globals_ = _short_collective_names(code.src, code.globals)
    body = textwrap.indent(src.strip("\n").rstrip(), "    ")
    return body, _graph_imports(globals_, src, where)


def _subgraphs(stage: GraphModule, graph: Graph, where: str) -> dict[str, GraphModule]:
    """``get_attr`` target -> the subgraph it reads, for the graphs a higher-order op runs
    (``wrap_with_set_grad_enabled``, ``wrap_with_autocast``: export's form of a ``with
    torch.no_grad()`` or ``torch.autocast`` block, e.g. in Hugging Face's rotary embeddings).
    Each is emitted as a small module class whose forward is its code."""
    found: dict[str, GraphModule] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = stage.get_submodule(".".join(str(node.target).split(".")[:-1]))
        attr = getattr(value, str(node.target).split(".")[-1])
        if isinstance(attr, torch.Tensor):
            continue
        inner = isinstance(attr, GraphModule) and [
            n for n in attr.graph.nodes if n.op in ("get_attr", "call_module")
        ]
        if not isinstance(attr, GraphModule) or inner:
            what = f"reads {inner[0].target!r}" if inner else f"is a {type(attr).__name__}"
            raise EmitError(
                f"{where}: node {node.name!r} reads {node.target!r}, which {what}: only tensors "
                "and subgraphs of plain tensor ops can be emitted as source."
            )
        found.setdefault(str(node.target), attr)
    return found


def _subgraph_classes(
    owner: GraphModule, subgraphs: Mapping[str, GraphModule], where: str
) -> tuple[list[str], list[str]]:
    """The source lines of a class per subgraph of ``owner`` (a stage or a layer unit), and the
    imports their code needs."""
    classes: list[str] = []
    imports: list[str] = []
    for target, sub in subgraphs.items():
        sub_where = f"{where}, subgraph {target!r}"
        sub_body, sub_imports = _forward_source(_portable_graph(sub, sub_where), sub_where)
        imports += sub_imports
        classes += _subgraph_class(_subgraph_class_name(target), target, sub_body)
    return classes, imports


def _unit_class(
    cls: str, target: str, subgraphs: Mapping[str, GraphModule], body: str
) -> list[str]:
    """A layer of the stage as its own module (an FSDP unit, ``fsdp_unit = True``): the stage
    registers the layer's tensors into it under their names and calls it."""
    lines = [
        f"class {cls}(torch.nn.Module):",
        f'    """Layer {target!r}: its own module, so that FSDP2 shards it as one unit."""',
        "",
        "    fsdp_unit = True",
        "",
        '    def __init__(self, device: torch.device | str = "cpu") -> None:',
        "        super().__init__()",
        "        self.device = torch.device(device)",
    ]
    for name in subgraphs:
        sub = _subgraph_class_name(name)
        lines.append(f"        _register(self, {json.dumps(name)}, {sub}(self.device))")
    return [*lines, "", body, "", ""]


def _unit_class_name(index: int, target: str) -> str:
    return f"Layer{index}_" + re.sub(r"\W", "_", target)


def _subgraph_class_name(target: str) -> str:
    return "Subgraph_" + re.sub(r"\W", "_", target)


def _subgraph_class(cls: str, target: str, body: str) -> list[str]:
    return [
        f"class {cls}(torch.nn.Module):",
        f'    """Subgraph {target!r}: the code a higher-order op of the stage runs."""',
        "",
        '    def __init__(self, device: torch.device | str = "cpu") -> None:',
        "        super().__init__()",
        "        self.device = torch.device(device)",
        "",
        body,
        "",
        "",
    ]


def _sharded_table(sharded: Mapping[str, Placement]) -> list[str]:
    """``SHARDED = {"h.0.mlp.c_fc.weight": (1, 1), ...}``: (dim, groups) of each split tensor."""
    head = "SHARDED: dict[str, tuple[int, int]] = {"
    if not sharded:
        return [head + "}  # every tensor is whole on every TP rank"]
    rows = [f"    {json.dumps(n)}: ({p.dim}, {p.groups})," for n, p in sharded.items()]
    return [
        "# Split across the TP ranks: (dimension, interleaved groups) -> collectives.shard",
        head,
        *rows,
        "}",
    ]


def _table(name: str, tensors: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """``NAME = {"layers.0.weight": ([64, 32], torch.float32), ...}`` as source lines."""
    head = f"{name}: dict[str, tuple[list[int], torch.dtype]] = {{"
    if not tensors:
        return [head + "}"]
    rows = [f"    {json.dumps(n)}: ({list(t.shape)}, {t.dtype})," for n, t in tensors]
    return [head, *rows, "}"]


_REGISTER = '''\
def _register(root: torch.nn.Module, name: str, value: torch.Tensor | torch.nn.Module) -> None:
    """Register ``value`` as ``root``'s dotted ``name`` (e.g. ``layers.0.weight``), creating the
    modules on the way, so ``state_dict()`` keys are the model's own names."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module.get_submodule(part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, torch.nn.Module):
        module.add_module(leaf, value)
    else:
        module.register_buffer(leaf, value)
'''


def _stage_header(
    stage: GraphModule, info: StageInfo, plan: Plan, sharded: Mapping[str, Placement]
) -> str:
    k, n = info.index, info.num_stages
    step = plan.stages[k]
    parallel = {a: v for a, v in plan.mesh.items() if a != "pp" and v > 1}
    where = f"rank {step.device}"
    if parallel:  # every (dp, tp) coordinate has a pipeline of its own
        mesh = " x ".join(f"{a}={v}" for a, v in parallel.items())
        where = f"pipeline rank {step.device} of every {mesh} coordinate"
    first = f"Pipeline stage {k} of {n} of {plan.model}, written by autopart.emit; runs on {where}."
    lines = [*textwrap.wrap(first, 96), ""]
    modules = ", ".join(m for m in step.modules if m != "<root>") or "(none)"
    lines += textwrap.wrap(f"Modules: {modules}", 96, subsequent_indent="    ")
    nodes = info.node_names
    span = f"{nodes[0]} ... {nodes[-1]}" if len(nodes) > 1 else (nodes[0] if nodes else "-")
    lines.append(f"Nodes: {len(nodes)} ({span})")
    source = "the model's inputs" if k == 0 else f"from stage {k - 1}"
    lines += textwrap.wrap(
        f"Inputs ({source}): {', '.join(info.input_names) or '-'}", 96, subsequent_indent="    "
    )
    dest = "the model's outputs, flattened" if info.is_last else f"to stage {k + 1}"
    lines += textwrap.wrap(
        f"Outputs ({dest}): {', '.join(info.output_names) or '-'}", 96, subsequent_indent="    "
    )
    if info.passthrough_names:
        lines += textwrap.wrap(
            f"Passed through unchanged: {', '.join(info.passthrough_names)}",
            96,
            subsequent_indent="    ",
        )
    count = sum(p.numel() for p in stage.parameters())
    lines.append(f"Parameters: {len(info.param_names)} tensors, {count:,} elements")
    if plan.tp is not None and plan.tp.degree > 1:
        d = plan.tp.degree
        lines += textwrap.wrap(
            f"Tensor parallel: each of the {d} TP ranks of this stage runs this code on its own "
            f"shard of the {len(sharded)} tensors in SHARDED (1/{d} each; run.py cuts them from "
            "the whole weights with collectives.shard) and the whole of the others; "
            "collectives.py's tp_* functions join the pieces over the TP group (tp_group).",
            96,
        )
    for name, holders in sorted(info.shared_params.items()):
        others = ", ".join(str(s) for s in holders if s != k)
        lines.append(
            f"Tied: {name} is also on stage(s) {others}; run.py sums the copies' gradients."
        )
    return "\n".join(lines) + "\n"


def _portable_graph(stage: GraphModule, where: str) -> Graph:
    """A copy of the stage's graph whose baked-in devices read the stage's own device."""
    graph = Graph()
    out = graph.graph_copy(stage.graph, {})
    graph.output(out)
    here = _Expr("self.device")

    def portable(value: Any) -> Any:
        if isinstance(value, torch.device):
            return here
        if isinstance(value, torch.Tensor):
            raise EmitError(
                f"{where}: a node has a tensor constant as an argument, which has no source form; "
                "register it as a buffer of the model instead."
            )
        return value

    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.args = map_aggregate(node.args, portable)
            node.kwargs = map_aggregate(node.kwargs, portable)
    graph.lint()
    return graph


def _called_modules(
    stage: GraphModule, graph: Graph, where: str, *, skip: Collection[str] = ()
) -> dict[str, str]:
    """``call_module`` target -> the torch.nn constructor expression that rebuilds it (but the
    targets in ``skip``)."""
    exprs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in exprs and node.target not in skip:
            module = stage.get_submodule(str(node.target))
            exprs[str(node.target)] = torch_module_expr(module, f"{where}: module {node.target!r}")
    return exprs


def _short_collective_names(src: str, globals_: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """fx names the TP collectives by their qualified name
    (``autopart_codegen_templates_collectives_tp_copy``); the stage reads ``collectives.tp_copy`` instead,
    from ``import collectives`` (unless the code already has a variable of that name)."""
    names = {n: obj for n, obj in globals_.items() if _is_collective(obj)}
    if not names or re.search(r"\bcollectives\b", src):
        return src, dict(globals_)
    for name, obj in names.items():
        src = re.sub(rf"\b{name}\b", f"collectives.{obj.__name__}", src)
    rest = {n: obj for n, obj in globals_.items() if n not in names}
    return src, {**rest, "collectives": collectives}


def _is_collective(obj: Any) -> bool:
    return getattr(obj, "__module__", None) == collectives.__name__


def _graph_imports(globals_: Mapping[str, Any], src: str, where: str) -> list[str]:
    """Import lines for the globals fx's code reads (``torch`` always)."""
    from torch.fx.graph import _custom_builtins

    used = set(global_names(compile(src, f"<{where}>", "exec")))
    lines = ["import torch"]
    local = []  # the TP collectives and the checkpoint policy, from the files next to the stage
    for name, obj in globals_.items():
        if name == "torch" or name not in used:
            continue
        if obj is collectives:
            local.append("import collectives")
        elif _is_collective(obj) or obj is checkpoint_saving_matmuls:
            alias = "" if name == obj.__name__ else f" as {name}"
            home = "collectives" if _is_collective(obj) else "checkpointing"
            local.append(f"from {home} import {obj.__name__}{alias}")
        elif name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif getattr(builtins, name, None) is not obj:
            lines.append(import_line(name, obj, f"{where} calls {name}"))
    return import_block(lines) + (["", *sorted(local)] if local else [])
