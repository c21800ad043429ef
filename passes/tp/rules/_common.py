"""What every sharding rule reads: the op name of a node, its arguments and fake values, and the
:class:`RuleContext` a rule gets (the node, the TP degree, its inputs' candidate placements, and
the reasons a split was refused)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import Node

from autopart.passes.tp.placements import Placement, R, Strategy, dual

__all__ = [
    "Rule",
    "RuleContext",
    "node_arg",
    "node_args",
    "norm_dim",
    "op_label",
    "op_name",
    "overload_name",
    "tensor_val",
]


def op_name(node: Node) -> str:
    """``"add"`` for ``aten.add.Tensor``, ``"getitem"`` for ``operator.getitem``; ``""`` otherwise."""
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[-1]
    return ""


def overload_name(node: Node) -> str:
    target = node.target
    return target._overloadname if isinstance(target, torch._ops.OpOverload) else ""


def tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def node_args(node: Node) -> Any:
    """``node.args``, untyped: aten schemas fix what each position holds."""
    return node.args


def node_arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def op_label(node: Node) -> str:
    """The op, for reasons; reasons name no node, so identical layers share their strategies."""
    return op_name(node) or str(node.target)


class RuleContext:
    """What one rule needs: the node, the TP degree, the inputs' candidate placements, and a list
    collecting divisibility reasons."""

    def __init__(self, node: Node, degree: int, cands: Mapping[Node, list[Placement]]) -> None:
        self.node = node
        self.degree = degree
        self.cands = cands
        self.inputs = node.all_input_nodes
        self.reasons: list[str] = []

    def slot(self, arg: Any) -> int:
        return self.inputs.index(arg)

    def input_cands(self, arg: Node) -> list[Placement]:
        return self.cands.get(arg, [R])

    def divides(self, size: int, groups: int, what: str) -> bool:
        if size % (groups * self.degree) == 0:
            return True
        per = f"{size} = {groups} parts of {size // groups}" if groups > 1 else str(size)
        self.reasons.append(f"{what} ({per}) not divisible by the TP degree {self.degree}")
        return False

    def strategy(
        self,
        label: str,
        output: Placement,
        required: Mapping[int, Placement],
        grads: Mapping[int, Placement] | None = None,
        *,
        sharded: bool = True,
    ) -> Strategy:
        """A strategy with ``required[slot]`` for the given inputs (``R`` for the others) and
        gradients ``grads[slot]`` (default: the dual of the requirement)."""
        grads = grads or {}
        ins = tuple(required.get(i, R) for i in range(len(self.inputs)))
        gs = tuple(grads.get(i, dual(p)) for i, p in enumerate(ins))
        return Strategy(label, output, ins, gs, sharded=sharded)


Rule = Callable[[RuleContext], list[Strategy]]
"""A sharding rule: the sharded strategies it proves for ``ctx.node`` (the registry adds ``R``)."""
