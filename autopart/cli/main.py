"""The ``autopart`` command line: ``autopart inspect MODEL`` (and, as they land, plan / run / bench).

Readable tables go to stdout by default; ``--format json`` prints one JSON document to stdout
instead. Progress and errors go to stderr, so JSON output can be piped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autopart.errors import AutopartError
from autopart.planning.request import PlanRequest
from autopart.planning.schedule import ScheduleKind

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

    bench = sub.add_parser(
        "bench",
        help="benchmark the solver, the runtime or tensor parallelism",
        description="solver: solve time, gap to the lower bound and speed-up over the baselines for zoo "
        "models and synthetic DAGs. runtime: step time of the autopart pipeline against the same model "
        "split by hand into equal layers per stage, on local gloo ranks (one thread each). tp: TP "
        "solve time, all-reduces per block, communication volume and predicted step time of the TP "
        "ILP's sharding against Megatron-LM's, on GPT-2, Llama-7B and Llama-70B shapes at tp 2, 4, 8.",
    )
    bench.add_argument("--suite", choices=["solver", "runtime", "tp"], default="solver")
    bench.add_argument(
        "--quick", action="store_true", help="a small grid (seconds instead of minutes)"
    )
    bench.add_argument("--format", choices=["table", "json"], default="table")
    bench.set_defaults(run=_cmd_bench)

    run = sub.add_parser(
        "run",
        help="train on local gloo ranks and check against one process",
        description="Spawn the ranks MESH needs on this machine (gloo), train MODEL on random data, check loss "
        "and parameters against the unpartitioned model, and print throughput and stage times beside the plan.",
    )
    run.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name, hf:<model_type>, file.py:factory or package.module:factory",
    )
    run.add_argument("--mesh", default="pp=2", help="mesh spec (default pp=2)")
    run.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    run.add_argument("--micro-batches", type=int, default=None)
    run.add_argument("--schedule", choices=["auto", *ScheduleKind], default="auto")
    run.add_argument("--batch", type=int, default=None)
    run.add_argument("--seq", type=int, default=None)
    run.add_argument(
        "--config", default=None, help="config overrides for hf: models, e.g. n_layer=2,n_embd=64"
    )
    run.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking each tensor-parallel stage against the unsharded stage before training",
    )
    run.add_argument("--format", choices=["table", "json"], default="table")
    run.set_defaults(run=_cmd_run)

    models = sub.add_parser(
        "models", help="list the built-in models", description="List the built-in model zoo."
    )
    models.set_defaults(run=_cmd_models)

    plan = sub.add_parser(
        "plan",
        help="split a model into pipeline stages",
        description="Trace MODEL, solve the stage ILP and print the plan beside the baselines.",
    )
    _add_model_args(plan)
    plan.add_argument(
        "--mesh",
        default="pp=2",
        help="mesh spec, e.g. pp=4 or dp=2,pp=2,tp=2 (default pp=2), or auto: search the "
        "dp x pp x tp meshes of --devices devices (tp up to 8, within a node) and keep the "
        "fastest that fits memory",
    )
    plan.add_argument(
        "--devices",
        type=int,
        default=None,
        help="number of devices; required with --mesh auto (with an explicit mesh it must match)",
    )
    plan.add_argument(
        "--device", default="h100", help="device to plan for: h100, h200, a100, cpu (default h100)"
    )
    plan.add_argument(
        "--memory", default=None, help="memory per device, e.g. 80GiB (default: the device's)"
    )
    plan.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches per step (default: chosen by simulation)",
    )
    plan.add_argument(
        "--schedule",
        choices=["auto", *ScheduleKind],
        default="auto",
        help="pipeline schedule (default auto: simulate each and keep the fastest that fits memory)",
    )
    plan.add_argument(
        "--optimizer", choices=["sgd", "sgd_momentum", "adam", "adamw"], default="adamw"
    )
    plan.add_argument(
        "--time-limit", type=float, default=10.0, help="solver time limit in seconds (default 10)"
    )
    plan.add_argument("--out", default=None, help="write the plan as JSON to this file")
    plan.add_argument(
        "--svg", default=None, help="write a Gantt chart of the schedule to this SVG file"
    )
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.set_defaults(run=_cmd_plan)

    emit = sub.add_parser(
        "emit",
        help="write a standalone parallel program runnable with torchrun",
        description="Plan MODEL for MESH (pp, dp and tp) and write a standalone program to --out: "
        "one Python file per pipeline stage (each TP rank's shard of it with tp > 1), a launcher "
        "run.py, the weights, a random batch and the plan. Run it with "
        "`torchrun --nproc-per-node N run.py` (only torch needed).",
    )
    emit.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name, hf:<model_type>, file.py:factory or package.module:factory",
    )
    emit.add_argument("--mesh", default="pp=2", help="mesh spec (default pp=2)")
    emit.add_argument("--out", required=True, help="folder to write the program into")
    emit.add_argument("--micro-batches", type=int, default=None)
    emit.add_argument("--schedule", choices=["auto", *ScheduleKind], default="auto")
    emit.add_argument(
        "--device", default="cpu", help="device to plan for (default cpu: the gloo runtime's)"
    )
    emit.add_argument("--batch", type=int, default=None)
    emit.add_argument("--seq", type=int, default=None)
    emit.add_argument(
        "--config", default=None, help="config overrides for hf: models, e.g. n_layer=2,n_embd=64"
    )
    emit.add_argument("--steps", type=int, default=10, help="run.py's default steps (default 10)")
    emit.add_argument("--lr", type=float, default=0.01, help="run.py's default SGD lr (0.01)")
    emit.add_argument("--format", choices=["table", "json"], default="table")
    emit.set_defaults(run=_cmd_emit)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name (gpt2, llama-7b, mlp, ...; `autopart models` lists them), hf:<model_type>, path/to/file.py:factory or package.module:factory",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    p.add_argument(
        "--seq", type=int, default=None, help="sequence length of token models' example inputs"
    )
    p.add_argument(
        "--config", default=None, help="config overrides for hf: models, e.g. n_layer=2,n_embd=128"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="parameter and activation dtype of built-in and hf: models (default float32)",
    )
    p.add_argument(
        "--no-repeat",
        action="store_true",
        help="trace every repeated layer instead of tracing three and replicating them",
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
    import torch

    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate

    overrides = parse_config_overrides(args.config) if args.config else None
    start = time.perf_counter()
    quiet = _quiet(args)
    with _spinner(f"building {args.model}", quiet):
        loaded = load_model(
            args.model,
            batch=args.batch,
            seq=args.seq,
            config=overrides,
            device=device,
            dtype=getattr(torch, args.dtype),
        )
    with _spinner(f"tracing {loaded.name} ({args.trace_method})", quiet):
        gm = trace(
            loaded.model,
            loaded.example_inputs,
            loaded.example_kwargs,
            method=args.trace_method,
            repeat="off" if args.no_repeat else "auto",
        )
    nodes = len(gm.graph.nodes)
    with _bar("annotating", quiet) as bar:
        task = bar.add_task("annotating", total=nodes)
        annotate(gm, progress=lambda done, _total: bar.update(task, completed=done))
    return loaded, gm, time.perf_counter() - start


def _quiet(args: argparse.Namespace) -> bool:
    """No spinners or bars when JSON goes to a pipe and nobody watches stderr."""
    return bool(args.format == "json" and not _err.is_terminal)


def _run_suite(label: str, suite: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A bench suite's rows, with a progress bar that names the case being run."""
    with _bar(label, _quiet(args)) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int, case: str) -> None:
            bar.update(task, completed=done, total=total, description=case)

        rows: list[dict[str, Any]] = suite(quick=args.quick, progress=progress)
    return rows


def _bar(label: str, quiet: bool) -> Progress:
    """A transient progress bar on stderr; its tasks show their own description."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=_err, transient=True, disable=quiet)


def _spinner(text: str, quiet: bool) -> Any:
    """A spinner on stderr, or nothing when ``quiet``; yields the status (or ``None``)."""
    return _nullcontext() if quiet else _err.status(text, spinner="dots")


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    from autopart.cli.inspection import inspect_rows, inspect_summary
    from autopart.cost_models import get_device

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

    quiet = _quiet(args)
    with _bar("profiling", quiet) as bar:
        task = bar.add_task("profiling", total=len(gm.graph.nodes))
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from autopart.bench.solver import solver_suite

    if args.suite == "runtime":
        return _cmd_bench_runtime(args)
    if args.suite == "tp":
        return _cmd_bench_tp(args)
    from autopart.units import format_seconds

    rows = _run_suite("solver bench", solver_suite, args)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    table = Table(
        title="stage solver: solve time, gap to the lower bound, speed-up over the baselines",
        title_justify="left",
    )
    for col in (
        "case",
        "nodes",
        "blocks",
        "stages",
        "status",
        "solve",
        "gap",
        "vs equal layers",
        "vs equal params",
    ):
        table.add_column(col, justify="left" if col in ("case", "status") else "right")
    for r in rows:
        table.add_row(
            str(r["case"]),
            str(r["nodes"]),
            str(r["blocks"]),
            str(r["stages"]),
            str(r["solver_status"]),
            format_seconds(r["solve_s"]),
            f"{r['gap']:.2%}",
            f"{r['speedup_vs_equal_layers']:.2f}x",
            f"{r['speedup_vs_equal_params']:.2f}x",
        )
    _out.print(table)
    return 0


def _cmd_bench_tp(args: argparse.Namespace) -> int:
    import math

    from autopart.bench.tp import tp_suite
    from autopart.units import format_bytes, format_seconds

    rows = _run_suite("tp bench", tp_suite, args)
    if args.format == "json":  # no plan that fits: null, not NaN (standard JSON)
        nulls = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows
        ]
        json.dump(nulls, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    table = Table(
        title="tensor parallelism: the TP ILP against Megatron-LM's sharding (bf16, meta device; "
        "comm: bytes each rank sends per step; plan: pp stages x tp ranks, predicted step)",
        title_justify="left",
    )
    for col in (
        "case",
        "tp",
        "TP solve",
        "all-reduces / block",
        "comm",
        "Megatron comm",
        "TP step",
        "Megatron TP step",
        "Megatron's sharding",
        "plan step",
        "Megatron plan step",
    ):
        table.add_column(col, justify="left" if col == "case" else "right")

    def secs(value: float) -> str:
        return "no fit" if math.isnan(value) else format_seconds(value)

    for r in rows:
        table.add_row(
            f"{r['case']} (pp={r['pp']})",
            str(r["tp"]),
            f"{r['solve_s']:.2f} s",
            f"{r['all_reduces_per_block']} ({r['megatron_all_reduces_per_block']})",
            format_bytes(r["comm_bytes"]),
            format_bytes(r["megatron_comm_bytes"]),
            secs(r["tp_step_s"]),
            secs(r["megatron_tp_step_s"]),
            "found" if r["matches_megatron"] else "differs",
            secs(r["plan_step_s"]),
            secs(r["megatron_plan_step_s"]),
        )
    _out.print(table)
    return 0


def _cmd_bench_runtime(args: argparse.Namespace) -> int:
    from autopart.bench.runtime import runtime_suite
    from autopart.units import format_seconds

    rows = _run_suite("runtime bench", runtime_suite, args)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    table = Table(
        title="runtime: autopart pipeline vs equal layers per stage by hand (same schedule, "
        "gloo, 1 thread per rank); ratio > 1: autopart is faster",
        title_justify="left",
    )
    for col in (
        "case",
        "ranks",
        "autopart step",
        "hand step",
        "ratio",
        "efficiency autopart / hand",
        "closed form",
        "layers per stage autopart / hand",
    ):
        table.add_column(col, justify="left" if col in ("case",) else "right")
    for r in rows:
        table.add_row(
            str(r["case"]),
            str(r["ranks"]),
            format_seconds(r["autopart_step_s"]),
            format_seconds(r["hand_step_s"]),
            f"{r['ratio']:.2f}x",
            f"{r['autopart_efficiency']:.0%} / {r['hand_efficiency']:.0%}",
            f"{r['closed_form_efficiency']:.0%}",
            f"{'-'.join(map(str, r['autopart_layers_per_stage']))} / "
            f"{'-'.join(map(str, r['hand_layers_per_stage']))}",
        )
    _out.print(table)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from autopart.models.model_spec import parse_config_overrides
    from autopart.planning.plans import parse_mesh
    from autopart.runtime.launch import run_local
    from autopart.units import format_seconds

    parse_mesh(args.mesh)
    with _spinner(f"training {args.model} on {args.mesh} (gloo)", _quiet(args)):
        report = run_local(
            args.model,
            mesh=args.mesh,
            steps=args.steps,
            micro_batches=args.micro_batches,
            schedule=args.schedule,
            batch=args.batch,
            seq=args.seq,
            config=parse_config_overrides(args.config) if args.config else None,
            verify=args.verify,
        )
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(report.losses, report.reference_losses)
    )
    ok = loss_diff <= 1e-5 and report.max_param_rel_diff <= 1e-5
    if args.format == "json":
        json.dump(
            {**asdict(report), "max_loss_rel_diff": loss_diff, "matches": ok}, sys.stdout, indent=1
        )
        sys.stdout.write("\n")
        return 0 if ok else 1
    table = Table(
        title=f"{report.model} on {report.mesh}: {report.schedule}, {report.micro_batches} micro-batches",
        title_justify="left",
    )
    for col in (
        "stage",
        "forward / micro-batch",
        "predicted",
        "backward / micro-batch",
        "predicted",
    ):
        table.add_column(col, justify="right")
    for i, row in enumerate(
        zip(
            report.stage_forward_s,
            report.predicted_stage_forward_s,
            report.stage_backward_s,
            report.predicted_stage_backward_s,
        )
    ):
        table.add_row(str(i), *(format_seconds(v) for v in row))
    _out.print(table)
    _out.print(
        f"bubble {report.bubble_fraction:.1%} measured (time outside forward/backward work), "
        f"{report.predicted_bubble_fraction:.1%} predicted by the plan's simulation, "
        f"{report.closed_form_bubble_fraction:.1%} closed form (p-1)/(m+p-1)"
    )
    _out.print(
        f"losses {', '.join(f'{v:.6f}' for v in report.losses)} (one process: "
        f"{', '.join(f'{v:.6f}' for v in report.reference_losses)}); max relative difference: loss "
        f"{loss_diff:.1e}, parameters {report.max_param_rel_diff:.1e} -> {'MATCH' if ok else 'MISMATCH'}"
    )
    _out.print(
        f"step {format_seconds(report.step_time_s)} measured, {format_seconds(report.predicted_step_time_s)} "
        f"predicted; {report.samples_per_s:.1f} samples/s"
    )
    return 0 if ok else 1


def _cmd_models(args: argparse.Namespace) -> int:
    from autopart.models.zoo import list_models

    table = Table(
        title="built-in models (also: hf:<model_type>, file.py:factory, package.module:factory)",
        title_justify="left",
    )
    table.add_column("name")
    table.add_column("description")
    for name, description in list_models():
        table.add_row(name, description)
    _out.print(table)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autopart.planning.mesh_plan import planning_setup
    from autopart.planning.mesh_search import search_mesh
    from autopart.planning.planner import plan_graph
    from autopart.planning.plans import format_mesh

    request = _plan_request(args)  # bad input fails before tracing
    if request.is_auto and request.devices is None:
        raise AutopartError(
            "--mesh auto searches the meshes of a number of devices: add --devices N (e.g. --devices 64)."
        )
    planning_setup(request)
    start = time.perf_counter()
    loaded, gm, _ = _load_and_trace(args)
    request = request.with_options(name=loaded.name)
    batch = _first_batch(loaded.example_inputs)
    search = None
    with _spinner("planning", _quiet(args)) as status:
        progress = (lambda msg: status.update(msg)) if status is not None else None
        if request.is_auto:
            search = search_mesh(gm, request, batch=batch, progress=progress)
            result = search.plan
        else:
            result = plan_graph(gm, request, batch=batch, progress=progress)
    elapsed = time.perf_counter() - start
    if args.out:
        Path(args.out).write_text(result.to_json())
    if args.svg:
        from autopart.planning.gantt import render_svg
        from autopart.planning.mesh_plan import simulate_plan

        mesh_text = format_mesh(result.mesh)
        Path(args.svg).write_text(
            render_svg(simulate_plan(result), title=f"{loaded.name} {mesh_text} {result.schedule}")
        )
    if args.format == "json":
        doc = result.to_dict()
        doc["elapsed_s"] = round(elapsed, 3)
        if search is not None:
            doc["mesh_search"] = search.to_dict()
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    _print_plan(result, elapsed)
    if search is not None:
        _print_mesh_search(search)
    return 0


def _plan_request(args: argparse.Namespace) -> PlanRequest:
    """The planning options of ``autopart plan`` as a request (checked: a bad one raises)."""
    return PlanRequest(
        mesh=args.mesh,
        devices=args.devices,
        device=args.device,
        memory=args.memory,
        micro_batches=args.micro_batches,
        schedule=args.schedule,
        optimizer=args.optimizer,
        time_limit_s=args.time_limit,
    )


def _print_mesh_search(search: Any) -> None:
    from autopart.planning.plans import format_mesh
    from autopart.units import format_bytes, format_seconds

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
    _out.print(table)
    solves = ", ".join(f"{k} {v:.2f} s" for k, v in search.tp_solve_s.items()) or "none"
    _out.print(f"{search.reason} TP solves: {solves}; search {search.elapsed_s:.2f} s.")


def _cmd_emit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autopart.codegen.emitter import emit_model

    quiet = _quiet(args)
    start = time.perf_counter()
    with _spinner(f"planning and writing {args.model} for {args.mesh}", quiet):
        plan, written = emit_model(
            args.model,
            Path(args.out),
            mesh=args.mesh,
            micro_batches=args.micro_batches,
            schedule=args.schedule,
            device=args.device,
            batch=args.batch,
            seq=args.seq,
            config=args.config,
            steps=args.steps,
            lr=args.lr,
        )
    files = sorted(p.name for p in written.iterdir() if p.is_file())
    command = f"torchrun --nproc-per-node {math.prod(plan.mesh.values())} run.py"
    if args.format == "json":
        doc = {"out": str(written), "files": files, "command": command, "plan": plan.to_dict()}
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    _print_plan(plan, time.perf_counter() - start)
    _out.print(f"wrote {', '.join(files)} to {written}")
    _out.print(f"run it with: cd {written} && {command}")
    return 0


def _first_batch(inputs: Any) -> int:
    from autopart.planning.mesh_plan import batch_size

    return batch_size(inputs)


def _print_plan(plan: Any, elapsed_s: float) -> None:
    from autopart.planning.plans import format_mesh
    from autopart.units import format_bytes, format_seconds

    title = (
        f"{plan.model}: {plan.num_stages} stages on {plan.device}, mesh {format_mesh(plan.mesh)}, "
        f"{plan.schedule}, {plan.micro_batches} micro-batches"
    )
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("stage", "right"),
        ("modules", "left"),
        ("nodes", "right"),
        ("fwd+bwd / micro-batch", "right"),
        ("params", "right"),
        ("peak memory", "right"),
        ("utilisation", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    busy = [s.predicted_s * plan.micro_batches for s in plan.stages]
    for st, b in zip(plan.stages, busy):
        table.add_row(
            str(st.index),
            _compress(st.modules),
            str(st.node_count),
            format_seconds(st.predicted_s),
            format_bytes(st.param_bytes),
            format_bytes(st.peak_memory_bytes),
            f"{min(1.0, b / plan.step_time_s):.0%}" if plan.step_time_s else "",
        )
    _out.print(table)
    _out.print(
        f"bottleneck {format_seconds(plan.bottleneck_s)} per micro-batch, lower bound "
        f"{format_seconds(plan.lower_bound_s)}, gap {plan.gap:.2%}; step {format_seconds(plan.step_time_s)}, "
        f"bubble {plan.bubble_fraction:.1%}; solver {plan.solver.status} on {plan.solver.blocks} blocks; "
        f"planned in {elapsed_s:.2f} s"
    )
    if plan.tp is not None:
        _print_tp(plan.tp)
    base = Table(
        title="against the baselines (same cost model, same schedule)", title_justify="left"
    )
    for col in ("split", "bottleneck", "step time", "autopart speed-up"):
        base.add_column(col, justify="right" if col != "split" else "left")
    base.add_row(
        f"autopart ({plan.solver.status.lower()})",
        format_seconds(plan.bottleneck_s),
        format_seconds(plan.step_time_s),
        "1.00x",
    )
    for label, b in plan.baselines.items():
        ratio = b.step_time_s / plan.step_time_s if plan.step_time_s else 0.0
        base.add_row(
            label.replace("_", " "),
            format_seconds(b.bottleneck_s),
            format_seconds(b.step_time_s),
            f"{ratio:.2f}x",
        )
    _out.print(base)


def _print_tp(tp: Any) -> None:
    from collections import Counter

    from autopart.units import format_bytes

    counts = Counter(tp.sharding.values())
    split = ", ".join(f"{counts[k]} {k}" for k in ("col", "row", "replicate") if counts[k])
    _out.print(
        f"tensor parallel over {tp.degree} ranks: weight matmuls {split or 'none'}; "
        f"{tp.forward_all_reduces_per_block} forward all-reduces per block; "
        f"{format_bytes(tp.comm_bytes_per_step)} sent per rank per step in TP collectives; "
        f"{len(tp.fallbacks)} nodes left unsplit (the degree does not divide a size they need split)"
    )


def _compress(modules: Sequence[str]) -> str:
    """``a.h.0, a.h.1, a.h.2`` -> ``a.h.0-2``."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            prefix, first = run[0]
            last = run[-1][1]
            out.append(f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}")
            run.clear()

    for mod in modules:
        prefix, _, tail = mod.rpartition(".")
        if tail.isdigit() and prefix:
            if run and (run[-1][0] != prefix or run[-1][1] + 1 != int(tail)):
                flush()
            run.append((prefix, int(tail)))
        else:
            flush()
            out.append(mod)
    flush()
    return ", ".join(out)


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
