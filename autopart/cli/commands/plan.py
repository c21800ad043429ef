"""``autopart plan MODEL``: the stage ILP's plan (and, with ``--mesh auto``, the mesh search)
beside the baselines."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from autopart.cli.console import is_quiet, out, print_json, spinner
from autopart.cli.loading import load_and_trace
from autopart.cli.options import (
    add_device,
    add_format,
    add_model,
    add_pipeline,
    add_tracing,
    plan_request,
)
from autopart.cli.plan_tables import print_plan
from autopart.errors import AutopartError
from autopart.planning.plans import format_mesh
from autopart.planning.request import PlanRequest
from autopart.units import format_bytes, format_seconds

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="split a model into pipeline stages",
        description="Trace MODEL, solve the stage ILP and print the plan beside the baselines.",
    )
    add_model(p)
    add_tracing(p)
    add_pipeline(p, search=True)
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="number of devices; required with --mesh auto (with an explicit mesh it must match)",
    )
    add_device(p, default="h100")
    p.add_argument(
        "--comm-cache",
        action="store_true",
        help="plan on the link latency, bandwidth and pipeline cost per action that `autopart run` "
        "measured on this kind of machine at this mesh's size ($AUTOPART_CACHE_DIR/comm.json)",
    )
    p.add_argument(
        "--memory", default=None, help="memory per device, e.g. 80GiB (default: the device's)"
    )
    p.add_argument("--optimizer", choices=["sgd", "sgd_momentum", "adam", "adamw"], default="adamw")
    p.add_argument(
        "--time-limit",
        type=float,
        default=10.0,
        help="limit of each solver run (stage and TP ILPs), in CP-SAT's deterministic seconds "
        "(about a second of a fast core; the same plan on any machine; default 10)",
    )
    p.add_argument("--out", default=None, help="write the plan as JSON to this file")
    p.add_argument(
        "--svg", default=None, help="write a Gantt chart of the schedule to this SVG file"
    )
    add_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.planning.mesh_plan import planning_setup

    request = plan_request(args)  # bad input fails before tracing
    if args.comm_cache:
        request = _with_measured_comm(request)
    if request.is_auto and request.devices is None:
        raise AutopartError(
            "--mesh auto searches the meshes of a number of devices: add --devices N (e.g. --devices 64)."
        )
    planning_setup(request)
    start = time.perf_counter()
    loaded, gm, _ = load_and_trace(args)
    result, search = _solve(args, request.with_options(name=loaded.name), loaded, gm)
    elapsed_s = time.perf_counter() - start
    _write_files(args, result, loaded.name)
    if args.format == "json":
        doc = result.to_dict()
        doc["elapsed_s"] = round(elapsed_s, 3)
        if search is not None:
            doc["mesh_search"] = search.to_dict()
        print_json(doc)
        return 0
    print_plan(result, elapsed_s)
    if search is not None:
        _print_mesh_search(search)
    return 0


def _solve(args: argparse.Namespace, request: PlanRequest, loaded: Any, gm: Any) -> tuple[Any, Any]:
    """``(plan, mesh search or None)``: the plan of ``request``'s mesh, or the fastest mesh's."""
    from autopart.planning.mesh_plan import batch_size
    from autopart.planning.mesh_search import search_mesh
    from autopart.planning.planner import plan_graph

    batch = batch_size(loaded.example_inputs)
    with spinner("planning", is_quiet(args)) as status:
        progress = (lambda msg: status.update(msg)) if status is not None else None
        if request.is_auto:
            search = search_mesh(gm, request, batch=batch, progress=progress)
            return search.plan, search
        return plan_graph(gm, request, batch=batch, progress=progress), None


def _write_files(args: argparse.Namespace, plan: Any, model: str) -> None:
    """The plan's JSON (``--out``) and the Gantt chart of its schedule (``--svg``)."""
    if args.out:
        Path(args.out).write_text(plan.to_json())
    if args.svg:
        from autopart.planning.gantt import render_svg
        from autopart.planning.mesh_plan import simulate_plan

        title = f"{model} {format_mesh(plan.mesh)} {plan.schedule}"
        Path(args.svg).write_text(render_svg(simulate_plan(plan), title=title))


def _print_mesh_search(search: Any) -> None:
    table = Table(
        title=f"meshes of {search.devices} devices (step: the full plan's prediction; estimate: "
        "the chain-DP split, simulated; bound: a lower bound on the step)",
        title_justify="left",
    )
    for col in (
        "mesh",
        "status",
        "step",
        "estimate",
        "bound",
        "memory / device",
        "schedule",
        "note",
    ):
        table.add_column(col, justify="left" if col in ("mesh", "status", "note") else "right")
    for c in search.candidates:
        table.add_row(
            format_mesh(c.mesh),
            c.status,
            format_seconds(c.step_time_s) if c.step_time_s is not None else "",
            format_seconds(c.estimate_s) if c.estimate_s is not None else "",
            f">= {format_seconds(c.step_bound_s)}" if c.step_bound_s is not None else "",
            format_bytes(c.memory_bytes) if c.memory_bytes else "",
            f"{c.schedule} x {c.micro_batches}" if c.schedule else "",
            c.note,
        )
    out.print(table)
    solves = ", ".join(f"{k} {v:.2f} s" for k, v in search.tp_solve_s.items()) or "none"
    out.print(f"{search.reason} TP solves: {solves}; search {search.elapsed_s:.2f} s.")


def _with_measured_comm(request: PlanRequest) -> PlanRequest:
    """``request`` planned on the cached measurement for its device and mesh size."""
    from autopart.cost_models.comm_fit import cached_device
    from autopart.cost_models.devices import get_device

    if request.is_auto:
        raise AutopartError(
            "--comm-cache needs a fixed mesh (a measurement is for one group size); give "
            "--mesh pp=N, or drop --comm-cache"
        )
    return request.with_options(device=cached_device(get_device(request.device), request.size))
