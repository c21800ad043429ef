"""Which schedule the planner chooses for a large model, against 1F1B and interleaved 1F1B.

    python benchmarks/schedule_plan_bench.py [--out benchmarks/results/DATE-schedule-plans.md]

Plans the zoo's Llama-70B shape (bf16 weights, gradients and Adam state) on pp=8 x tp=8 H100s with
80 GiB each, a batch of 16 sequences of 4,096 tokens (the shape of
``benchmarks/large_plan_bench.py``), three times: ``--schedule auto`` (every schedule, stages per
rank and micro-batch count), ``1f1b`` and ``interleaved``; each plan is the fastest of its
schedule that fits. The result file gives each plan's predicted step, bubble and peak memory,
and auto's table of the schedules it compared.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from solver_bench import add_output_args, environment, output_path, rerender, write_result

import autopart
from autopart.errors import AutopartError
from autopart.models.model_spec import load_model
from autopart.planning.planner import plan_graph

SHAPE = {"model": "llama-70b", "batch": 16, "seq": 4096, "mesh": "pp=8,tp=8", "memory": "80GiB"}


def plan_all() -> list[dict[str, Any]]:
    loaded = load_model(
        SHAPE["model"], device="meta", batch=SHAPE["batch"], seq=SHAPE["seq"], dtype=torch.bfloat16
    )
    gm = autopart.annotate(autopart.trace(loaded.model, loaded.example_inputs))
    rows = []
    for schedule, time_limit_s in (
        ("auto", 10.0),
        ("1f1b", 10.0),
        ("interleaved", 10.0),
        ("interleaved", 60.0),
    ):
        print(f"planning {schedule} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            plan = plan_graph(
                gm,
                batch=SHAPE["batch"],
                mesh=SHAPE["mesh"],
                device="h100",
                memory=SHAPE["memory"],
                schedule=schedule,
                time_limit_s=time_limit_s,
            )
        except AutopartError as exc:
            rows.append(
                {
                    "asked": schedule,
                    "time_limit_s": time_limit_s,
                    "error": exc.reason,
                    "plan_s": time.perf_counter() - start,
                }
            )
            continue
        rows.append(
            {
                "asked": schedule,
                "time_limit_s": time_limit_s,
                "schedule": plan.schedule,
                "stages_per_rank": plan.stages_per_device,
                "micro_batches": plan.micro_batches,
                "step_s": plan.step_time_s,
                "bubble": plan.bubble_fraction,
                "peak_bytes": max(s.peak_memory_bytes for s in plan.stages),
                "solver": plan.solver.status,
                "plan_s": time.perf_counter() - start,
                "options": [
                    [
                        o.schedule,
                        o.stages_per_device,
                        o.micro_batches,
                        o.step_time_s,
                        o.peak_memory_bytes,
                        o.fits,
                        o.estimate,
                    ]
                    for o in plan.schedule_options
                ],
            }
        )
    return rows


def render(record: dict[str, Any]) -> str:
    env, rows = record["environment"], record["rows"]
    one_f_one_b = next(r for r in rows if r["asked"] == "1f1b")["step_s"]
    lines = [
        f"# Schedule choice for Llama-70B, {env['date']}",
        "",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- command: `{record['command']}`",
        f"- shape: {SHAPE['model']} (bf16, Adam), batch {SHAPE['batch']} x {SHAPE['seq']} tokens, "
        f"{SHAPE['mesh']} H100, {SHAPE['memory']} per device",
        "",
        "| asked | chosen | stages / rank | micro-batches | predicted step | vs 1F1B | bubble | "
        "peak memory | solver | planned in |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['asked']} ({r['time_limit_s']:.0f} s a solve) | no plan: {r['error']} "
                f"| | | | | | | | {r['plan_s']:.1f} s |"
            )
            continue
        lines.append(
            f"| {r['asked']} ({r['time_limit_s']:.0f} s a solve) | {r['schedule']} | "
            f"{r['stages_per_rank']} | {r['micro_batches']} | "
            f"{r['step_s'] * 1e3:.0f} ms | {r['step_s'] / one_f_one_b - 1:+.1%} | "
            f"{r['bubble']:.1%} | {r['peak_bytes'] / 2**30:.1f} GiB | {r['solver']} | "
            f"{r['plan_s']:.1f} s |"
        )
    auto = next(r for r in rows if r["asked"] == "auto")
    lines += [
        "",
        "Auto's options, the best micro-batch count of each schedule and stages per rank "
        "(split: `ILP` solved, `contiguous` the chain-DP estimate of a layout not solved):",
        "",
        "| schedule | stages / rank | micro-batches | step | peak memory | fits | split |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    seen = set()
    for kind, v, m, step_s, peak, fits, estimate in auto["options"]:
        if (kind, v) in seen:
            continue
        seen.add((kind, v))
        lines.append(
            f"| {kind} | {v} | {m} | {step_s * 1e3:.0f} ms | {peak / 2**30:.1f} GiB | "
            f"{'yes' if fits else 'no'} | {'contiguous' if estimate else 'ILP'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_output_args(parser, "schedule-plans")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    record = {
        "environment": environment(),
        "command": shlex.join(
            ["python", "benchmarks/schedule_plan_bench.py", *(argv or sys.argv[1:])]
        ),
        "rows": plan_all(),
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "schedule-plans"), record, render)


if __name__ == "__main__":
    main()
