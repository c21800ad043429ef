"""The data behind ``autopart inspect``: per-node and per-module rows and the JSON summary of an
annotated graph. Pure functions of the graph, so they are tested without the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from autopart.cost_models.devices import DeviceSpec
from autopart.passes.annotate import node_cost
from autopart.passes.routing import ExpertGroup, expert_groups, routing_of

__all__ = ["inspect_rows", "inspect_summary", "node_row"]

_HIDDEN_OPS = ("get_attr", "output")


def node_row(
    node: Node, device: DeviceSpec | None = None, measured: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    cost = node_cost(node)
    row: dict[str, Any] = {
        "name": node.name,
        "op": node.op,
        "target": _target(node),
        "module": cost.module,
        "module_type": cost.module_type,
        "shape": _shape(node.meta.get("val")),
        "dtype": cost.dtype,
        "flops": cost.flops,
        "backward_flops": cost.backward_flops,
        "bytes": cost.bytes,
        "output_bytes": cost.output_bytes,
        "param_bytes": cost.param_bytes,
        "params": list(cost.params),
    }
    if device is not None:
        row["time_s"] = _time_s(cost, device)
    if measured is not None:
        m = measured.get(node.name)
        row["measured_s"] = m.forward_s if m is not None else None
    return row


def inspect_rows(
    gm: GraphModule,
    *,
    by: str = "node",
    depth: int | None = None,
    device: DeviceSpec | None = None,
    measured: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Table rows: one per computing node (``by="node"``) or per module (``by="module"``), in graph
    order. Module rows sum their nodes; ``depth`` truncates module paths (``model.layers.0``).
    The per-expert nodes of an MoE layer that runs its experts one by one are one row
    (``model.layers.0.mlp.experts.*``, with ``experts``: how many) in either view
    (:func:`autopart.passes.routing.expert_groups`)."""
    if by not in ("node", "module"):
        raise ValueError(f"by must be 'node' or 'module', got {by!r}")
    groups = {n: g for g in expert_groups(gm) for n in g.nodes}
    nodes = [n for n in gm.graph.nodes if n.op not in _HIDDEN_OPS]
    if by == "node":
        rows: dict[Any, dict[str, Any]] = {}
        for n in nodes:
            group = groups.get(n)
            if group is None:
                rows[n] = node_row(n, device, measured)
                continue
            if group not in rows:
                rows[group] = _sum_row(group.module, group, measured)
                rows[group].update(
                    name=f"{group.experts} experts", op="experts", target=f"{len(group.nodes)} ops"
                )
            _add(rows[group], gm, n, device, measured)
        return list(rows.values())
    by_path: dict[str, dict[str, Any]] = {}
    for n in nodes:
        cost, group = node_cost(n), groups.get(n)
        module = group.module if group is not None else cost.module
        path = module if depth is None else ".".join(module.split(".")[:depth])
        if path not in by_path:
            by_path[path] = _sum_row(path, group, measured)
            if depth is None or path == module:
                by_path[path]["module_type"] = (
                    f"{group.experts} experts" if group else cost.module_type
                )
        _add(by_path[path], gm, n, device, measured)
    return list(by_path.values())


def _sum_row(
    path: str, group: ExpertGroup | None, measured: Mapping[str, Any] | None
) -> dict[str, Any]:
    """An empty row that sums nodes (:func:`_add`): a module's, or an expert group's."""
    row: dict[str, Any] = {
        "module": path,
        "module_type": "",
        "nodes": 0,
        "shape": "",
        "dtype": "",
        "flops": 0,
        "backward_flops": 0,
        "bytes": 0,
        "output_bytes": 0,
        "param_bytes": 0,
        "params": [],
        "time_s": 0.0,
        "measured_s": 0.0 if measured is not None else None,
    }
    if group is not None:
        row["experts"] = group.experts
    return row


def _add(
    row: dict[str, Any],
    gm: GraphModule,
    n: Node,
    device: DeviceSpec | None,
    measured: Mapping[str, Any] | None,
) -> None:
    """Add node ``n`` to the summed ``row`` (its parameters once)."""
    cost = node_cost(n)
    row["nodes"] += 1
    row["flops"] += cost.flops
    row["backward_flops"] += cost.backward_flops
    row["bytes"] += cost.bytes
    row["output_bytes"] += cost.output_bytes
    row["shape"], row["dtype"] = _shape(n.meta.get("val")), cost.dtype  # the last node's output
    new = [p for p in cost.params if p not in row["params"]]
    row["params"].extend(new)
    row["param_bytes"] += _param_bytes(gm, new)
    if device is not None:
        row["time_s"] += _time_s(cost, device)
    if measured is not None and n.name in measured:
        row["measured_s"] += measured[n.name].forward_s


def inspect_summary(
    loaded: Any,
    gm: GraphModule,
    *,
    device: DeviceSpec | None = None,
    measured: Mapping[str, Any] | None = None,
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """The ``--format json`` document: model, totals and every node; for a mixture of experts also
    how its experts were costed (``experts``) and each layer's per-expert nodes
    (``expert_groups``)."""
    totals = gm.meta["autopart_totals"]
    info = gm.meta["autopart_trace"]
    nodes = [node_row(n, device, measured) for n in gm.graph.nodes]
    summary: dict[str, Any] = {
        "model": loaded.name,
        "trace_method": info.method,
        "inputs": _describe(loaded.example_inputs, loaded.example_kwargs),
        "totals": {
            "params": totals.params,
            "flops": totals.flops,
            "backward_flops": totals.backward_flops,
            "param_bytes": totals.param_bytes,
            "buffer_bytes": totals.buffer_bytes,
            "bytes": totals.bytes,
            "activation_bytes": totals.activation_bytes,
            "nodes": totals.nodes,
        },
        "nodes": nodes,
    }
    routing = routing_of(gm)
    if routing is not None and routing.routes:
        summary["experts"] = routing.describe()
        summary["expert_groups"] = [
            {"module": g.module, "experts": g.experts, "nodes": [n.name for n in g.nodes]}
            for g in expert_groups(gm)
        ]
    if device is not None:
        summary["device"] = device.name
        summary["totals"]["forward_time_s"] = sum(r["time_s"] for r in nodes)
    if measured is not None:
        summary["totals"]["measured_forward_s"] = sum(m.forward_s for m in measured.values())
        summary["totals"]["measured_backward_s"] = sum(m.backward_s for m in measured.values())
    if elapsed_s is not None:
        summary["elapsed_s"] = round(elapsed_s, 3)
    return summary


def _time_s(cost: Any, device: DeviceSpec) -> float:
    from autopart.cost_models.compute import node_time_s

    return node_time_s(cost, device)


def _param_bytes(gm: GraphModule, names: list[str]) -> int:
    sizes = gm.meta["autopart_params"]
    return sum(sizes[n][1] for n in names)


def _target(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


def _shape(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return str(list(val.shape))
    if isinstance(val, (list, tuple)):
        parts = [_shape(v) for v in val]
        return "(" + ", ".join(p for p in parts if p) + ")"
    return ""


def _describe(args: Any, kwargs: Any) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in (kwargs or {}).items()]
    return ", ".join(parts)
