"""The ``autopart`` command line: ``autopart inspect MODEL`` (and, as they land, plan / run / bench).

Readable tables go to stdout by default; ``--format json`` prints one JSON document to stdout
instead. Progress and errors go to stderr, so JSON output can be piped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autopart.errors import AutopartError

__all__ = ["main"]

# Piped output keeps full-width tables instead of wrapping every cell at 80 columns.
_out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
_err = Console(stderr=True, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except AutopartError as exc:
        _err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        _err.print("interrupted")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopart",
        description="Automatic pipeline and tensor parallelism for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"autopart {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = sub.add_parser(
        "inspect",
        help="trace a model and show what each node costs",
        description="Trace MODEL and print its graph: op, shape, FLOPs, bytes and parameters per node.",
    )
    _add_model_args(inspect)
    inspect.add_argument(
        "--by",
        choices=["node", "module"],
        default="node",
        help="one row per node (default) or per module",
    )
    inspect.add_argument(
        "--depth",
        type=int,
        default=None,
        help="with --by module: group by the first DEPTH parts of the module path",
    )
    inspect.add_argument(
        "--device",
        default=None,
        help="also predict each row's forward time on this device (h100, h200, a100, cpu)",
    )
    inspect.add_argument(
        "--profile",
        action="store_true",
        help="also measure every node on this machine (CUDA if present, else CPU), cache the times "
        "and calibrate the --device roofline (default: cpu) to them",
    )
    inspect.add_argument(
        "--limit",
        type=int,
        default=None,
        help="show at most this many rows (totals still cover everything)",
    )
    inspect.add_argument("--format", choices=["table", "json"], default="table")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name (gpt2, llama-7b, mlp, ...; `autopart inspect --list`), hf:<model_type>, path/to/file.py:factory or package.module:factory",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    p.add_argument(
        "--seq", type=int, default=None, help="sequence length of token models' example inputs"
    )
    p.add_argument(
        "--config", default=None, help="config overrides for hf: models, e.g. n_layer=2,n_embd=128"
    )
    p.add_argument(
        "--trace-method",
        choices=["auto", "export", "fx"],
        default="auto",
        help="tracer to use (default: export, then fx)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autopart")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


# ---------------------------------------------------------------------------------------------
# shared: load + trace + annotate with progress


def _load_and_trace(args: argparse.Namespace, *, device: str = "meta") -> tuple[Any, Any, float]:
    from autopart.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate
    from autopart.tracing import trace

    overrides = parse_config_overrides(args.config) if args.config else None
    start = time.perf_counter()
    quiet = args.format == "json" and not _err.is_terminal
    with _err.status(f"building {args.model}", spinner="dots") if not quiet else _nullcontext():
        loaded = load_model(
            args.model, batch=args.batch, seq=args.seq, config=overrides, device=device
        )
    with (
        _err.status(f"tracing {loaded.name} ({args.trace_method})", spinner="dots")
        if not quiet
        else _nullcontext()
    ):
        gm = trace(
            loaded.model, loaded.example_inputs, loaded.example_kwargs, method=args.trace_method
        )
    nodes = len(gm.graph.nodes)
    with Progress(
        TextColumn("annotating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("annotate", total=nodes)
        annotate(gm, progress=lambda done, _total: bar.update(task, completed=done))
    return loaded, gm, time.perf_counter() - start


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    from autopart.cost_models import get_device
    from autopart.inspection import inspect_rows, inspect_summary

    device = get_device(args.device) if args.device is not None else None  # fail before tracing
    loaded, gm, elapsed_s = _load_and_trace(args)
    measured = None
    if args.profile:
        measured, device = _profile(args, gm, device)
    summary = inspect_summary(loaded, gm, device=device, measured=measured, elapsed_s=elapsed_s)
    if args.format == "json":
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    rows = inspect_rows(gm, by=args.by, depth=args.depth, device=device, measured=measured)
    _print_inspect_table(summary, rows, limit=args.limit, device=device)
    return 0


def _profile(args: argparse.Namespace, gm: Any, device: Any) -> tuple[Any, Any]:
    """Measure node times locally and calibrate the device model to them."""
    import torch

    from autopart.cost_models import get_device
    from autopart.cost_models.profiling import calibrate, profile_graph
    from autopart.passes.annotate import node_cost

    quiet = args.format == "json" and not _err.is_terminal
    with Progress(
        TextColumn("profiling"),
        BarColumn(),
        MofNCompleteColumn(),
        console=_err,
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("profile", total=len(gm.graph.nodes))
        measured = profile_graph(
            gm, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if device is None:
        device = get_device("cpu") if not torch.cuda.is_available() else None
    if device is not None:
        costs = {n.name: node_cost(n) for n in gm.graph.nodes}
        device = calibrate(device, costs, measured)
        if not quiet:
            _err.print(
                f"calibrated {device.name}: compute efficiency {device.compute_efficiency:.3f}, "
                f"memory efficiency {device.memory_efficiency:.3f}, per-kernel overhead {device.kernel_launch_s * 1e6:.1f} µs"
            )
    return measured, device


def _print_inspect_table(
    summary: dict[str, Any], rows: list[dict[str, Any]], *, limit: int | None, device: Any
) -> None:
    from autopart.units import format_bytes, format_flops, format_seconds

    by_module = rows and "nodes" in rows[0]
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
    profiled = "measured_forward_s" in summary["totals"]
    if profiled:
        table.add_column("measured", justify="right")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
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
        table.add_row(*cells)
    t = summary["totals"]
    if limit is not None and len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more rows", *[""] * (len(table.columns) - 1))
    table.add_section()
    total_cells = ["total", "", str(t["nodes"]) if by_module else "", "", ""]
    total_cells += [
        format_flops(t["flops"]),
        format_bytes(t["bytes"]),
        format_bytes(t["param_bytes"]),
    ]
    if device is not None:
        total_cells.append(format_seconds(t["forward_time_s"]))
    if profiled:
        total_cells.append(format_seconds(t["measured_forward_s"]))
    table.add_row(*total_cells, style="bold")
    _out.print(table)
    _out.print(
        f"parameters {t['params']:,} ({format_bytes(t['param_bytes'])})   "
        f"forward {format_flops(t['flops'])}   backward {format_flops(t['backward_flops'])}   "
        f"activations saved for backward {format_bytes(t['activation_bytes'])}   "
        f"{t['nodes']} nodes   traced and annotated in {summary['elapsed_s']:.2f} s"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
