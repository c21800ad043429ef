"""Split a traced graph into one ``GraphModule`` per pipeline stage, as a plan's ``stage_of`` says.

Each stage module owns the parameters and buffers its nodes read, under the model's own names
(``stage.named_parameters()`` yields e.g. ``transformer.h.0.attn.c_attn.weight``). A stage's
``forward`` takes positional tensors and returns a tuple, so stages chain as ``out = stage(*out)``:

- stage 0 takes every model input (pipelining feeds inputs only to the first stage);
- stage ``k > 0`` takes exactly the values live across boundary ``k-1 | k``: produced before it
  (by an earlier stage or as a model input) and needed by it or by a later stage. A value that skips
  a stage (a U-Net's long skip, a RoPE table sliced on stage 0) is passed through unchanged;
- stage ``k`` returns the inputs of stage ``k + 1``, in fx node order; the last stage returns the
  model's tensor outputs flattened, which :func:`rebuild_output` turns back into the model's output
  structure (with its constant leaves, such as a ``None`` field, put back in place).

A parameter read on two stages (tied embeddings) is copied into both and recorded in
:attr:`StageInfo.shared_params`, so the runtime can sum the copies' gradients. Stage parameters are
new ``nn.Parameter`` objects that alias the model's storage: gradients are per stage, no memory is
copied (meta-device graphs split too), and ``.to(device)`` gives each stage its own copy.

What each stage is, is recorded in ``stage.meta["autopart_stage"]`` (a :class:`StageInfo`).
Non-tensor values cannot cross stages (``torch.distributed.pipelining`` sends tensors only): a
concrete Python scalar is folded into the stage that reads it, anything else raises
:class:`SplitError`. A ``getitem`` of a tuple-valued node runs on its producer's stage.

Graphs from the ``torch.fx`` fallback may contain ``call_module`` nodes; their submodules are shared
by reference with the traced graph, not copied.

In-place writes (``hidden += residual``, BatchNorm's running statistics) run as the model wrote
them: every node that touches a storage written in place must be on one stage
(:func:`autopart.passes.mutations.mutation_groups`; the planner keeps them together), so that
stage runs them in graph order on the same tensors, and a buffer written in place (``running_mean``,
``num_batches_tracked``) is held, and updated, by that one stage. It is state, never recomputed
on another stage.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from autopart.errors import AutopartError
from autopart.passes.mutations import mutation_groups, written_inputs
from autopart.passes.routing import moe_layers
from autopart.planning.plans import Plan

__all__ = [
    "STAGE_META_KEY",
    "SplitError",
    "StageInfo",
    "attr_at",
    "canonical_targets",
    "model_outputs",
    "rebuild_output",
    "set_attr_at",
    "split_stages",
    "stage_info",
]

STAGE_META_KEY = "autopart_stage"
_COMPUTING = ("call_function", "call_method", "call_module")
_INPUT = -1
"""Producer stage of a model input: before stage 0."""


class SplitError(AutopartError):
    """A plan does not fit the graph it is applied to, or a value cannot cross a stage boundary."""


@dataclass(frozen=True, slots=True)
class StageInfo:
    """What one stage module is; stored in ``stage.meta["autopart_stage"]``."""

    index: int
    num_stages: int
    input_names: tuple[str, ...]
    """Graph node names of the stage's positional inputs, in order."""
    output_names: tuple[str, ...]
    """Graph node names of the stage's outputs, in order (last stage: the flat model outputs)."""
    passthrough_names: tuple[str, ...]
    """Inputs the stage does not read but returns for a later stage."""
    node_names: tuple[str, ...]
    """Computing nodes that run on this stage, in graph order."""
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    shared_params: Mapping[str, tuple[int, ...]]
    """Parameter name -> every stage that holds a copy of it (this one included), for parameters
    held by more than one stage; their gradients must be summed across those stages."""
    model_output_indices: tuple[int, ...]
    """Positions in the flat model outputs of the values this stage computes."""
    output_spec: TreeSpec | None
    """Pytree spec of the model's outputs (last stage only; see :func:`rebuild_output`)."""
    output_constants: Mapping[int, Any] = field(default_factory=dict)
    """Leaves of the model's flat outputs that the trace made constants (a ``None`` field), by
    position; the last stage does not return them (pipelining sends and merges tensors only)."""

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def rebuild_output(info: StageInfo, flat: Sequence[Any]) -> Any:
    """The model's output, rebuilt from what the last stage (``info``) returns."""
    assert info.output_spec is not None, "only the last stage returns the model's outputs"
    tensors = iter(flat)
    n = info.output_spec.num_leaves
    leaves = [
        info.output_constants[i] if i in info.output_constants else next(tensors) for i in range(n)
    ]
    return tree_unflatten(leaves, info.output_spec)


def stage_info(stage: GraphModule) -> StageInfo:
    """The :class:`StageInfo` that :func:`split_stages` recorded on ``stage``."""
    info = stage.meta.get(STAGE_META_KEY)
    if not isinstance(info, StageInfo):
        raise SplitError(
            "this GraphModule is not a pipeline stage; build stages with split_stages(gm, plan)."
        )
    return info


def split_stages(gm: GraphModule, plan: Plan) -> list[GraphModule]:
    """One ``GraphModule`` per pipeline stage of ``plan``; see the module docstring for the contract.

    Raises :class:`SplitError` when ``plan.stage_of`` does not match ``gm`` (a computing node
    without a stage, a name the graph lacks, a node on an earlier stage than one of its inputs, a
    stage with no nodes), when it cuts an in-place group or a mixture-of-experts layer
    (:func:`autopart.passes.routing.moe_layers`), or when a non-tensor value would have to cross
    a stage boundary.
    """
    num_stages = plan.num_stages
    _check_plan(gm, plan.stage_of, num_stages)
    stage = _effective_stages(gm, plan.stage_of)
    _check_mutations(gm, stage)
    _check_moe_layers(gm, stage)
    flat_outputs, output_spec = model_outputs(gm)
    last_use = _last_use(gm, stage, num_stages)
    folded = _foldable(gm, stage, last_use)
    constant = _buffer_derived(gm)
    crossing = _crossing(gm, stage, last_use, {**folded, **dict.fromkeys(constant)}, num_stages)
    attr_stages = _attr_stages(gm, stage, num_stages)
    canonical = canonical_targets(gm)
    shared = _shared_params(gm, attr_stages, canonical)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    stages = []
    for s in range(num_stages):
        inputs = placeholders if s == 0 else crossing[s - 1]
        is_last = s == num_stages - 1
        outputs: Sequence[Any] = (
            [v for v in flat_outputs if isinstance(v, Node)] if is_last else crossing[s]
        )
        graph = _stage_graph(
            gm, s, stage, inputs, outputs, attr_stages, folded, canonical, constant
        )
        module = _stage_module(gm, graph, s)
        module.meta[STAGE_META_KEY] = _info(
            module,
            s,
            num_stages,
            stage,
            inputs,
            outputs,
            flat_outputs,
            shared,
            output_spec if is_last else None,
        )
        stages.append(module)
    return stages


# -- validation ---------------------------------------------------------------------------------


def _check_plan(gm: GraphModule, stage_of: Mapping[str, int], num_stages: int) -> None:
    nodes = list(gm.graph.nodes)
    names = {n.name for n in nodes}
    missing = [n.name for n in nodes if n.op in _COMPUTING and n.name not in stage_of]
    unknown = [name for name in stage_of if name not in names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} node(s) of the graph have no stage ({_few(missing)})")
        if unknown:
            parts.append(f"{len(unknown)} stage_of name(s) are not in the graph ({_few(unknown)})")
        raise SplitError(
            f"the plan does not match the graph: {'; '.join(parts)}. The plan was made for another "
            "graph (or the graph changed after planning); plan this graph again with "
            "autopart.planning.planner.plan_graph(gm, ...) and split with that plan."
        )
    for node in nodes:
        if node.op not in _COMPUTING:
            continue
        for arg in node.all_input_nodes:
            if arg.op in _COMPUTING and stage_of[arg.name] > stage_of[node.name]:
                raise SplitError(
                    f"node {node.name!r}{_where(node)} is on stage {stage_of[node.name]} but its "
                    f"input {arg.name!r} is on the later stage {stage_of[arg.name]}: data must flow "
                    f"forward through the pipeline. Put {node.name!r} on stage "
                    f">= {stage_of[arg.name]} (or {arg.name!r} on <= {stage_of[node.name]}), or "
                    "plan the graph again."
                )
    used = {stage_of[n.name] for n in nodes if n.op in _COMPUTING}
    empty = [s for s in range(num_stages) if s not in used]
    if empty:
        raise SplitError(
            f"stage(s) {empty} of the plan's {num_stages} stages have no nodes of this graph: the "
            "plan does not match the graph. Plan this graph again, or with fewer stages."
        )


def _check_mutations(gm: GraphModule, stage: Mapping[Node, int]) -> None:
    for group in mutation_groups(gm):
        stages = sorted({stage[n] for n in group})
        if len(stages) > 1:
            writer = next(n for n in group if written_inputs(n))
            raise SplitError(
                f"node {writer.name!r}{_where(writer)} writes a tensor in place, and the nodes that "
                f"touch that tensor ({_few([n.name for n in group])}) are on stages {stages}: a "
                "stage would see a copy that misses the write. They must share a stage; plan the "
                "graph with autopart.planning.planner.plan_graph, which keeps them together."
            )


def _check_moe_layers(gm: GraphModule, stage: Mapping[Node, int]) -> None:
    for layer in moe_layers(gm):
        stages = sorted({stage[n] for n in layer if n.op in _COMPUTING})
        if len(stages) > 1:
            ref = layer[0].meta.get("autopart_module")
            where = f"the mixture-of-experts layer {ref.path!r}" if ref else "a mixture of experts"
            raise SplitError(
                f"the plan cuts {where} (nodes {_few([layer[0].name, layer[-1].name])}) across "
                f"stages {stages}: its per-expert sizes are known only when it runs, so they "
                "cannot cross a pipeline boundary. A layer must stay on one stage; plan the graph "
                "with autopart.planning.planner.plan_graph, which keeps each one whole."
            )


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (", ..." if len(names) > 3 else "")


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _where(node: Node) -> str:
    """`` (at file:line)`` of the user code that created ``node``, when the trace recorded it."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line = frames[-1]
    return f" (at {path}:{line})"


# -- analysis -------------------------------------------------------------------------------------


def _effective_stages(gm: GraphModule, stage_of: Mapping[str, int]) -> dict[Node, int]:
    """Stage of every computing node; model inputs are ``_INPUT``. A ``getitem`` of a tuple-valued
    node moves to its producer's stage, so the tuple never has to cross a boundary."""
    stage: dict[Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            stage[node] = _INPUT
        elif node.op in _COMPUTING:
            stage[node] = stage_of[node.name]
            source = node.args[0] if node.args else None
            if (
                node.target is operator.getitem
                and isinstance(source, Node)
                and source.op in _COMPUTING
                and not _is_tensor(source)
            ):
                stage[node] = stage[source]
    return stage


def model_outputs(gm: GraphModule) -> tuple[list[Any], TreeSpec]:
    """The model's flat outputs (nodes or constants) and the spec that rebuilds their structure."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        spec = codegen.pytree_info.out_spec
        if spec is not None:
            return list(output.args[0]), spec
    flat, spec = tree_flatten(output.args[0])
    return flat, spec


def _last_use(gm: GraphModule, stage: Mapping[Node, int], num_stages: int) -> dict[Node, int]:
    """Latest stage that reads each placeholder or computing node (the model's outputs are read by
    the last stage); a node read by nobody has its own stage."""
    last: dict[Node, int] = {}
    for node in gm.graph.nodes:
        if node not in stage:
            continue
        uses = [num_stages - 1 if u.op == "output" else stage[u] for u in node.users]
        last[node] = max([stage[node], *uses])
    return last


def _foldable(
    gm: GraphModule, stage: Mapping[Node, int], last_use: Mapping[Node, int]
) -> dict[Node, Any]:
    """Non-tensor values read on a later stage: concrete Python scalars are folded into their
    readers; anything else cannot be sent between pipeline stages."""
    folded: dict[Node, Any] = {}
    for node in gm.graph.nodes:
        if node not in stage or last_use[node] <= max(stage[node], 0) or _is_tensor(node):
            continue
        val = node.meta.get("val")
        if node.op in _COMPUTING and type(val) in (int, float, bool):
            folded[node] = val
            continue
        raise SplitError(
            f"node {node.name!r}{_where(node)} produces a {type(val).__name__}, not a tensor, and "
            f"stage {last_use[node]} reads it while it is made on "
            f"{'the model input' if stage[node] == _INPUT else f'stage {stage[node]}'}: pipeline "
            "stages exchange tensors only. Put its readers on the same stage as it, or make the "
            "model pass it as a tensor."
        )
    return folded


_RANDOM = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson")


def _buffer_derived(gm: GraphModule) -> set[Node]:
    """Tensor values computed from buffers and constants only (no model input, no parameter, no
    random op), e.g. RoPE's cos/sin tables or a causal mask. A later stage that reads one computes
    it again instead of receiving it: it costs a few cheap ops instead of a send per micro-batch."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    changing = {n for group in mutation_groups(gm) for n in group}
    for node in gm.graph.nodes:
        if written_inputs(node):
            changing.update((node, *written_inputs(node)))
    derived: set[Node] = set()
    for node in gm.graph.nodes:
        if node in changing:
            continue  # state written in place (a running statistic): never computed twice
        if node.op == "get_attr":
            if str(node.target) not in params and isinstance(
                attr_at(gm, str(node.target)), torch.Tensor
            ):
                derived.add(node)
        elif (
            node.op == "call_function"
            and not any(word in str(node.target) for word in _RANDOM)
            and all(a in derived for a in node.all_input_nodes)
            and (_is_tensor(node) or node.target is operator.getitem)
        ):
            derived.add(node)
    return {n for n in derived if n.op != "get_attr"}


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _crossing(
    gm: GraphModule,
    stage: Mapping[Node, int],
    last_use: Mapping[Node, int],
    folded: Mapping[Node, Any],
    num_stages: int,
) -> list[list[Node]]:
    """Values live across each boundary ``b | b + 1``, in graph order."""
    crossing: list[list[Node]] = [[] for _ in range(num_stages - 1)]
    for node in gm.graph.nodes:
        if node not in stage or node in folded:
            continue
        for b in range(max(stage[node], 0), last_use[node]):
            crossing[b].append(node)
    return crossing


def _attr_stages(
    gm: GraphModule, stage: Mapping[Node, int], num_stages: int
) -> dict[Node, tuple[int, ...]]:
    """Stages that read each ``get_attr`` node (each of them gets a copy)."""
    result: dict[Node, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        readers = {num_stages - 1 if u.op == "output" else stage[u] for u in node.users}
        result[node] = tuple(sorted(readers))
    return result


def canonical_targets(gm: GraphModule) -> dict[str, str]:
    """Every parameter or buffer name of ``gm`` -> the one name a stage registers it under: the
    model's first name for it (``lm_head.weight`` tied to the embedding is ``transformer.wte.weight``),
    so a tied tensor has one name in every stage and in ``model.named_parameters()``."""
    first: dict[int, str] = {}
    named = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        first.setdefault(id(tensor), name)
    canonical = {name: first[id(tensor)] for name, tensor in named}
    trace_info = gm.meta.get("autopart_trace")
    aliases = getattr(trace_info, "param_aliases", None) or {}
    for name in canonical:
        alias = aliases.get(name)
        if alias in canonical:
            canonical[name] = alias
    return canonical


def _shared_params(
    gm: GraphModule, attr_stages: Mapping[Node, tuple[int, ...]], canonical: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    params = dict(gm.named_parameters(remove_duplicate=False))
    holders: dict[str, set[int]] = {}
    for node, stages in attr_stages.items():
        if isinstance(node.target, str) and node.target in params:
            holders.setdefault(canonical[node.target], set()).update(stages)
    return {name: tuple(sorted(s)) for name, s in holders.items() if len(s) > 1}


# -- construction ---------------------------------------------------------------------------------


def _stage_graph(
    gm: GraphModule,
    s: int,
    stage: Mapping[Node, int],
    inputs: Sequence[Node],
    outputs: Sequence[Any],
    attr_stages: Mapping[Node, tuple[int, ...]],
    folded: Mapping[Node, Any],
    canonical: Mapping[str, str],
    constant: set[Node],
) -> Graph:
    graph = Graph()
    env: dict[Node, Any] = {}
    for node in inputs:
        has_default = node.op == "placeholder" and bool(node.args)
        placeholder = graph.placeholder(
            node.name, default_value=node.args[0] if has_default else inspect.Signature.empty
        )
        placeholder.meta = dict(node.meta)
        env[node] = placeholder

    def lookup(arg: Node) -> Any:
        if arg in env:
            return env[arg]
        if arg in constant or (arg.op == "get_attr" and any(u in constant for u in arg.users)):
            return recompute(arg)
        assert arg in folded, f"stage {s}: {arg.name} is neither an input nor made here"
        return folded[arg]

    def recompute(node: Node) -> Node:
        """A value made from buffers and constants only, computed again here instead of sent."""
        for inp in node.all_input_nodes:
            if inp not in env:
                recompute(inp)
        copy = graph.node_copy(node, lookup)
        if copy.op == "get_attr":
            copy.target = canonical.get(str(copy.target), copy.target)
        env[node] = copy
        return copy

    for node in gm.graph.nodes:
        if node in constant:
            continue  # computed where it is read (see recompute)
        if (node.op == "get_attr" and s in attr_stages[node]) or (
            node.op in _COMPUTING and stage[node] == s
        ):
            copy = graph.node_copy(node, lookup)
            if copy.op == "get_attr":
                copy.target = canonical.get(str(copy.target), copy.target)
            env[node] = copy
    graph.output(tuple(lookup(v) if isinstance(v, Node) else v for v in outputs))
    graph.lint()
    return graph


def _stage_module(gm: GraphModule, graph: Graph, s: int) -> GraphModule:
    """A GraphModule owning, under the model's names, everything the stage graph reads."""
    root = nn.Module()
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = attr_at(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                value = _owned(value)
            set_attr_at(root, str(node.target), value)
    module = GraphModule(root, graph, class_name=f"AutopartStage{s}")
    module.graph.lint()
    module.recompile()
    return module


def _owned(param: nn.Parameter) -> nn.Parameter:
    """A stage's own Parameter object over the model's storage (per-stage ``.grad``)."""
    return nn.Parameter(param.detach(), requires_grad=param.requires_grad)


def attr_at(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_at(root: nn.Module, target: str, value: Any) -> None:
    *path, leaf = target.split(".")
    module = root
    for part in path:
        child = getattr(module, part, None)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(leaf, value)
    elif isinstance(value, nn.Module):
        module.add_module(leaf, value)
    else:
        setattr(module, leaf, value)


def _info(
    module: GraphModule,
    s: int,
    num_stages: int,
    stage: Mapping[Node, int],
    inputs: Sequence[Node],
    outputs: Sequence[Any],
    flat_outputs: Sequence[Any],
    shared: Mapping[str, tuple[int, ...]],
    output_spec: TreeSpec | None,
) -> StageInfo:
    constants = {i: v for i, v in enumerate(flat_outputs) if not isinstance(v, Node)}
    node_names = tuple(n.name for n, st in stage.items() if st == s and n.op in _COMPUTING)
    read_here = {a.name for n in module.graph.nodes if n.op != "output" for a in n.all_input_nodes}
    out_names = set()
    for v in outputs:
        if isinstance(v, Node):
            out_names.add(v.name)
    param_names = tuple(name for name, _ in module.named_parameters())
    return StageInfo(
        index=s,
        num_stages=num_stages,
        input_names=tuple(n.name for n in inputs),
        output_names=tuple(v.name if isinstance(v, Node) else repr(v) for v in outputs),
        passthrough_names=tuple(
            n.name for n in inputs if n.name not in read_here and n.name in out_names
        ),
        node_names=node_names,
        param_names=param_names,
        buffer_names=tuple(name for name, _ in module.named_buffers()),
        shared_params={name: shared[name] for name in param_names if name in shared},
        model_output_indices=tuple(
            i for i, v in enumerate(flat_outputs) if isinstance(v, Node) and stage.get(v) == s
        ),
        output_spec=output_spec,
        output_constants=constants if output_spec is not None else {},
    )
