"""``autopart.emit``: write a pipeline program as a standalone Python program run with torchrun.

``emit(plan_or_program, out_dir, ...)`` writes into ``out_dir``::

    run.py        the launcher, copied verbatim from autopart/_emitted/run.py (the same file for
                  every model): torchrun --nproc-per-node N run.py [--steps S] [--lr LR]
    config.json   what run.py reads: ranks, schedule, micro-batches, stage -> rank, tied parameters,
                  the batch's shapes, default steps and learning rate
    plan.json     the plan the stages come from (for reference; run.py does not read it)
    stage_K.py    one file per pipeline stage: class ``StageK(torch.nn.Module)``
    loss.py       the loss: the user's loss function as source, wrapped for the last stage
    weights.pt    every parameter and buffer under the model's own names (torch.save)
    data.pt       the batch the program trains on: {"inputs": [...], "target": tensor}

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

Imports, torch.nn rebuilds and loss.py are made in :mod:`autopart._source`.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
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

from autopart._source import (
    EmitError,
    global_names,
    import_block,
    import_line,
    loss_file,
    torch_module_expr,
)
from autopart.errors import AutopartError
from autopart.plans import Plan, format_mesh

if TYPE_CHECKING:
    from autopart.passes.split_stages import StageInfo
    from autopart.runtime import ParallelProgram

__all__ = ["CONFIG_FORMAT_VERSION", "EmitError", "emit", "emit_model"]

CONFIG_FORMAT_VERSION = 1


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

    From a :class:`~autopart.runtime.ParallelProgram`: call it on every rank (the weights are
    gathered to rank 0, which writes); ``example_inputs`` and ``loss_fn`` default to those given to
    :func:`autopart.compile`, ``target`` is required. From a :class:`Plan`: ``model`` (with real
    weights), ``example_inputs`` (one global batch, the shapes the plan was made for), ``target``
    and ``loss_fn`` are required. ``steps`` and ``lr`` are run.py's defaults (SGD). Existing files
    of the same names in ``out_dir`` are replaced.
    """
    from autopart.runtime import ParallelProgram

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
    *,
    mesh: str = "pp=2",
    micro_batches: int | None = None,
    schedule: str = "auto",
    device: str = "cpu",
    batch: int | None = None,
    seq: int | None = None,
    config: str | None = None,
    steps: int = 10,
    lr: float = 0.01,
) -> tuple[Plan, Path]:
    """``autopart emit``: build the MODEL string ``spec`` (seed 0), a random target and loss for
    its example batch (:func:`autopart.launch.training_batch`), plan it for ``mesh`` with the
    ``device`` cost model, and :func:`emit` it. Without ``micro_batches``, fewer micro-batches are
    tried when the model's graph changes at the planned micro-batch size, as :func:`compile` does."""
    from autopart.launch import training_batch
    from autopart.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate
    from autopart.planner import _batch_size, plan_graph
    from autopart.plans import parse_mesh
    from autopart.runtime import _micro_batch_graph
    from autopart.tracing import trace

    _check_axes(parse_mesh(mesh))  # before any tracing
    overrides = parse_config_overrides(config) if config else None
    loaded = load_model(spec, batch=batch, seq=seq, config=overrides, device="cpu", seed=0)
    args, kwargs = tuple(loaded.example_inputs), dict(loaded.example_kwargs)
    target, loss_fn = training_batch(loaded)
    gm = annotate(trace(loaded.model, args, kwargs))
    size = _batch_size(tree_flatten((args, kwargs))[0])

    def make(m: int | None) -> Plan:
        return plan_graph(
            gm,
            batch=size,
            mesh=mesh,
            device=device,
            micro_batches=m,
            schedule=schedule,
            name=loaded.name,
        )

    plan = make(micro_batches)
    if micro_batches is None:
        fewer = [m for m in range(plan.micro_batches - 1, 0, -1) if size % m == 0]
        while (
            fewer
            and _micro_batch_graph(loaded.model, gm, args, kwargs, size, plan.micro_batches) is None
        ):
            try:
                plan = make(fewer.pop(0))
            except AutopartError:
                continue
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
    files["loss.py"] = loss_file(program.loss_fn, program.infos[-1].output_spec)
    for stage, info in zip(program.stages, program.infos):
        files[f"stage_{info.index}.py"] = _stage_file(stage, info, plan)
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
    from autopart.planner import _batch_size
    from autopart.runtime import _micro_batch_graph
    from autopart.tracing import trace

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
    _check_axes(plan.mesh)
    meta = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.is_meta]
    if meta:
        raise EmitError(
            f"the model's tensors are on the meta device ({meta[0]!r}, ...): emit writes the weights, "
            "so build the model with real weights (device='cpu')."
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    flat, _ = tree_flatten((args, kwargs))
    batch = _batch_size(flat)
    _check_target(target, batch, plan.micro_batches)
    assert target is not None
    if batch % plan.micro_batches:
        raise EmitError(
            f"a batch of {batch} does not split into the plan's {plan.micro_batches} micro-batches; "
            "pass the batch the plan was made for."
        )
    gm = trace(model, args, kwargs)
    run_gm = _micro_batch_graph(model, gm, args, kwargs, batch, plan.micro_batches)
    if run_gm is None:
        raise EmitError(
            f"{type(model).__name__} traces to a different graph at micro-batch size "
            f"{batch // plan.micro_batches} than at batch size {batch}, so the plan's stages cannot "
            "be reused; plan again with another micro_batches."
        )
    stages = split_stages(run_gm, plan)
    return _Program(
        plan=plan,
        stages=tuple(stages),
        infos=tuple(stage_info(s) for s in stages),
        inputs=tuple(flat),
        target=target,
        loss_fn=loss_fn,
        steps=steps,
        lr=lr,
    )


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
    from autopart.planner import _batch_size

    plan = program.plan
    _check_axes(plan.mesh)
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
    _check_target(target, _batch_size(inputs), plan.micro_batches)
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
    )
    sources = _sources(emitted)  # every rank: a mistake raises everywhere, nobody waits
    group = program._group
    mine = {
        name: t.detach().cpu()
        for stage in program._stages
        for name, t in stage.state_dict().items()
    }
    root = dist.get_global_rank(group, 0)
    parts: list[Any] | None = [None] * dist.get_world_size(group) if program._pp_rank == 0 else None
    dist.gather_object(mine, parts, dst=root, group=group)
    status: list[Any] = [None]
    if parts is not None:
        state: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, t in part.items():
                state.setdefault(name, t)
        try:
            _write(emitted, out, _ordered_state(stages, state), sources)
        except Exception as exc:  # told to every rank, so none waits for files that never come
            status[0] = f"rank 0 could not write {out}: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(status, src=root, group=group)
    if status[0] is not None:
        raise EmitError(str(status[0]))
    return out


def _check_axes(mesh: Mapping[str, int]) -> None:
    extra = {k: v for k, v in mesh.items() if k != "pp" and v > 1}
    if extra:
        raise EmitError(
            f"the mesh has {format_mesh(extra)}: only pipeline parallelism (pp) can be emitted so "
            "far; emit a plan for a pp-only mesh such as 'pp=2'."
        )


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
    weights = {name: t.detach().cpu().clone() for name, t in state.items()}
    torch.save(weights, out / "weights.pt")
    data = {
        "inputs": [_cpu(x).clone() if isinstance(x, torch.Tensor) else x for x in program.inputs],
        "target": program.target.detach().cpu().clone(),
    }
    torch.save(data, out / "data.pt")


def _launcher_source() -> str:
    return resources.files("autopart").joinpath("_emitted", "run.py").read_text()


def _config(program: _Program) -> str:
    plan = program.plan
    tied: dict[str, list[int]] = {}
    for info in program.infos:
        for name, stages in info.shared_params.items():
            tied.setdefault(name, list(stages))
    config = {
        "format_version": CONFIG_FORMAT_VERSION,
        "model": plan.model,
        "world_size": plan.mesh.get("pp", 1),
        "schedule": plan.schedule,
        "micro_batches": plan.micro_batches,
        "stages_per_rank": plan.stages_per_device,
        "stage_ranks": [s.device for s in plan.stages],
        "tied_parameters": dict(sorted(tied.items())),
        "inputs": [_describe(x) for x in program.inputs],
        "target": _describe(program.target),
        "steps": program.steps,
        "lr": program.lr,
    }
    text = json.dumps(config, indent=1)
    # Lists of numbers on one line: shapes read [8, 16], not one number a line.
    return re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]", _one_line, text) + "\n"


def _one_line(match: re.Match[str]) -> str:
    return "[" + ", ".join(x.strip() for x in match.group(1).split(",")) + "]"


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    return {"value": repr(x)}


# -- stage files -----------------------------------------------------------------------------------


class _StageDevice:
    """Stands for a device baked into the graph; fx prints it as the stage's own device."""

    def __repr__(self) -> str:
        return "self.device"


def _stage_file(stage: GraphModule, info: StageInfo, plan: Plan) -> str:
    k = info.index
    where = f"stage {k}"
    graph = _portable_graph(stage, where)
    modules = _called_modules(stage, graph, where)
    code = graph.python_code(root_module="self")
    body = textwrap.indent(code.src.strip("\n").rstrip(), "    ")
    imports = _graph_imports(code.globals, code.src, where)
    under = tuple(f"{m}." for m in modules)
    params = [(n, p) for n, p in stage.named_parameters() if not n.startswith(under)]
    buffers = [(n, b) for n, b in stage.named_buffers() if not n.startswith(under)]
    names = [*(n for n, _ in params), *(n for n, _ in buffers), *modules]
    if any(n.split(".")[0] == "device" for n in names):
        raise EmitError(
            f"{where} has a top-level attribute named 'device', which the emitted stage uses for its "
            "own device; rename that submodule or parameter of the model."
        )
    frozen = [n for n, p in params if not p.requires_grad]

    lines = [
        f'"""{_stage_header(stage, info, plan)}"""',
        "",
        "from __future__ import annotations",
        "",
    ]
    lines += [*imports, ""]
    lines += _table("PARAMETERS", params)
    lines += _table("BUFFERS", buffers)
    if frozen:
        names_src = ", ".join(json.dumps(n) for n in frozen)
        lines.append(f"FROZEN = ({names_src},)  # parameters the model does not train")
    lines += ["", ""]
    lines.append(f"class Stage{k}(torch.nn.Module):")
    lines.append(
        f'    """Stage {k}: parameters and buffers under the model\'s own names; forward is the '
        'traced code."""'
    )
    lines.append("")
    lines.append('    def __init__(self, device: torch.device | str = "cpu") -> None:')
    lines.append("        super().__init__()")
    lines.append("        self.device = torch.device(device)")
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
    lines.append("")
    lines.append(body)
    lines += ["", "", _REGISTER]
    return "\n".join(lines)


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


def _stage_header(stage: GraphModule, info: StageInfo, plan: Plan) -> str:
    k, n = info.index, info.num_stages
    step = plan.stages[k]
    lines = [
        f"Pipeline stage {k} of {n} of {plan.model}, written by autopart.emit; runs on rank {step.device}.",
        "",
    ]
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
    here = _StageDevice()

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


def _called_modules(stage: GraphModule, graph: Graph, where: str) -> dict[str, str]:
    """``call_module`` target -> the torch.nn constructor expression that rebuilds it."""
    exprs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            value = stage.get_submodule(".".join(str(node.target).split(".")[:-1]))
            attr = getattr(value, str(node.target).split(".")[-1])
            if not isinstance(attr, torch.Tensor):
                raise EmitError(
                    f"{where}: node {node.name!r} reads {node.target!r}, a {type(attr).__name__}, "
                    "not a tensor (e.g. a subgraph of a higher-order op), which cannot be emitted "
                    "as source yet."
                )
        if node.op == "call_module" and node.target not in exprs:
            module = stage.get_submodule(str(node.target))
            exprs[str(node.target)] = torch_module_expr(module, f"{where}: module {node.target!r}")
    return exprs


def _graph_imports(globals_: Mapping[str, Any], src: str, where: str) -> list[str]:
    """Import lines for the globals fx's code reads (``torch`` always)."""
    from torch.fx.graph import _custom_builtins

    used = set(global_names(compile(src, f"<{where}>", "exec")))
    lines = ["import torch"]
    for name, obj in globals_.items():
        if name == "torch" or name not in used:
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif getattr(builtins, name, None) is not obj:
            lines.append(import_line(name, obj, f"{where} calls {name}"))
    return import_block(lines)
