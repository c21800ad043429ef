"""In-place writes in a traced graph, and the nodes they tie to one pipeline stage.

``torch.export``'s training IR keeps a model's in-place ops as they are: ``hidden += residual`` is
``add_``, routing weights normalised in place are ``div_``, expert outputs written into a fresh
tensor are ``index_put_`` or ``copy_`` into a slice, and a BatchNorm in train mode is
``batch_norm``, which updates its running statistics in place (its schema does not say so) beside
an ``add_`` that counts its batches. The graph means what the eager code means: tensors that share
storage see each other's writes, in graph order. A pipeline stage, however, receives *copies* of
the values it reads (taken when the sending stage has run all its nodes), and holds buffers of
its own. The two meanings agree when, for every storage written in place, these nodes run on one
stage (a :func:`mutation_groups` group):

- the node that made the storage (for an item of a multi-output op, that op) and every writer;
- every node that touches the storage (a view of it, or a reader of any alias) before its last
  write in graph order: on a later stage it would see the write too early;
- for a buffer or parameter (state that outlives the step), every node that touches it: the next
  micro-batch reads what this one wrote.

That stage runs them in graph order on the same tensors, exactly as one process does. A node that
reads the storage after its last write may run on any later stage: the copy it receives is taken
after every write. A buffer written in place is thus held, and updated, by one stage only. The
planner never puts a stage boundary inside a group (``OpNode.keep_with_previous``) and
:func:`~autopart.passes.split_stages.split_stages` checks it.

Aliasing follows the op schemas: an argument annotated ``Tensor(a!)`` is written, and an output
may alias an argument annotated ``Tensor(a)`` (views, ``reshape``, ``contiguous``, ``to``; "may"
is taken as "does", which can only make groups larger). A higher-order op (``torch.no_grad()``
code, traced as ``wrap_with_set_grad_enabled``) writes the operands its subgraphs write. Graphs
from the ``torch.fx`` fallback carry no schemas: there ``x.add_(y)`` (a method ending in one
``_``), ``operator.iadd`` and a call with ``inplace=True`` write their first argument.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Node

__all__ = ["aliased_input", "mutation_groups", "written_inputs"]

_COMPUTING = ("call_function", "call_method", "call_module")
_PYTHON_INPLACE = frozenset(
    getattr(operator, name)
    for name in (
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "iand",
        "ior",
        "ixor",
        "ilshift",
        "irshift",
        "imatmul",
    )
)
# Ops that update running statistics (args 3 and 4) in place without saying so in their schema,
# when the flag at the given position is true (training / use_input_stats).
_RUNNING_STATS = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.instance_norm.default: 5,
}


def written_inputs(node: Node) -> tuple[Node, ...]:
    """The input nodes whose storage ``node`` writes in place, in argument order."""
    target = node.target
    written: list[Any] = []
    if isinstance(target, torch._ops.OpOverload):
        for i, arg in enumerate(target._schema.arguments):
            info = arg.alias_info
            if info is not None and info.is_write:
                written.append(_argument(node, i, arg.name))
        flag = _RUNNING_STATS.get(target)
        if flag is not None and _argument(node, flag, "training") is True:
            written += [_argument(node, 3, "running_mean"), _argument(node, 4, "running_var")]
    elif isinstance(target, torch._ops.HigherOrderOperator):
        written += _written_operands(node)
    elif (
        (node.op == "call_method" and _is_inplace_name(str(target)))
        or (node.op == "call_function" and target in _PYTHON_INPLACE)
        or (node.op in _COMPUTING and node.kwargs.get("inplace") is True)
    ) and node.args:
        written.append(node.args[0])
    return tuple(dict.fromkeys(_nodes(written)))


def _written_operands(node: Node) -> list[Node]:
    """The operands of a higher-order op that its subgraphs write. A subgraph's placeholders
    take the operands that follow the subgraphs, in order; when the counts differ, every tensor
    operand is taken as written (a larger group is still right)."""
    owner = node.graph.owning_module
    subgraphs = [
        a
        for a in node.args
        if isinstance(a, Node)
        and a.op == "get_attr"
        and owner is not None
        and isinstance(getattr(owner, str(a.target), None), GraphModule)
    ]
    if not subgraphs:
        return []
    last = max(node.args.index(g) for g in subgraphs)
    operands = [a for a in node.args[last + 1 :] if isinstance(a, Node)]
    written: list[Node] = []
    for sub in subgraphs:
        body: GraphModule = getattr(owner, str(sub.target))
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        roots = _roots(body)
        hit = {roots[w] for n in body.graph.nodes for w in written_inputs(n)}
        if len(placeholders) != len(operands):
            return operands if hit else []
        written += [op for op, ph in zip(operands, placeholders) if ph in hit]
    return written


def aliased_input(node: Node) -> Node | None:
    """The input whose storage ``node``'s output may share (a view, an in-place result, an item
    of a split), or ``None`` when the output is new storage."""
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return aliased_input(source) if isinstance(source, Node) else None
    written = written_inputs(node)
    if written and _writes_result(node):
        return written[0]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        for i, arg in enumerate(target._schema.arguments):
            info = arg.alias_info
            value = _argument(node, i, arg.name)
            if info is not None and not info.is_write and isinstance(value, Node):
                return value
    if node.op == "call_method" and str(target) in _FX_VIEW_METHODS and node.args:
        first = node.args[0]
        return first if isinstance(first, Node) else None
    return None


# Tensor methods of fx-fallback graphs whose result may be a view of ``self``.
_FX_VIEW_METHODS = frozenset(
    (
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "expand",
        "expand_as",
        "permute",
        "transpose",
        "t",
        "squeeze",
        "unsqueeze",
        "flatten",
        "unflatten",
        "narrow",
        "select",
        "split",
        "chunk",
        "unbind",
        "contiguous",
        "to",
        "type_as",
        "detach",
        "__getitem__",
    )
)


def mutation_groups(gm: GraphModule) -> list[tuple[Node, ...]]:
    """Sets of computing nodes that must run on one pipeline stage (see the module docstring),
    each in graph order; groups that share a node are merged, and a group of one node is left out
    (it constrains nothing). Graphs without in-place writes have none."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    roots = _roots(gm)
    last_write: dict[Node, int] = {}
    for n in nodes:
        for w in written_inputs(n):
            last_write[roots[w]] = order[n]
    by_root: dict[Node, list[Node]] = {}
    for n in nodes:
        by_root.setdefault(roots[n], []).append(n)
    groups = _UnionFind()
    for root, last in last_write.items():
        state = root.op in ("get_attr", "placeholder")
        members = by_root[root]
        touching = [*members, *(u for m in members for u in m.users), *_producer(root)]
        tied = [
            n for n in dict.fromkeys(touching) if n.op in _COMPUTING and (state or order[n] <= last)
        ]
        for n in tied:
            groups.union(tied[0], n)
    found: dict[Node, list[Node]] = {}
    for n in sorted(groups.items(), key=order.__getitem__):
        found.setdefault(groups.find(n), []).append(n)
    return [tuple(g) for g in found.values() if len(g) > 1]


def _roots(gm: GraphModule) -> dict[Node, Node]:
    """The node whose storage each node's output shares (itself for new storage)."""
    roots: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        source = aliased_input(node)
        roots[node] = roots.get(source, source) if source is not None else node
    return roots


def _producer(root: Node) -> Iterable[Node]:
    """The multi-output node an item (``getitem``) of new storage comes from: it runs on the same
    stage as its items (split_stages moves a ``getitem`` to its producer's stage)."""
    if root.op == "call_function" and root.target is operator.getitem:
        source = root.args[0]
        if isinstance(source, Node):
            yield source


class _UnionFind:
    def __init__(self) -> None:
        self._parent: dict[Node, Node] = {}

    def items(self) -> list[Node]:
        return list(self._parent)

    def find(self, n: Node) -> Node:
        self._parent.setdefault(n, n)
        while self._parent[n] is not n:
            self._parent[n] = self._parent[self._parent[n]]
            n = self._parent[n]
        return n

    def union(self, a: Node, b: Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[rb] = ra


def _writes_result(node: Node) -> bool:
    """Whether ``node``'s output is the tensor it writes (``add_`` returns ``self``; BatchNorm's
    output is new storage although it writes its running statistics)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        returns = target._schema.returns
        return (
            bool(returns) and returns[0].alias_info is not None and returns[0].alias_info.is_write
        )
    return True


def _argument(node: Node, index: int, name: str) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name)


def _nodes(values: Iterable[Any]) -> Iterable[Node]:
    for v in values:
        if isinstance(v, Node):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _nodes(v)


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")
