"""``--mesh auto`` for Llama-7B on 8 H100s, against FSDP=8 and DDP=8 under the same cost model.

    python benchmarks/fsdp_plan_bench.py [--out benchmarks/results/DATE-fsdp-plans.md]

The zoo's Llama-7B shape (bf16 weights, gradients and AdamW state, on the meta device), a batch of
32 sequences of 2,048 tokens, 8 H100s with 80 GiB each. Plans ``--mesh auto`` (the search over
``dp x fsdp x pp x tp``), then the fixed meshes ``fsdp=8`` (a torchtitan-style configuration,
without activation recomputation, which autopart does not plan yet) and ``dp=8`` (DDP), each
with the schedule search, and reports each plan's predicted step and peak memory, or why nothing
fits; and the mesh search's table of candidates.
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

SHAPE = {"model": "llama-7b", "batch": 32, "seq": 2048, "devices": 8, "memory": "80GiB"}


def _row(asked: str, plan: Any, plan_s: float) -> dict[str, Any]:
    return {
        "asked": asked,
        "mesh": dict(plan.mesh),
        "schedule": plan.schedule,
        "micro_batches": plan.micro_batches,
        "step_s": plan.step_time_s,
        "bubble": plan.bubble_fraction,
        "peak_bytes": max(s.peak_memory_bytes for s in plan.stages),
        "plan_s": plan_s,
    }


def plan_all() -> dict[str, Any]:
    loaded = load_model(
        SHAPE["model"], device="meta", batch=SHAPE["batch"], seq=SHAPE["seq"], dtype=torch.bfloat16
    )
    gm = autopart.annotate(autopart.trace(loaded.model, loaded.example_inputs))
    common = {"device": "h100", "memory": SHAPE["memory"]}
    print("searching the meshes ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    search = search_mesh(gm, batch=SHAPE["batch"], devices=SHAPE["devices"], **common)
    rows = [_row("auto", search.plan, time.perf_counter() - start)]
    for mesh in ("fsdp=8", "dp=8"):
        print(f"planning {mesh} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows.append(_row(mesh, plan_graph(gm, batch=SHAPE["batch"], mesh=mesh, **common), 0.0))
            rows[-1]["plan_s"] = time.perf_counter() - start
        except AutopartError as exc:
            rows.append({"asked": mesh, "error": exc.reason, "plan_s": time.perf_counter() - start})
    return {
        "rows": rows,
        "reason": search.reason,
        "candidates": [c.to_dict() for c in search.candidates],
    }


def render(record: dict[str, Any]) -> str:
    env, rows = record["environment"], record["results"]["rows"]
    auto = rows[0]
    lines = [
        f"# Llama-7B on 8 H100s: --mesh auto against FSDP=8 and DDP=8, {env['date']}",
        "",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- command: `{record['command']}`",
        f"- shape: {SHAPE['model']} (bf16, AdamW), batch {SHAPE['batch']} x {SHAPE['seq']} "
        f"tokens, {SHAPE['devices']} H100, {SHAPE['memory']} per device; every row planned by "
        "the same cost model (predicted, not measured)",
        "",
        "| asked | mesh | schedule | micro-batches | predicted step | vs auto | bubble | "
        "peak memory | planned in |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['asked']} | no plan: {r['error']} | | | | | | | {r['plan_s']:.1f} s |"
            )
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        lines.append(
            f"| {r['asked']} | {mesh} | {r['schedule']} | {r['micro_batches']} | "
            f"{r['step_s'] * 1e3:.0f} ms | {r['step_s'] / auto['step_s'] - 1:+.1%} | "
            f"{r['bubble']:.1%} | {r['peak_bytes'] / 2**30:.1f} GiB | {r['plan_s']:.1f} s |"
        )
    lines += [
        "",
        f"Search: {record['results']['reason']}",
        "",
        "| mesh | status | step | estimate | memory | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in record["results"]["candidates"]:
        mesh = ",".join(f"{k}={v}" for k, v in c["mesh"].items())
        step = f"{c['step_time_s'] * 1e3:.0f} ms" if c["step_time_s"] else ""
        est = f"{c['estimate_s'] * 1e3:.0f} ms" if c["estimate_s"] else ""
        mem = f"{c['memory_bytes'] / 2**30:.1f} GiB" if c["memory_bytes"] else ""
        lines.append(f"| {mesh} | {c['status']} | {step} | {est} | {mem} | {c['note']} |")
    return "\n".join(lines) + "\n"


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
        "results": plan_all(),
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "fsdp-plans"), record, render)


if __name__ == "__main__":
    main()
