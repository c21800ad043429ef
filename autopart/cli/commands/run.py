"""``autopart run MODEL``: train on local gloo ranks, check against one process, and time it."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from rich.table import Table

from autopart.cli.console import is_quiet, out, print_json, spinner
from autopart.cli.options import (
    add_format,
    add_model,
    add_pipeline,
    plan_request,
)
from autopart.units import format_bytes, format_seconds

__all__ = ["add_parser", "run"]

_RTOL = {"model": (1e-5, 1e-5), "bf16-mixed": (2**-7, 2**-5)}
"""The run matches one process (float32) when every loss and every parameter (relative to the
parameter's largest value) is within these relative differences: float32's, or under bf16-mixed
bfloat16's resolution (2**-8 of a value per rounding; gradients gather several through the
layers and the micro-batches they are summed over in bfloat16, and a zero-initialised bias is
all update after a few steps, so parameters get four times the loss's)."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="train on local gloo ranks and check against one process",
        description="Spawn the ranks MESH needs on this machine (gloo), train MODEL on random data, check loss "
        "and parameters against the unpartitioned model, and print throughput and stage times beside the plan.",
    )
    add_model(p)
    add_pipeline(p)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16-mixed"],
        default="float32",
        help="training precision: float32 (default), or bfloat16-mixed (float32 master "
        "parameters, gradients and SGD; bfloat16 compute: FSDP2's MixedPrecisionPolicy), "
        "checked against float32 at bfloat16's resolution (losses within 2**-7, parameters "
        "within 2**-5 of their largest value)",
    )
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    p.add_argument(
        "--comm",
        choices=["measured", "table"],
        default="measured",
        help="plan on the link latency, bandwidth and pipeline cost per action measured on the "
        "ranks' group (cached in $AUTOPART_CACHE_DIR/comm.json; default) or on the device table's",
    )
    p.add_argument(
        "--svg",
        metavar="PATH",
        default=None,
        help="write the predicted and the measured timeline of a step, one above the other",
    )
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
            comm=args.comm,
            profile=request.profile,
            expert_imbalance=request.expert_imbalance,
            recompute=request.recompute,
            precision=request.precision,
            reshard_after_forward=request.reshard_after_forward,
        )
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(report.losses, report.reference_losses)
    )
    loss_rtol, param_rtol = _RTOL[report.precision]
    ok = loss_diff <= loss_rtol and report.max_param_rel_diff <= param_rtol
    if args.svg:
        _write_svg(report, args.svg)
    if args.format == "json":
        print_json({**asdict(report), "max_loss_rel_diff": loss_diff, "matches": ok})
    else:
        _print_report(report, loss_diff, ok)
    return 0 if ok else 1


def _write_svg(report: Any, path: str) -> None:
    from pathlib import Path

    from autopart.planning.gantt import render_comparison
    from autopart.runtime.launch import timeline_from_json

    title = f"{report.model} on {report.mesh}: {report.schedule}, m={report.micro_batches}"
    svg = render_comparison(
        timeline_from_json(report.predicted_timeline),
        timeline_from_json(report.measured_timeline),
        title=title,
    )
    Path(path).write_text(svg, encoding="utf-8")


def _print_report(report: Any, loss_diff: float, ok: bool) -> None:
    out.print(_stage_table(report))
    out.print(_step_table(report))
    out.print(
        f"planned with {report.comm} link costs; the pipeline's own cost per action "
        f"{format_seconds(report.pipeline_action_s)}; closed-form bubble (p-1)/(m+p-1) "
        f"{report.closed_form_bubble_fraction:.1%}"
    )
    out.print(
        f"losses {', '.join(f'{v:.6f}' for v in report.losses)} (one process: "
        f"{', '.join(f'{v:.6f}' for v in report.reference_losses)}); max relative difference: loss "
        f"{loss_diff:.1e}, parameters {report.max_param_rel_diff:.1e} -> {'MATCH' if ok else 'MISMATCH'}"
    )


def _ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.2f}x" if predicted > 0 else "-"


def _stage_table(report: Any) -> Table:
    table = Table(
        title=f"{report.model} on {report.mesh}: {report.schedule}, {report.micro_batches} "
        "micro-batches; per stage, measured / predicted",
        title_justify="left",
    )
    for col in ("stage", "forward / micro-batch", "backward / micro-batch", "peak memory"):
        table.add_column(col, justify="right")
    rows = zip(
        report.stage_forward_s,
        report.predicted_stage_forward_s,
        report.stage_backward_s,
        report.predicted_stage_backward_s,
        report.stage_peak_memory_bytes,
        report.predicted_stage_peak_memory_bytes,
    )
    for i, (fwd, fwd_p, bwd, bwd_p, mem, mem_p) in enumerate(rows):
        table.add_row(
            str(i),
            f"{format_seconds(fwd)} / {format_seconds(fwd_p)} ({_ratio(fwd, fwd_p)})",
            f"{format_seconds(bwd)} / {format_seconds(bwd_p)} ({_ratio(bwd, bwd_p)})",
            f"{format_bytes(mem)} / {format_bytes(mem_p)} ({_ratio(mem, mem_p)})",
        )
    return table


def _step_table(report: Any) -> Table:
    table = Table(title="per step", title_justify="left")
    for col in ("", "measured", "predicted", "measured / predicted"):
        table.add_column(col, justify="left" if not col else "right")
    step, step_p = report.step_time_s, report.predicted_step_time_s
    table.add_row("step time", format_seconds(step), format_seconds(step_p), _ratio(step, step_p))
    bubble, bubble_p = report.bubble_fraction, report.predicted_bubble_fraction
    table.add_row("bubble", f"{bubble:.1%}", f"{bubble_p:.1%}", _ratio(bubble, bubble_p))
    rate, rate_p = report.samples_per_s, report.predicted_samples_per_s
    table.add_row("samples/s", f"{rate:.1f}", f"{rate_p:.1f}", _ratio(rate, rate_p))
    return table
