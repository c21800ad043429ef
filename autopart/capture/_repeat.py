"""Repeated-layer tracing: capture 3 of a model's L identical layers, then replicate the graph.

``torch.export`` costs milliseconds per graph node, so the 80 decoder layers of a Llama-70B dominate
tracing time although they compute the same thing. :func:`find_repeated_list` finds the largest
``nn.ModuleList`` of at least 6 interchangeable children; :func:`truncated` makes it hold only its
first 3 for the duration of the trace (``len()`` still gives L, and indexing a missing child raises,
so ``layers[-1]`` or ``layers[:4]`` make the caller trace in full); :func:`expand` checks that
layer 2 computes exactly what layer 1 did, modulo renaming, and writes copies of layer 2 for layers
3..L-1.

The check, on the graph of the truncated model. Layer k's *segment* is every node after the last node
created inside child k-1 up to the last node created inside child k, so glue code that the parent
runs between two layers (``x = layer(x)[0]``) belongs to the segment that follows it. Segments 1 and 2
must have the same length and, node by node, the same op, target (child index renamed), non-node
arguments, output shapes, strides and dtypes and module path (renamed). Where a node of segment 2
reads segment 2 or segment 1, its twin in segment 1 must read the node exactly one segment earlier;
otherwise both must read the same node (RoPE tables, masks), or each its own layer's parameter.
Nodes after the loop may read the last layer's nodes but not earlier ones, nor layer 2's parameters
(reachable after the loop only through the loop variable). When anything differs, for
example layers that alternate attention types, :func:`expand` returns ``None`` and the caller traces
the whole model.

What no graph can show is checked on the modules instead: the children have the same classes, the
same parameter and buffer names, shapes and dtypes, the same ``extra_repr`` and plain attributes
(apart from an attribute counting 0, 1, 2, ... like Hugging Face's ``layer_idx``), the same hooks,
and share no parameter, buffer or submodule with anything else. Outside what either check can see:
a forward that branches on the layer counter in a way layers 1 and 2 do not show (``if
self.layer_idx == 40``); ``trace(..., repeat="off")`` traces such a model in full.

Computing nodes are renumbered in graph order (``linear``, ``linear_1``, ...), which gives exactly
the full trace's names where the tracer numbers nodes in graph order (the built-in models; Hugging
Face models differ in a few names, deterministically). Copies read the model's own parameters under
the model's own names and share layer 2's ``meta["val"]`` objects (the shapes are the same).
"""

from __future__ import annotations

import copy
import enum
import logging
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import Graph, GraphModule, Node

__all__ = [
    "MIN_LAYERS",
    "TRACED_LAYERS",
    "RepeatedList",
    "expand",
    "find_repeated_list",
    "truncated",
]

TRACED_LAYERS = 3
"""Children traced for real: layer 0 (may differ, e.g. reads the embedding), 1 and 2 (compared)."""
MIN_LAYERS = 6
"""Shorter lists are traced in full: the saving would not pay for the check."""

_log = logging.getLogger(__name__)
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_HOOK_DICTS = tuple(sorted(k for k in _MODULE_INTERNALS if k.endswith("hooks")))
_SIMPLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_NAME_SUFFIX = re.compile(r"^(.*)_(\d+)$")


@dataclass(frozen=True, slots=True)
class RepeatedList:
    """A ``ModuleList`` of interchangeable children: its path in the model and its length."""

    path: str
    length: int

    def child(self, index: int) -> str:
        return f"{self.path}.{index}"

    def describe(self) -> str:
        return f"{self.path} x{self.length} (traced {TRACED_LAYERS})"


# ---------------------------------------------------------------------------------------------
# finding the list


def find_repeated_list(model: torch.nn.Module) -> RepeatedList | None:
    """The longest ``ModuleList`` of at least :data:`MIN_LAYERS` interchangeable children, if any."""
    best: RepeatedList | None = None
    module_uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tensor_uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tensor_uses.update(id(b) for _, b in model.named_buffers(remove_duplicate=False))
    for path, module in model.named_modules():
        if not path or not isinstance(module, torch.nn.ModuleList) or len(module) < MIN_LAYERS:
            continue
        if best is not None and len(module) <= best.length:
            continue
        children = list(module)
        if _interchangeable(children, module_uses, tensor_uses):
            best = RepeatedList(path, len(children))
    return best


def _interchangeable(
    children: list[torch.nn.Module], module_uses: Counter[int], tensor_uses: Counter[int]
) -> bool:
    for child in children:
        if any(module_uses[id(m)] != 1 for _, m in child.named_modules(remove_duplicate=False)):
            return False  # a submodule shared with another layer or outside the list
        tensors = [
            *(p for _, p in child.named_parameters(remove_duplicate=False)),
            *(b for _, b in child.named_buffers(remove_duplicate=False)),
        ]
        if any(tensor_uses[id(t)] != 1 for t in tensors):
            return False  # tied weights: the graph would read them under another layer's name
    first = _structure(children[0])
    if any(_structure(c) != first for c in children[1:]):
        return False
    attrs = [_plain_attributes(c) for c in children]
    if any(a.keys() != attrs[0].keys() for a in attrs[1:]):
        return False
    return all(_uniform([a[key] for a in attrs]) for key in attrs[0])


def _structure(child: torch.nn.Module) -> list[Any]:
    """Everything about a child that must not differ between layers, apart from plain attributes."""
    out: list[Any] = []
    for name, m in child.named_modules():
        hooks = tuple(
            tuple(_callable_name(h) for h in getattr(m, key).values()) for key in _HOOK_DICTS
        )
        out.append((name, type(m), m.extra_repr(), m.training, hooks))
        for pname, p in m._parameters.items():
            spec = None if p is None else (tuple(p.shape), p.dtype, p.device, p.requires_grad)
            out.append((name, "param", pname, spec))
        for bname, b in m._buffers.items():
            spec = None if b is None else (tuple(b.shape), b.dtype, b.device, False)
            out.append((name, "buffer", bname, spec, bname in m._non_persistent_buffers_set))
    return out


def _callable_name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__qualname__))


def _plain_attributes(child: torch.nn.Module) -> dict[tuple[str, str], Any]:
    return {
        (name, key): value
        for name, m in child.named_modules()
        for key, value in vars(m).items()
        if key not in _MODULE_INTERNALS
    }


def _uniform(values: list[Any]) -> bool:
    """Equal in every child, or a layer counter (``layer_idx`` = 0, 1, 2, ... up the list)."""
    if all(_same(values[0], v) for v in values[1:]):
        return True
    ints = all(type(v) is int for v in values)
    return ints and all(v == values[0] + i for i, v in enumerate(values))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, _SIMPLE):
        return bool(a == b) or (a != a and b != b)  # NaN equals NaN here
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b  # anything else (configs, functions) must be the very same object


# ---------------------------------------------------------------------------------------------
# tracing a truncated list


@contextmanager
def truncated(model: torch.nn.Module, repeated: RepeatedList) -> Iterator[None]:
    """Let ``repeated``'s list hold only its first :data:`TRACED_LAYERS` children (the same objects)
    inside the ``with`` block; the full list is back afterwards, however the block ends.

    Iterating the list yields the first children only, but ``len()`` still gives the full length,
    and indexing or slicing that would reach a missing child (``layers[-1]``, ``layers[:4]`` of 8)
    raises, so the caller traces the whole model instead of copying the wrong layers.
    """
    layers = model.get_submodule(repeated.path)
    full, cls = layers._modules, type(layers)
    layers._modules = type(full)(list(full.items())[:TRACED_LAYERS])
    layers.__class__ = _short_list_class(cls, repeated.length)
    try:
        yield
    finally:
        layers.__class__ = cls
        layers._modules = full


class _MissingLayer(Exception):
    """The forward asked for a layer that the truncated list does not hold."""


def _short_list_class(cls: type[torch.nn.Module], length: int) -> type[torch.nn.Module]:
    def __len__(self: torch.nn.Module) -> int:
        return length

    def __getitem__(self: torch.nn.Module, index: Any) -> torch.nn.Module:
        if isinstance(index, slice):
            if range(*index.indices(length)) != range(length):
                raise _MissingLayer(f"the forward takes layers[{index}] of {length}")
            return torch.nn.ModuleList(self._modules.values())  # type: ignore[arg-type]
        i = operator.index(index)
        i = i + length if i < 0 else i
        if not 0 <= i < TRACED_LAYERS:
            raise _MissingLayer(f"the forward takes layers[{index}] of {length}")
        child = self._modules[str(i)]
        assert child is not None
        return child

    return type(cls.__name__, (cls,), {"__len__": __len__, "__getitem__": __getitem__})


# ---------------------------------------------------------------------------------------------
# checking and expanding the template


class _GiveUp(Exception):
    """The traced layers are not copies of one another; the model is traced in full."""


def expand(gm: GraphModule, model: torch.nn.Module, repeated: RepeatedList) -> GraphModule | None:
    """Replicate layer 2 of ``gm`` (traced from the truncated model) for layers 3..L-1.

    Returns ``gm``, changed in place and recompiled, or ``None`` (``gm`` untouched) when layers 1 and 2
    do not match well enough to stand for the rest.
    """
    try:
        template = _Template.check(gm.graph, repeated)
    except _GiveUp as why:
        _log.debug("not replicating %s: %s", repeated.path, why)
        return None
    graph, new_targets = template.build(repeated)
    for target, twin in new_targets:
        _assign_from(model, gm, target, twin)
    gm.graph = graph  # recompiles
    return gm


@dataclass(slots=True)
class _Template:
    nodes: list[Node]
    pos: dict[Node, int]
    last: tuple[int, int, int]
    """Position of the last node created inside child 0, 1 and 2."""
    params: list[Node]
    """``get_attr`` nodes of child 2's own parameters and buffers that precede the segments."""

    @property
    def seg1(self) -> list[Node]:
        return self.nodes[self.last[0] + 1 : self.last[1] + 1]

    @property
    def seg2(self) -> list[Node]:
        return self.nodes[self.last[1] + 1 : self.last[2] + 1]

    @classmethod
    def check(cls, graph: Graph, repeated: RepeatedList) -> _Template:
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        inside: list[list[int]] = [[] for _ in range(TRACED_LAYERS)]
        for i, node in enumerate(nodes):
            k = _layer_of(node, repeated)
            if k is not None:
                inside[k].append(i)
        if not all(inside):
            raise _GiveUp("a traced child created no nodes")
        first = [ix[0] for ix in inside]
        last = (inside[0][-1], inside[1][-1], inside[2][-1])
        if not (last[0] < first[1] and last[1] < first[2]):
            raise _GiveUp("the layers' nodes are interleaved, not one layer after the other")
        own2 = repeated.child(2)
        params = [
            n for n in nodes[: last[1] + 1] if n.op == "get_attr" and _under(str(n.target), own2)
        ]
        template = cls(nodes, pos, last, params)
        template._compare(repeated)
        template._check_tail(first[0], own2)
        return template

    def _compare(self, repeated: RepeatedList) -> None:
        seg1, seg2 = self.seg1, self.seg2
        if len(seg1) != len(seg2):
            raise _GiveUp(f"layer 1 has {len(seg1)} nodes and layer 2 has {len(seg2)}")
        if any(n.op == "get_attr" and _under(str(n.target), repeated.child(2)) for n in seg1):
            raise _GiveUp("layer 1 reads a parameter of layer 2")
        seg_len = len(seg2)
        s1 = self.last[0] + 1
        own1, own2 = repeated.child(1), repeated.child(2)
        for a, b in zip(seg2, seg1):
            where = f"{a.name} vs {b.name}"
            if a.op != b.op or a.target != _renamed_target(b, own1, own2):
                raise _GiveUp(f"different ops: {where}")
            if _module_path(a) != _swap(_module_path(b), own1, own2):
                raise _GiveUp(f"different modules: {where}")
            if _val_spec(a.meta.get("val")) != _val_spec(b.meta.get("val")):
                raise _GiveUp(f"different shapes: {where}")
            in_a: list[Node] = []
            in_b: list[Node] = []
            if _skeleton((a.args, a.kwargs), in_a) != _skeleton((b.args, b.kwargs), in_b):
                raise _GiveUp(f"different arguments: {where}")
            for x, y in zip(in_a, in_b):
                px = self.pos[x]
                if px >= s1:  # inside segment 1 or 2: the twin reads one segment earlier
                    if self.pos[y] != px - seg_len:
                        raise _GiveUp(f"inputs not one layer apart: {where}")
                elif x is y:
                    if x.op == "get_attr" and _under(str(x.target), repeated.path + "."):
                        raise _GiveUp(f"layers 1 and 2 read the same parameter: {where}")
                elif not (
                    x in self.params
                    and y.op == "get_attr"
                    and x.target == _swap(y.target, own1, own2)
                ):
                    raise _GiveUp(f"inputs from outside the layers differ: {where}")
        if any(self.pos[p] >= s1 for p in self.params):
            raise _GiveUp("a parameter of layer 2 is fetched inside layer 1")

    def _check_tail(self, loop_start: int, own2: str) -> None:
        """Nodes after the loop may read the loop's last layer, never an earlier one: with 80 layers,
        'layer 2' would have to mean 'the last' for the copies to be right. Layer 2's parameters
        are out of bounds too: the tail can reach them only through the loop variable, which would
        be the last layer in the full model."""
        for node in self.nodes[self.last[2] + 1 :]:
            if node.op in ("get_attr", "call_module") and _under(str(node.target), own2):
                raise _GiveUp(f"{node.name} after the loop uses {node.target}")
            for x in node.all_input_nodes:
                if loop_start <= self.pos[x] <= self.last[1]:
                    raise _GiveUp(f"{node.name} after the loop reads {x.name} inside it")
                if x.op == "get_attr" and _under(str(x.target), own2):
                    raise _GiveUp(f"{node.name} after the loop reads {x.target}")

    def build(self, repeated: RepeatedList) -> tuple[Graph, list[tuple[str, str]]]:
        """A new graph with layers 3..L-1 written in, and the attribute paths its copies read, each
        with its twin in layer 2."""
        out = _Builder(self.nodes[0].graph, repeated)
        runs: dict[int, list[Node]] = {}  # position of the last node of a run of params -> the run
        for p in self.params:
            end = self.pos[p] - 1
            runs[end + 1] = [*runs.pop(end, []), p]
        param_copy: dict[tuple[int, Node], Node] = {}
        copies = range(TRACED_LAYERS, repeated.length)
        for i, node in enumerate(self.nodes):
            out.env[node] = out.emit(node, out.env.__getitem__, None)
            for layer in copies if i in runs else ():
                for p in runs[i]:
                    param_copy[(layer, p)] = out.emit(p, out.env.__getitem__, layer)
            if i == self.last[2]:
                prev = [out.env[n] for n in self.seg2]
                for layer in copies:
                    prev = self._copy_layer(out, layer, prev, param_copy)
                out.env.update(zip(self.seg2, prev))  # after the loop, read the last layer
        return out.graph, out.new_targets

    def _copy_layer(
        self,
        out: _Builder,
        layer: int,
        prev: list[Node],
        param_copy: dict[tuple[int, Node], Node],
    ) -> list[Node]:
        s1, s2 = self.last[0] + 1, self.last[1] + 1
        cur: list[Node] = []

        def read(x: Node) -> Node:
            px = self.pos[x]
            if px >= s2:
                return cur[px - s2]
            if px >= s1:
                return prev[px - s1]
            if (layer, x) in param_copy:
                return param_copy[(layer, x)]
            return out.env[x]

        for node in self.seg2:
            cur.append(out.emit(node, read, layer))
        return cur


class _Builder:
    """Writes nodes into a new graph, renaming copies of layer 2 for another layer."""

    def __init__(self, old: Graph, repeated: RepeatedList) -> None:
        self.graph = Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
        self.graph._codegen = old._codegen
        self.repeated = repeated
        self.env: dict[Node, Node] = {}
        self.new_targets: list[tuple[str, str]] = []

    def emit(self, node: Node, read: Callable[[Node], Any], layer: int | None) -> Node:
        target, name, meta = node.target, _candidate(node), copy.copy(node.meta)
        if layer is not None:
            old, new = self.repeated.child(2), self.repeated.child(layer)
            if node.op in ("get_attr", "call_module"):
                target = _swap(str(target), old, new)
                name = _swap_name(node.name, old, new)
                if target != node.target:
                    self.new_targets.append((str(target), str(node.target)))
            _relabel(meta, old, new)
        args = torch.fx.node.map_arg(node.args, read)
        kwargs = torch.fx.node.map_arg(node.kwargs, read)
        made = self.graph.create_node(node.op, target, args, kwargs, name, node.type)
        made.meta = meta
        return made


# ---------------------------------------------------------------------------------------------
# helpers


def _layer_of(node: Node, repeated: RepeatedList) -> int | None:
    path = _module_path(node)
    if path is None or not _under(path, repeated.path + "."):
        return None
    index = path[len(repeated.path) + 1 :].split(".", 1)[0]
    return int(index) if index.isdigit() and int(index) < TRACED_LAYERS else None


def _module_path(node: Node) -> str | None:
    ref = node.meta.get("autopart_module")
    return None if ref is None else str(ref.path)


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside it (``prefix`` may end with a dot)."""
    base = prefix.rstrip(".")
    return path == base or path.startswith(base + ".")


def _swap(path: Any, old: str, new: str) -> Any:
    """``path`` with the leading module path ``old`` replaced by ``new``."""
    if isinstance(path, str) and (path == old or path.startswith(old + ".")):
        return new + path[len(old) :]
    return path


def _swap_name(name: str, old: str, new: str) -> str:
    old_name, new_name = old.replace(".", "_"), new.replace(".", "_")
    if name == old_name or name.startswith(old_name + "_"):
        return new_name + name[len(old_name) :]
    return name


def _renamed_target(node: Node, old: str, new: str) -> Any:
    return _swap(node.target, old, new) if node.op in ("get_attr", "call_module") else node.target


def _candidate(node: Node) -> str:
    """The name to ask the new graph for: computing nodes are renumbered in graph order
    (``linear``, ``linear_1``, ...), as the tracer numbered them, so copies fit in between."""
    if node.op in ("call_function", "call_method"):
        match = _NAME_SUFFIX.match(node.name)
        return match.group(1) if match else node.name
    return node.name


def _relabel(meta: dict[str, Any], old: str, new: str) -> None:
    stack = meta.get("nn_module_stack")
    if stack:
        relabeled = {}
        for key, (path, type_name) in stack.items():
            new_path = _swap(path, old, new)
            if isinstance(key, str) and isinstance(path, str) and key.endswith(path):
                key = key[: len(key) - len(path)] + new_path
            relabeled[key] = (new_path, type_name)
        meta["nn_module_stack"] = relabeled
    ref = meta.get("autopart_module")
    if ref is not None:
        meta["autopart_module"] = type(ref)(_swap(ref.path, old, new), ref.type_name)


def _skeleton(arg: Any, inputs: list[Node]) -> Any:
    """``arg`` with every node replaced by a marker (the nodes go to ``inputs`` in order)."""
    if isinstance(arg, Node):
        inputs.append(arg)
        return "<node>"
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_skeleton(a, inputs) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _skeleton(v, inputs)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return ("slice", _skeleton((arg.start, arg.stop, arg.step), inputs))
    return (type(arg).__name__, repr(arg))


def _val_spec(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), tuple(val.stride()), val.dtype, val.device)
    if isinstance(val, (list, tuple)):
        return tuple(_val_spec(v) for v in val)
    return (type(val).__name__, repr(val))


def _assign_from(model: torch.nn.Module, gm: GraphModule, target: str, twin: str) -> None:
    """Register in ``gm`` the model's own object at ``target`` (a parameter, buffer or module), as
    the tracer registered ``twin``, its counterpart in layer 2 (a buffer stays (non-)persistent)."""
    *prefix, field = target.split(".")
    obj = getattr(model.get_submodule(".".join(prefix)), field)
    twin_prefix, _, twin_field = twin.rpartition(".")
    twin_owner = gm.get_submodule(twin_prefix)
    dest: torch.nn.Module = gm
    for part in prefix:
        sub = getattr(dest, part, None)
        if sub is None:
            sub = torch.nn.Module()
            setattr(dest, part, sub)
        dest = sub
    if twin_field in twin_owner._buffers:
        persistent = twin_field not in twin_owner._non_persistent_buffers_set
        dest.register_buffer(field, obj, persistent=persistent)
    else:
        setattr(dest, field, obj)
