"""``autopart bench``: the solver, runtime and TP benchmark suites as tables or JSON."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from rich.table import Table

from autopart.cli.console import bar, is_quiet, out, print_json
from autopart.cli.options import add_format
from autopart.units import format_bytes, format_seconds

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the solver, the runtime or tensor parallelism",
        description="solver: solve time, gap to the lower bound and speed-up over the baselines for zoo "
        "models and synthetic DAGs. runtime: step time of the autopart pipeline against the same model "
        "split by hand into equal layers per stage, on local gloo ranks (one thread each). tp: TP "
        "solve time, all-reduces per block, communication volume and predicted step time of the TP "
        "ILP's sharding against Megatron-LM's, on GPT-2, Llama-7B and Llama-70B shapes at tp 2, 4, 8. "
        "fidelity: predicted against measured (autopart run) per-stage forward, backward and peak "
        "memory and per-step time, bubble and throughput of the zoo on 2 and 4 gloo ranks, per "
        "planning variant; the median and worst error of each figure.",
    )
    p.add_argument("--suite", choices=["solver", "runtime", "tp", "fidelity"], default="solver")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds instead of minutes)")
    add_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    rows = _run_suite(args)
    if args.format == "json":
        if args.suite == "tp":  # no plan that fits: null, not NaN (standard JSON)
            rows = [{k: _none_if_nan(v) for k, v in r.items()} for r in rows]
        print_json(rows)
        return 0
    tables = {
        "solver": _solver_table,
        "runtime": _runtime_table,
        "tp": _tp_table,
        "fidelity": _fidelity_table,
    }
    out.print(tables[args.suite](rows))
    return 0


def _run_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The chosen suite's rows, with a progress bar that names the case being run."""
    suite = _suite(args.suite)
    label = f"{args.suite} bench"
    with bar(is_quiet(args)) as progress:
        task = progress.add_task(label, total=None)

        def report(done: int, total: int, case: str) -> None:
            progress.update(task, completed=done, total=total, description=case)

        rows: list[dict[str, Any]] = suite(quick=args.quick, progress=report)
    return rows


def _suite(name: str) -> Callable[..., list[dict[str, Any]]]:
    """The suite's function, imported on demand (the runtime suite loads the pipelining runtime)."""
    if name == "runtime":
        from autopart.bench.runtime import runtime_suite

        return runtime_suite
    if name == "fidelity":
        from autopart.bench.fidelity import fidelity_suite

        return fidelity_suite
    if name == "tp":
        from autopart.bench.tp import tp_suite

        return tp_suite
    from autopart.bench.solver import solver_suite

    return solver_suite


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...]) -> Table:
    """A table titled ``title`` whose ``columns`` are right-aligned except those in ``left``."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def _solver_table(rows: list[dict[str, Any]]) -> Table:
    table = _table(
        "stage solver: solve time, gap to the lower bound, speed-up over the baselines",
        (
            "case",
            "nodes",
            "blocks",
            "stages",
            "status",
            "solve",
            "gap",
            "vs equal layers",
            "vs equal params",
        ),
        left=("case", "status"),
    )
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
    return table


def _runtime_table(rows: list[dict[str, Any]]) -> Table:
    table = _table(
        "runtime: autopart pipeline vs equal layers per stage by hand (same schedule, "
        "gloo, 1 thread per rank); ratio > 1: autopart is faster",
        (
            "case",
            "ranks",
            "autopart step",
            "hand step",
            "ratio",
            "efficiency autopart / hand",
            "closed form",
            "layers per stage autopart / hand",
        ),
        left=("case",),
    )
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
    return table


def _tp_table(rows: list[dict[str, Any]]) -> Table:
    table = _table(
        "tensor parallelism: the TP ILP against Megatron-LM's sharding (bf16, meta device; "
        "comm: bytes each rank sends per step; plan: pp stages x tp ranks, predicted step)",
        (
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
        ),
        left=("case",),
    )
    for r in rows:
        table.add_row(
            f"{r['case']} (pp={r['pp']})",
            str(r["tp"]),
            f"{r['solve_s']:.2f} s",
            f"{r['all_reduces_per_block']} ({r['megatron_all_reduces_per_block']})",
            format_bytes(r["comm_bytes"]),
            format_bytes(r["megatron_comm_bytes"]),
            _seconds_or_no_fit(r["tp_step_s"]),
            _seconds_or_no_fit(r["megatron_tp_step_s"]),
            "found" if r["matches_megatron"] else "differs",
            _seconds_or_no_fit(r["plan_step_s"]),
            _seconds_or_no_fit(r["megatron_plan_step_s"]),
        )
    return table


def _fidelity_table(rows: list[dict[str, Any]]) -> Table:
    from autopart.bench.fidelity import FIGURES, summarize

    table = _table(
        "fidelity: |predicted / measured - 1| over the stages and steps of the zoo runs, "
        "median (worst)",
        ("variant", *FIGURES),
        left=("variant",),
    )
    for variant, figures in summarize(rows).items():
        cells = [
            f"{figures[f + '_median']:.0%} ({figures[f + '_worst']:.0%})"
            if f + "_median" in figures
            else "-"
            for f in FIGURES
        ]
        table.add_row(variant, *cells)
    failed = [f"{r['case']} pp={r['ranks']} {r['variant']}" for r in rows if "error" in r]
    if failed:
        table.caption = f"did not run: {', '.join(failed)}"
    return table


def _seconds_or_no_fit(value: float) -> str:
    return "no fit" if math.isnan(value) else format_seconds(value)
