"""The data behind ``autopart inspect``: per-node and per-module rows and the JSON summary of an
annotated graph. Pure functions of the graph, so they are tested without the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from autopart.cost_models.devices import DeviceSpec
from autopart.passes.annotate import node_cost

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
    order. Module rows sum their nodes; ``depth`` truncates module paths (``model.layers.0``)."""
    nodes = [n for n in gm.graph.nodes if n.op not in _HIDDEN_OPS]
    if by == "node":
        return [node_row(n, device, measured) for n in nodes]
    if by != "module":
        raise ValueError(f"by must be 'node' or 'module', got {by!r}")
    groups: dict[str, dict[str, Any]] = {}
    seen_params: dict[str, set[str]] = {}
    for n in nodes:
        cost = node_cost(n)
        path = cost.module if depth is None else ".".join(cost.module.split(".")[:depth])
        g = groups.get(path)
        if g is None:
            g = groups[path] = {
                "module": path,
                "module_type": cost.module_type if depth is None or path == cost.module else "",
                "nodes": 0,
                "shape": "",
                "dtype": "",
                "flops": 0,
                "backward_flops": 0,
                "bytes": 0,
                "param_bytes": 0,
                "time_s": 0.0,
                "measured_s": 0.0 if measured is not None else None,
            }
            seen_params[path] = set()
        g["nodes"] += 1
        g["flops"] += cost.flops
        g["backward_flops"] += cost.backward_flops
        g["bytes"] += cost.bytes
        g["shape"], g["dtype"] = _shape(n.meta.get("val")), cost.dtype  # the module's last output
        new = [p for p in cost.params if p not in seen_params[path]]
        seen_params[path].update(new)
        g["param_bytes"] += _param_bytes(gm, new)
        if device is not None:
            g["time_s"] += _time_s(cost, device)
        if measured is not None and n.name in measured:
            g["measured_s"] += measured[n.name].forward_s
    return list(groups.values())


def inspect_summary(
    loaded: Any,
    gm: GraphModule,
    *,
    device: DeviceSpec | None = None,
    measured: Mapping[str, Any] | None = None,
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """The ``--format json`` document: model, totals and every node."""
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
