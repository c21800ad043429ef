"""Annotation pass: write a :class:`NodeCost` into ``node.meta["autopart"]`` of every node.

How each number is obtained: every computing node is *replayed* on meta tensors shaped like its
``node.meta["val"]`` (no memory is allocated, so this works for 70B-parameter models):

- forward FLOPs: the replay runs under ``torch.utils.flop_counter.FlopCounterMode``, so counts follow
  the very dispatch (decompositions included) that ``FlopCounterMode`` sees on the eager model;
- backward FLOPs: ``torch.autograd.grad`` of the replay's outputs with respect to the inputs that
  require grad (parameters and everything computed from them), again under the flop counter; the
  weight-gradient part (``backward_weight_flops``: for a linear ``dW = X^T dY``, against the input
  gradient ``dX = dY W^T``) is the same with respect to the parameters alone (an input whose view
  chain starts at a parameter counts as one), so schedules that defer it (zero bubble) can be
  costed;
- saved activations: ``torch.autograd.graph.saved_tensors_hooks`` records what autograd keeps for
  backward; saved tensors are matched to the node's inputs and output by storage, so the memory model
  can count a tensor saved by two consumers once;
- bytes: every distinct input read once, every output written once; an output that aliases an input
  (a view) moves nothing, while an in-place op (``add_``, ``div_``, ``index_put_``) reads its inputs
  and writes its output like its out-of-place twin.

Inputs that need gradients are replayed as non-leaf tensors (a leaf cloned, which adds no FLOPs),
because autograd refuses an in-place op on a leaf that requires grad while the model runs it
on values computed from parameters; the backward is measured with respect to the leaves.

Replays are cached by op and argument signature, so the 80 identical layers of a Llama-70B cost one
layer's worth of replays. Fused attention (``scaled_dot_product_attention``) replays on meta through
the math path, which would save the full attention matrix; fused kernels keep the query, key,
value and output and only the log-sum-exp statistics, and that is what is recorded.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError
from autopart.passes.mutations import written_inputs
from autopart.passes.routing import (
    DEFAULT_IMBALANCE,
    defines_sizes,
    expect_routing,
    expected_val,
    grouped_mm_formulas,
)

__all__ = [
    "AnnotationError",
    "GraphTotals",
    "annotate",
    "graph_totals",
    "node_cost",
    "op_signature",
]

_SDPA = (torch.ops.aten.scaled_dot_product_attention.default,)


class AnnotationError(AutopartError):
    """A node could not be replayed to measure its cost."""


@dataclass(frozen=True, slots=True)
class GraphTotals:
    params: int
    """Number of parameters (tied parameters once), as ``sum(p.numel() for p in model.parameters())``."""
    param_bytes: int
    buffer_bytes: int
    flops: int
    """Forward FLOPs of one step with the example inputs."""
    backward_flops: int
    bytes: int
    """Memory traffic of the forward pass."""
    activation_bytes: int
    """Bytes saved for backward by one forward pass (each tensor once)."""
    nodes: int


@dataclass(frozen=True, slots=True)
class _Replay:
    """What a replay measured, in terms of argument positions (so it can be cached and reused)."""

    flops: int
    backward_flops: int
    backward_weight_flops: int
    bytes_read: int
    bytes_written: int
    output_bytes: int
    saved_inputs: tuple[int, ...]
    saves_output: bool
    private_saved_bytes: int
    view_of: int | None
    """The input whose storage the output shares (a view, or the tensor an in-place op writes)."""
    is_view: bool


def node_cost(node: Node) -> NodeCost:
    """The cost the annotation pass recorded for ``node``."""
    cost = node.meta.get("autopart")
    if not isinstance(cost, NodeCost):
        raise AnnotationError(
            f"node {node.name!r} has no cost; run autopart.passes.annotate.annotate(gm) first."
        )
    return cost


def annotate(
    gm: GraphModule,
    *,
    progress: Callable[[int, int], None] | None = None,
    expert_imbalance: float = DEFAULT_IMBALANCE,
) -> GraphModule:
    """Annotate every node of ``gm`` (from :func:`autopart.trace`) with a :class:`NodeCost`.

    Also sets ``gm.meta["autopart_params"]`` ({name: (numel, nbytes, dtype)}) and
    ``gm.meta["autopart_totals"]`` (:class:`GraphTotals`). ``progress(done, total)`` is called as
    nodes are processed. Sizes known only at run time (tokens routed to each expert) are charged
    at the expected routing times ``expert_imbalance`` (:mod:`autopart.passes.routing`). Returns
    ``gm`` (annotated in place).
    """
    expect_routing(gm, expert_imbalance)
    params = dict(gm.named_parameters())
    canonical = {id(p): name for name, p in params.items()}
    # Tied parameters are reachable under several names; each is reported under its first name.
    aliases = {name: canonical[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)}
    buffers = dict(gm.named_buffers())
    modules = dict(gm.named_modules())
    cache: dict[Any, _Replay] = {}
    requires_grad: dict[Node, bool] = {}
    alias_root: dict[Node, Node] = {}
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(nodes):
        try:
            cost = _annotate_node(
                node, gm, params, aliases, buffers, modules, cache, requires_grad, alias_root
            )
        except AutopartError:
            raise
        except Exception as exc:
            raise AnnotationError(
                f"could not measure the cost of node {node.name!r} ({node.op} {_target_name(node)}) "
                f"{_source(node)}: {type(exc).__name__}: {exc}. This op may lack a meta kernel; "
                "please report it with the model that produced it."
            ) from exc
        node.meta["autopart"] = cost
        if progress is not None:
            progress(i + 1, len(nodes))
    gm.meta["autopart_params"] = {
        name: (p.numel(), p.numel() * p.element_size(), _dtype_name(p.dtype))
        for name, p in params.items()
    }
    gm.meta["autopart_totals"] = graph_totals(gm)
    return gm


def graph_totals(gm: GraphModule) -> GraphTotals:
    costs = [node_cost(n) for n in gm.graph.nodes]
    params = dict(gm.named_parameters())
    saved: dict[str, int] = {}
    by_name = {n.name: node_cost(n) for n in gm.graph.nodes}
    for c in costs:
        for src in c.saved_from:
            saved[src] = by_name[src].output_bytes
    return GraphTotals(
        params=sum(p.numel() for p in params.values()),
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for _, b in gm.named_buffers()),
        flops=sum(c.flops for c in costs),
        backward_flops=sum(c.backward_flops for c in costs),
        bytes=sum(c.bytes for c in costs),
        activation_bytes=sum(saved.values()) + sum(c.private_saved_bytes for c in costs),
        nodes=len(costs),
    )


# ---------------------------------------------------------------------------------------------
# per node


def _annotate_node(
    node: Node,
    gm: GraphModule,
    params: Mapping[str, torch.nn.Parameter],
    aliases: Mapping[str, str],
    buffers: Mapping[str, torch.Tensor],
    modules: Mapping[str, torch.nn.Module],
    cache: dict[Any, _Replay],
    requires_grad: dict[Node, bool],
    alias_root: dict[Node, Node],
) -> NodeCost:
    ref = node.meta.get("autopart_module")
    module, module_type = (ref.path, ref.type_name) if ref is not None else ("", "")
    val = expected_val(node)
    out_bytes = _tensor_bytes(val)
    dtype = _first_dtype(val)
    alias_root[node] = node

    if node.op in ("placeholder", "output") or (
        node.op == "get_attr" and node.target not in aliases
    ):
        requires_grad[node] = False
        if node.op == "get_attr" and node.target not in buffers:
            out_bytes = 0  # a submodule (e.g. the body of a higher-order op), not data
        return _zero_cost(out_bytes, dtype, module, module_type, is_view=False)
    if node.op == "get_attr":
        requires_grad[node] = params[aliases[str(node.target)]].requires_grad
        return _zero_cost(out_bytes, dtype, module, module_type, is_view=False)

    inputs = _unique_input_nodes(node)
    needs_grad = [requires_grad.get(n, False) and _is_float(expected_val(n)) for n in inputs]
    if node.op == "call_function" and node.target is operator.getitem:
        # Picks one output of a multi-output node: an alias, never a computation.
        requires_grad[node] = any(needs_grad) and _is_float(val)
        alias_root[node] = alias_root[inputs[0]]
        return _zero_cost(out_bytes, dtype, module, module_type, is_view=True)
    if defines_sizes(node):
        # which rows are routed where (integer indices, no gradient): no meta kernel can say how
        # many, so what it moves is charged at the expected count
        requires_grad[node] = False
        cost = _zero_cost(out_bytes, dtype, module, module_type, is_view=False)
        read = sum(_tensor_bytes(expected_val(n)) for n in inputs)
        return dataclasses.replace(cost, bytes_read=read, bytes_written=out_bytes)

    weights = _weight_positions(inputs, alias_root, aliases)
    key = (_signature(node, inputs, needs_grad, modules), weights)
    replay = cache.get(key)
    if replay is None:
        replay = _replay(node, gm, inputs, needs_grad, weights, modules, params)
        cache[key] = replay
    requires_grad[node] = any(needs_grad) and _is_float(val)

    param_names: list[str] = []
    buffer_bytes = 0
    for n in inputs:
        if n.op == "get_attr" and n.target in aliases:
            param_names.append(aliases[str(n.target)])
        elif n.op == "get_attr" and n.target in buffers:
            buffer_bytes += _tensor_bytes(expected_val(n))
    if node.op == "call_module":
        prefix = f"{node.target}."
        sub = modules[str(node.target)]
        param_names += [
            aliases[prefix + name] for name, _ in sub.named_parameters(remove_duplicate=False)
        ]
        buffer_bytes += sum(b.numel() * b.element_size() for b in sub.buffers())
        if any(p.requires_grad for p in sub.parameters()):
            requires_grad[node] = _is_float(val)
    param_names = [n for n in dict.fromkeys(param_names) if n in params]
    param_bytes = sum(params[n].numel() * params[n].element_size() for n in param_names)

    if replay.view_of is not None:
        alias_root[node] = alias_root[inputs[replay.view_of]]
    saved = [alias_root[inputs[i]] for i in replay.saved_inputs]
    saved = [n for n in saved if n.op != "get_attr"]  # parameters and buffers are counted as such
    if replay.saves_output:
        saved.append(alias_root[node])
    return NodeCost(
        flops=replay.flops,
        backward_flops=replay.backward_flops,
        backward_weight_flops=replay.backward_weight_flops,
        bytes_read=replay.bytes_read,
        bytes_written=replay.bytes_written,
        output_bytes=out_bytes,
        param_bytes=param_bytes,
        params=tuple(param_names),
        buffer_bytes=buffer_bytes,
        saved_from=tuple(dict.fromkeys(n.name for n in saved)),
        private_saved_bytes=replay.private_saved_bytes,
        requires_grad=requires_grad[node],
        is_view=replay.is_view,
        dtype=dtype,
        module=module,
        module_type=module_type,
    )


def _zero_cost(
    out_bytes: int, dtype: str, module: str, module_type: str, *, is_view: bool
) -> NodeCost:
    return NodeCost(
        flops=0,
        backward_flops=0,
        bytes_read=0,
        bytes_written=0,
        output_bytes=out_bytes,
        param_bytes=0,
        params=(),
        buffer_bytes=0,
        saved_from=(),
        private_saved_bytes=0,
        requires_grad=False,
        is_view=is_view,
        dtype=dtype,
        module=module,
        module_type=module_type,
    )


# ---------------------------------------------------------------------------------------------
# replay on meta tensors


def _replay(
    node: Node,
    gm: GraphModule,
    inputs: list[Node],
    needs_grad: list[bool],
    weights: tuple[int, ...],
    modules: Mapping[str, torch.nn.Module],
    params: Mapping[str, torch.nn.Parameter],
) -> _Replay:
    values: dict[Node, Any] = {}
    leaves: list[list[torch.Tensor]] = []  # per input: the tensors gradients are taken for
    for n, grad in zip(inputs, needs_grad):
        leaves.append([])
        if n.op == "get_attr" and not isinstance(n.meta.get("val"), torch.Tensor):
            values[n] = _fetch_attr(gm, str(n.target))  # submodule argument of a higher-order op
        else:
            leaf = _materialize(expected_val(n), grad)
            leaves[-1] = [t for t in tree_flatten(leaf)[0] if isinstance(t, torch.Tensor)]
            values[n] = _non_leaf(leaf)
    args = torch.fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    call, module_state = _callable(node, modules)
    flat_inputs = [values[n] for n in inputs]
    in_storages = [_storage_key(v) for v in flat_inputs]

    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    counter = FlopCounterMode(display=False, custom_mapping=grouped_mm_formulas())
    with counter, _OnMeta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(*args, **kwargs)
    flops = counter.get_total_flops()
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    out_storages = {_storage_key(t) for t in outs}
    state_storages = {
        _storage_key(t) for t in module_state
    }  # a module's own weights: not activations

    grad_outputs = [t for t in outs if t.requires_grad]
    weight_inputs = [t for i in weights for t in leaves[i] if t.requires_grad]
    weight_inputs += [t for t in module_state if t.requires_grad]
    # the weight gradient first: the full backward below may then free the graph
    backward_weight_flops = _grad_flops(grad_outputs, weight_inputs, retain_graph=True)
    grad_inputs = [t for ts in leaves for t in ts if t.requires_grad]
    grad_inputs += [t for t in module_state if t.requires_grad]
    backward_flops = _grad_flops(grad_outputs, grad_inputs, retain_graph=False)

    view_of = next(
        (i for i, s in enumerate(in_storages) if s is not None and s in out_storages), None
    )
    saved_inputs: list[int] = []
    saves_output = False
    private: dict[int, int] = {}
    for t in saved:
        key = _storage_key(t)
        if key in in_storages:
            idx = in_storages.index(key)
            if idx not in saved_inputs:
                saved_inputs.append(idx)
        elif key in out_storages:
            saves_output = True
        elif key is not None and key not in state_storages:
            private[key] = t.untyped_storage().nbytes()
    private_bytes = sum(private.values())
    if node.op == "call_function" and node.target in _SDPA and outs:
        # fused kernels (flash, memory-efficient; CPU and CUDA) keep the query, key, value and
        # output, and log-sum-exp statistics per row, where the math path keeps its matrices
        saved_inputs = [i for i, v in enumerate(flat_inputs) if _storage_key(v) is not None]
        saves_output, private_bytes = True, _lse_bytes(outs[0])

    is_view = view_of is not None and not written_inputs(node)
    read = (
        0 if is_view else sum(_tensor_bytes(v) for v in flat_inputs if _storage_key(v) is not None)
    )
    if node.op == "call_module":
        read += sum(_tensor_bytes(p) for p in modules[str(node.target)].parameters())
    written = 0 if is_view else sum(_tensor_bytes(t) for t in outs)
    return _Replay(
        flops=int(flops),
        backward_flops=int(backward_flops),
        backward_weight_flops=int(backward_weight_flops),
        bytes_read=read,
        bytes_written=written,
        output_bytes=sum(_tensor_bytes(t) for t in outs),
        saved_inputs=tuple(sorted(saved_inputs)),
        saves_output=saves_output,
        private_saved_bytes=private_bytes,
        view_of=view_of,
        is_view=is_view,
    )


def _grad_flops(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], *, retain_graph: bool
) -> int:
    """FLOPs of the gradients of ``outputs`` (seeded with ones) with respect to ``inputs``."""
    if not outputs or not inputs:
        return 0
    counter = FlopCounterMode(display=False, custom_mapping=grouped_mm_formulas())
    with counter, _OnMeta():
        torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=[torch.ones_like(t) for t in outputs],
            allow_unused=True,
            retain_graph=retain_graph,
        )
    return int(counter.get_total_flops())


def _weight_positions(
    inputs: list[Node], alias_root: Mapping[Node, Node], aliases: Mapping[str, str]
) -> tuple[int, ...]:
    """Positions of the inputs that are parameters, or views of one (a transposed weight)."""
    return tuple(
        i
        for i, n in enumerate(inputs)
        if alias_root[n].op == "get_attr" and str(alias_root[n].target) in aliases
    )


def _callable(
    node: Node, modules: Mapping[str, torch.nn.Module]
) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """The function a node calls, and (for a call_module) the meta tensors standing in for its state."""
    if node.op == "call_function":
        return node.target, []  # type: ignore[return-value]
    if node.op == "call_method":
        return (lambda self, *a, **k: getattr(self, str(node.target))(*a, **k)), []
    if node.op == "call_module":
        sub = modules[str(node.target)]
        state = {
            name: _materialize(t, isinstance(t, torch.nn.Parameter) and t.requires_grad)
            for name, t in [*sub.named_parameters(), *sub.named_buffers()]
        }
        return (lambda *a, **k: torch.func.functional_call(sub, state, a, k)), list(state.values())
    raise AssertionError(f"unexpected node op {node.op}")


def _materialize(val: Any, requires_grad: bool) -> Any:
    """A meta tensor shaped like ``val`` (a fake/real tensor); other values pass through."""
    if isinstance(val, torch.Tensor):
        t = torch.empty_strided(
            tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device="meta"
        )
        return t.requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))
    if isinstance(val, (list, tuple)):
        return type(val)(_materialize(v, requires_grad) for v in val)
    return val


def _non_leaf(value: Any) -> Any:
    """``value`` with every tensor that requires grad replaced by a clone of it: a non-leaf, on
    which an in-place op is allowed, and whose storage is the one the op sees."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.requires_grad else value
    if isinstance(value, (list, tuple)):
        return type(value)(_non_leaf(v) for v in value)
    return value


class _OnMeta(TorchDispatchMode):
    """Runs every op on the meta device: ``.to("cpu")`` or ``arange(device="cuda")`` inside a
    replayed node (or the body of a higher-order op) must neither allocate nor copy."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*_on_meta(args), **_on_meta(kwargs or {}))


def _on_meta(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# helpers


def _unique_input_nodes(node: Node) -> list[Node]:
    return list(dict.fromkeys(node.all_input_nodes))


def op_signature(node: Node) -> str:
    """A stable text key for what ``node`` computes: its op and the shapes, strides and dtypes of
    its arguments. Two nodes with the same key run the same kernel on the same sizes (used to cache
    replays and profiled times across runs)."""
    inputs = _unique_input_nodes(node)
    owner = node.graph.owning_module
    modules = dict(owner.named_modules()) if owner is not None else {}
    op, target, args, kwargs = _signature(node, inputs, [False] * len(inputs), modules)
    if callable(target) and not isinstance(target, torch._ops.OpOverload):
        target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"
    return repr((op, str(target), args, kwargs))


def _signature(
    node: Node, inputs: list[Node], needs_grad: list[bool], modules: Mapping[str, torch.nn.Module]
) -> Any:
    """A hashable key under which two nodes replay identically."""
    position = {n: i for i, n in enumerate(inputs)}

    def spec(a: Any) -> Any:
        if isinstance(a, Node):
            val = expected_val(a)
            if a.op == "get_attr" and not isinstance(val, torch.Tensor):
                sub = modules.get(str(a.target))
                return ("module", sub.code if isinstance(sub, GraphModule) else str(a.target))
            return ("node", position[a], _val_spec(val), needs_grad[position[a]])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(spec(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, spec(v)) for k, v in a.items()))
        if isinstance(a, torch.Tensor):
            return ("tensor", _val_spec(a))
        return ("value", repr(a))

    target: Any = node.target
    if node.op == "call_module":
        sub = modules[str(node.target)]
        target = (
            type(sub).__qualname__,
            sub.extra_repr(),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in sub.named_parameters()),
        )
    return (node.op, target, spec(node.args), spec(node.kwargs))


def _val_spec(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), tuple(val.stride()), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_val_spec(v) for v in val)
    return repr(val)


def _storage_key(v: Any) -> int | None:
    if isinstance(v, torch.Tensor):
        return int(v.untyped_storage()._cdata)
    return None


def _tensor_bytes(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_tensor_bytes(v) for v in val)
    return 0


def _lse_bytes(out: torch.Tensor) -> int:
    rows = out.numel() // out.shape[-1] if out.dim() else 1
    return rows * 4  # float32 log-sum-exp per query row


def _first_dtype(val: Any) -> str:
    for v in tree_flatten(val)[0]:
        if isinstance(v, torch.Tensor):
            return _dtype_name(v.dtype)
    return ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_float(val: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in tree_flatten(val)[0])


def _target_name(node: Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _source(node: Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    lines = [ln.strip() for ln in trace if ln.strip().startswith("File ")]
    return f"at {lines[-1]}" if lines else ""
