"""``--mesh auto`` for Llama-7B on 8 H100s, against FSDP=8 and DDP=8 under the same cost model.

    python benchmarks/fsdp_plan_bench.py [--out benchmarks/results/DATE-fsdp-plans.md]

The zoo's Llama-7B shape (on the meta device), a batch of 32 sequences of 2,048 tokens, 8 H100s
with 80 GiB each, AdamW, in two precisions: pure bf16 (weights, gradients and AdamW state in
bf16) and bf16-mixed (float32 masters, gradients and AdamW state, bf16 compute: FSDP2's
MixedPrecisionPolicy, what torchtitan runs). For each, plans ``--mesh auto`` (the search over
``dp x fsdp x pp x tp`` with recomputation), then the fixed meshes ``fsdp=8`` with every layer
recomputed (torchtitan's Llama-3 8B configuration: FSDP over 8 GPUs, full activation
checkpointing), ``fsdp=8`` with recomputation where it pays, and ``dp=8`` (DDP), each with the
schedule search, and reports each plan's predicted step and peak memory, or why nothing fits; and
the mesh search's table of candidates.
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
from autopart.planning.mesh_search import search_mesh
from autopart.planning.planner import plan_graph
from autopart.precision import as_precision, cast_floating, computing_in

SHAPE = {"model": "llama-7b", "batch": 32, "seq": 2048, "devices": 8, "memory": "80GiB"}


def _row(asked: str, plan: Any, plan_s: float) -> dict[str, Any]:
    return {
        "asked": asked,
        "mesh": dict(plan.mesh),
        "schedule": plan.schedule,
        "micro_batches": plan.micro_batches,
        "step_s": plan.step_time_s,
        "recomputed_layers": len({r.name for r in plan.recompute}),
        "bubble": plan.bubble_fraction,
        "peak_bytes": max(s.peak_memory_bytes for s in plan.stages),
        "plan_s": plan_s,
    }


PRECISIONS = {"bf16": ("bfloat16", "model"), "bf16-mixed": ("float32", "bf16-mixed")}
"""Name -> (dtype the model is built in, the request's precision)."""

FIXED = (
    ("fsdp=8 + full recompute (torchtitan)", "fsdp=8", "full"),
    ("fsdp=8", "fsdp=8", "auto"),
    ("dp=8", "dp=8", "auto"),
)


def plan_all(precision: str) -> dict[str, Any]:
    built_in, policy = PRECISIONS[precision]
    loaded = load_model(
        SHAPE["model"],
        device="meta",
        batch=SHAPE["batch"],
        seq=SHAPE["seq"],
        dtype=getattr(torch, built_in),
    )
    dtype = as_precision(policy).compute_dtype
    with computing_in(dtype, loaded.model):  # traced and costed as it computes
        inputs = cast_floating(loaded.example_inputs, dtype)
        gm = autopart.annotate(autopart.trace(loaded.model, inputs))
    common = {"device": "h100", "memory": SHAPE["memory"], "precision": policy}
    print(f"{precision}: searching the meshes ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    search = search_mesh(gm, batch=SHAPE["batch"], devices=SHAPE["devices"], **common)
    rows = [_row("auto", search.plan, time.perf_counter() - start)]
    for asked, mesh, recompute in FIXED:
        print(f"{precision}: planning {asked} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            plan = plan_graph(gm, batch=SHAPE["batch"], mesh=mesh, recompute=recompute, **common)
            rows.append(_row(asked, plan, time.perf_counter() - start))
        except AutopartError as exc:
            rows.append(
                {"asked": asked, "error": exc.reason, "plan_s": time.perf_counter() - start}
            )
    return {
        "precision": precision,
        "rows": rows,
        "reason": search.reason,
        "candidates": [c.to_dict() for c in search.candidates],
    }


def render(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        f"# Llama-7B on 8 H100s: --mesh auto against torchtitan's FSDP=8, FSDP=8 and DDP=8, "
        f"{env['date']}",
        "",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- command: `{record['command']}`",
        f"- shape: {SHAPE['model']}, AdamW, batch {SHAPE['batch']} x {SHAPE['seq']} tokens, "
        f"{SHAPE['devices']} H100, {SHAPE['memory']} per device; every row planned by the same "
        "cost model (predicted, not measured). bf16: weights, gradients and AdamW state in bf16; "
        "bf16-mixed: float32 masters, gradients and AdamW state, bf16 compute (FSDP2's "
        "MixedPrecisionPolicy, torchtitan's default).",
    ]
    for result in record["results"]:
        lines += _render_precision(result)
    return "\n".join(lines) + "\n"


def _render_precision(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    auto = rows[0]
    lines = [
        "",
        f"## {result['precision']}",
        "",
        "| asked | mesh | schedule | micro-batches | recomputed layers | predicted step | vs auto "
        "| bubble | peak memory | planned in |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['asked']} | no plan: {r['error']} | | | | | | | | {r['plan_s']:.1f} s |"
            )
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        lines.append(
            f"| {r['asked']} | {mesh} | {r['schedule']} | {r['micro_batches']} | "
            f"{r.get('recomputed_layers', 0)} | {r['step_s'] * 1e3:.0f} ms | "
            f"{r['step_s'] / auto['step_s'] - 1:+.1%} | {r['bubble']:.1%} | "
            f"{r['peak_bytes'] / 2**30:.1f} GiB | {r['plan_s']:.1f} s |"
        )
    lines += [
        "",
        f"Search: {result['reason']}",
        "",
        "| mesh | status | step | estimate | memory | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in result["candidates"]:
        mesh = ",".join(f"{k}={v}" for k, v in c["mesh"].items())
        step = f"{c['step_time_s'] * 1e3:.0f} ms" if c["step_time_s"] else ""
        est = f"{c['estimate_s'] * 1e3:.0f} ms" if c["estimate_s"] else ""
        mem = f"{c['memory_bytes'] / 2**30:.1f} GiB" if c["memory_bytes"] else ""
        lines.append(f"| {mesh} | {c['status']} | {step} | {est} | {mem} | {c['note']} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_output_args(parser, "fsdp-plans")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    record = {
        "environment": environment(),
        "command": shlex.join(["python", "benchmarks/fsdp_plan_bench.py", *(argv or sys.argv[1:])]),
        "results": [plan_all(precision) for precision in PRECISIONS],
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "fsdp-plans"), record, render)


if __name__ == "__main__":
    main()
