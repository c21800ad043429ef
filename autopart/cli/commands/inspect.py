"""``autopart inspect MODEL``: the traced graph with each node's (or module's) cost."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from autopart.cli.console import bar, err, is_quiet, out, print_json
from autopart.cli.loading import load_and_trace
from autopart.cli.options import add_format, add_model, add_tracing
from autopart.units import format_bytes, format_flops, format_seconds

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="trace a model and show what each node costs",
        description="Trace MODEL and print its graph: op, shape, FLOPs, bytes and parameters per node.",
    )
    add_model(p)
    add_tracing(p)
    p.add_argument(
        "--by",
        choices=["node", "module"],
        default="node",
        help="one row per node (default) or per module",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="with --by module: group by the first DEPTH parts of the module path",
    )
    p.add_argument(
        "--device",
        default=None,
        help="also predict each row's forward time on this device (h100, h200, a100, cpu)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also measure every node on this machine (CUDA if present, else CPU), cache the times "
        "and calibrate the --device roofline (default: cpu) to them",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="show at most this many rows (totals still cover everything)",
    )
    add_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.cli.inspection import inspect_rows, inspect_summary
    from autopart.cost_models import get_device

    device = get_device(args.device) if args.device is not None else None  # fail before tracing
    loaded, gm, elapsed_s = load_and_trace(args)
    measured = None
    if args.profile:
        measured, device = _profile(args, gm, device)
    summary = inspect_summary(loaded, gm, device=device, measured=measured, elapsed_s=elapsed_s)
    if args.format == "json":
        print_json(summary)
        return 0
    rows = inspect_rows(gm, by=args.by, depth=args.depth, device=device, measured=measured)
    _print_table(summary, rows, limit=args.limit, device=device, by_module=args.by == "module")
    return 0


def _profile(args: argparse.Namespace, gm: Any, device: Any) -> tuple[Any, Any]:
    """Measure node times locally and calibrate the device model to them."""
    import torch

    from autopart.cost_models import get_device
    from autopart.cost_models.profiling import calibrate, profile_graph
    from autopart.passes.annotate import node_cost

    quiet = is_quiet(args)
    with bar(quiet) as progress:
        task = progress.add_task("profiling", total=len(gm.graph.nodes))
        measured = profile_graph(
            gm, progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    if device is None:
        device = get_device("cpu") if not torch.cuda.is_available() else None
    if device is not None:
        costs = {n.name: node_cost(n) for n in gm.graph.nodes}
        device = calibrate(device, costs, measured)
        if not quiet:
            err.print(
                f"calibrated {device.name}: compute efficiency {device.compute_efficiency:.3f}, "
                f"memory efficiency {device.memory_efficiency:.3f}, per-kernel overhead {device.kernel_launch_s * 1e6:.1f} µs"
            )
    return measured, device


def _print_table(
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    limit: int | None,
    device: Any,
    by_module: bool,
) -> None:
    profiled = "measured_forward_s" in summary["totals"]
    table = _table(summary, by_module=by_module, device=device, profiled=profiled)
    for r in rows if limit is None else rows[:limit]:
        table.add_row(*_row_cells(r, by_module=by_module, device=device, profiled=profiled))
    if limit is not None and len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more rows", *[""] * (len(table.columns) - 1))
    table.add_section()
    t = summary["totals"]
    table.add_row(*_total_cells(t, by_module=by_module, device=device), style="bold")
    out.print(table)
    out.print(
        f"parameters {t['params']:,} ({format_bytes(t['param_bytes'])})   "
        f"forward {format_flops(t['flops'])}   backward {format_flops(t['backward_flops'])}   "
        f"activations saved for backward {format_bytes(t['activation_bytes'])}   "
        f"{t['nodes']} nodes   traced and annotated in {summary['elapsed_s']:.2f} s"
    )
    if "experts" in summary:
        out.print(f"experts: {summary['experts']}")


def _table(summary: dict[str, Any], *, by_module: bool, device: Any, profiled: bool) -> Table:
    table = Table(
        title=f"{summary['model']}  ({summary['trace_method']}, inputs {summary['inputs']})",
        title_justify="left",
    )
    if by_module:
        table.add_column("module")
        table.add_column("type")
        table.add_column("nodes", justify="right")
    else:
        table.add_column("node")
        table.add_column("op")
        table.add_column("module")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("FLOPs", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("params", justify="right")
    if device is not None:
        table.add_column(f"time on {device.name}", justify="right")
    if profiled:
        table.add_column("measured", justify="right")
    return table


def _row_cells(r: dict[str, Any], *, by_module: bool, device: Any, profiled: bool) -> list[str]:
    cells = (
        [r["module"] or "<root>", r["module_type"], str(r["nodes"])]
        if by_module
        else [r["name"], r["target"], r["module"] or "<root>"]
    )
    cells += [
        r["shape"],
        r["dtype"],
        format_flops(r["flops"]) if r["flops"] else "",
        format_bytes(r["bytes"]) if r["bytes"] else "",
        format_bytes(r["param_bytes"]) if r["param_bytes"] else "",
    ]
    if device is not None:
        cells.append(format_seconds(r["time_s"]) if r["time_s"] else "")
    if profiled:
        cells.append(format_seconds(r["measured_s"]) if r.get("measured_s") else "")
    return cells


def _total_cells(t: dict[str, Any], *, by_module: bool, device: Any) -> list[str]:
    cells = ["total", "", str(t["nodes"]) if by_module else "", "", ""]
    cells += [format_flops(t["flops"]), format_bytes(t["bytes"]), format_bytes(t["param_bytes"])]
    if device is not None:
        cells.append(format_seconds(t["forward_time_s"]))
    if "measured_forward_s" in t:
        cells.append(format_seconds(t["measured_forward_s"]))
    return cells
