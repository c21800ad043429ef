"""``autopart run MODEL``: train on local gloo ranks, check against one process, and time it."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from rich.table import Table

from autopart.cli.console import is_quiet, out, print_json, spinner
from autopart.cli.options import add_format, add_model, add_pipeline, plan_request
from autopart.units import format_seconds

__all__ = ["add_parser", "run"]

_RTOL = 1e-5
"""The run matches one process when every loss and parameter is within this relative difference."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="train on local gloo ranks and check against one process",
        description="Spawn the ranks MESH needs on this machine (gloo), train MODEL on random data, check loss "
        "and parameters against the unpartitioned model, and print throughput and stage times beside the plan.",
    )
    add_model(p)
    add_pipeline(p)
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking each tensor-parallel stage against the unsharded stage before training",
    )
    add_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.models.model_spec import parse_config_overrides
    from autopart.runtime.launch import run_local

    request = plan_request(args)  # a bad mesh or schedule fails before any rank starts
    with spinner(f"training {args.model} on {args.mesh} (gloo)", is_quiet(args)):
        report = run_local(
            args.model,
            mesh=request.mesh,
            micro_batches=request.micro_batches,
            schedule=request.schedule,
            stages_per_rank=request.stages_per_rank,
            steps=args.steps,
            batch=args.batch,
            seq=args.seq,
            config=parse_config_overrides(args.config) if args.config else None,
            verify=args.verify,
        )
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(report.losses, report.reference_losses)
    )
    ok = loss_diff <= _RTOL and report.max_param_rel_diff <= _RTOL
    if args.format == "json":
        print_json({**asdict(report), "max_loss_rel_diff": loss_diff, "matches": ok})
    else:
        _print_report(report, loss_diff, ok)
    return 0 if ok else 1


def _print_report(report: Any, loss_diff: float, ok: bool) -> None:
    out.print(_stage_table(report))
    out.print(
        f"bubble {report.bubble_fraction:.1%} measured (time outside forward/backward work), "
        f"{report.predicted_bubble_fraction:.1%} predicted by the plan's simulation, "
        f"{report.closed_form_bubble_fraction:.1%} closed form (p-1)/(m+p-1)"
    )
    out.print(
        f"losses {', '.join(f'{v:.6f}' for v in report.losses)} (one process: "
        f"{', '.join(f'{v:.6f}' for v in report.reference_losses)}); max relative difference: loss "
        f"{loss_diff:.1e}, parameters {report.max_param_rel_diff:.1e} -> {'MATCH' if ok else 'MISMATCH'}"
    )
    out.print(
        f"step {format_seconds(report.step_time_s)} measured, {format_seconds(report.predicted_step_time_s)} "
        f"predicted; {report.samples_per_s:.1f} samples/s"
    )


def _stage_table(report: Any) -> Table:
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
    times = zip(
        report.stage_forward_s,
        report.predicted_stage_forward_s,
        report.stage_backward_s,
        report.predicted_stage_backward_s,
    )
    for i, row in enumerate(times):
        table.add_row(str(i), *(format_seconds(v) for v in row))
    return table
