"""A one-process simulation of tensor parallelism: run a graph as ``d`` ranks would under a
:class:`~autopart.solver.tp_ilp.TPPlan`, each rank holding only its shard of every tensor, with the
collectives played by gathering and summing the ranks' tensors.

It checks the propagation rules of :mod:`autopart.passes.tp.strategies`: every tensor a plan calls
``R`` must be identical on all ranks, and the outputs must equal the unsharded model's. Ops run on
local shards with their shape arguments rewritten to the local shapes (a ``view`` to
``[2, 16, -1, 16]`` of a head-split tensor becomes ``[2, 16, -1 / d, 16]``), a row-parallel bias is
added by rank 0 only, and a vocabulary-parallel embedding looks up its own range of the vocabulary.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from autopart.passes.tp.placements import Placement
from autopart.solver.tp_ilp import TPPlan

__all__ = ["simulate_tp"]


def simulate_tp(gm: GraphModule, plan: TPPlan, args: Sequence[Any]) -> list[Any]:
    """The outputs of ``gm(*args)`` computed shard by shard under ``plan`` (full tensors)."""
    d = plan.degree
    local: dict[Node, list[Any]] = {}
    inputs = iter(args)
    for node in gm.graph.nodes:
        out_p = Placement.parse(plan.placements[node.name])
        if node.op == "placeholder":
            local[node] = _from_global(next(inputs), out_p, d)
        elif node.op == "get_attr":
            local[node] = _from_global(_fetch(gm, str(node.target)), out_p, d)
        elif node.op == "output":
            outs = []
            for inp in node.all_input_nodes:
                outs.append(_to_global(local[inp], Placement.parse(plan.placements[inp.name]), d))
            return outs
        elif node.op == "call_function":
            want = plan.input_placements.get(node.name, {})
            ins = {
                inp: _convert(
                    local[inp],
                    Placement.parse(plan.placements[inp.name]),
                    Placement.parse(want[inp.name]),
                    d,
                    inp.name,
                )
                for inp in node.all_input_nodes
            }
            local[node] = [
                _run(node, {n: v[r] for n, v in ins.items()}, r, d, plan, out_p) for r in range(d)
            ]
        else:
            raise NotImplementedError(f"{node.op} nodes are not simulated")
    raise AssertionError("graph without output")


def _run(
    node: Node, env: dict[Node, Any], rank: int, d: int, plan: TPPlan, out_p: Placement
) -> Any:
    args = torch.fx.node.map_arg(node.args, env.__getitem__)
    kwargs = dict(torch.fx.node.map_arg(node.kwargs, env.__getitem__))
    target = node.target
    name = _name(node)
    strategy_in = {
        n: Placement.parse(p) for n, p in plan.input_placements.get(node.name, {}).items()
    }
    val = node.meta.get("val")
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        args = (args[0], _local_shape(val, out_p, d), *args[2:])
    elif name == "unflatten":
        dim = args[1] % args[0].ndim
        args = (args[0], args[1], _local_shape(val, out_p, d)[dim : dim + len(args[2])])
    elif name in ("split", "split_with_sizes"):
        src = node.args[0]
        dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % src.meta["val"].ndim
        p = strategy_in[src.name]
        if p.is_shard and p.dim == dim:
            size = args[1]
            args = (
                args[0],
                [s // d for s in size] if isinstance(size, list) else size // d,
                *args[2:],
            )
    elif name == "repeat_interleave" and kwargs.get("output_size") is not None:
        kwargs["output_size"] = _local_shape(val, out_p, d)[node.args[2] % val.ndim]
    elif name == "embedding":
        weight_p = strategy_in[node.args[0].name]
        if weight_p.is_shard and weight_p.dim == 0:  # vocabulary-parallel
            w, ids = args[0], args[1]
            lo = rank * w.shape[0]
            inside = (ids >= lo) & (ids < lo + w.shape[0])
            looked = F.embedding((ids - lo).clamp(0, w.shape[0] - 1), w)
            return looked * inside.unsqueeze(-1).to(looked.dtype)
    if name in ("linear", "addmm") and out_p.kind == "P" and rank > 0:
        bias_pos = 2 if name == "linear" else 0
        if len(args) > bias_pos and isinstance(args[bias_pos], torch.Tensor):
            args = list(args)
            args[bias_pos] = torch.zeros_like(args[bias_pos])
            args = tuple(args)
    return target(*args, **kwargs)  # type: ignore[operator]


def _name(node: Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::", 1)[-1] if schema is not None else ""


def _local_shape(val: torch.Tensor, p: Placement, d: int) -> list[int]:
    shape = list(val.shape)
    if p.is_shard:
        shape[p.dim] //= d
    return shape


def _fetch(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _convert(values: list[Any], src: Placement, dst: Placement, d: int, name: str) -> list[Any]:
    if src == dst:
        return values
    if dst.kind == "P":
        raise AssertionError(f"{name}: cannot make {src} partial")
    return _from_global(_to_global(values, src, d, name), dst, d)


def _to_global(values: list[Any], p: Placement, d: int, name: str = "") -> Any:
    if p.kind == "P":
        return sum(values[1:], values[0])
    if p.kind == "R":
        first = values[0]
        if isinstance(first, torch.Tensor):
            for other in values[1:]:
                torch.testing.assert_close(
                    other, first, rtol=0, atol=0, msg=f"{name} is not replicated"
                )
        return first
    parts = [v.unflatten(p.dim, (p.groups, -1)) for v in values]
    return torch.cat(parts, dim=p.dim + 1).flatten(p.dim, p.dim + 1)


def _from_global(value: Any, p: Placement, d: int) -> list[Any]:
    if p.kind == "R":
        return [value] * d
    if p.kind == "P":
        raise AssertionError("a full tensor cannot be given as partial sums")
    grouped = value.unflatten(p.dim, (p.groups, -1))
    return [c.flatten(p.dim, p.dim + 1) for c in grouped.chunk(d, dim=p.dim + 1)]
