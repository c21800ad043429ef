"""Activation recomputation in the plan (issue 14 item 2): the Llama-70B shape at 16 x 4096
tokens on 64 H100 80 GB (meshes from pp=8 x tp=8 to dp=8 x tp=8, fewer stages holding more
layers), with the default (auto) schedule search, planned with ``--recompute none``, ``auto``
(the default: recompute only where no split fits otherwise, in full or selectively), ``full``
and ``selective`` (torch's selective checkpointing: weight matmuls kept), each as the
``autopart plan`` command a user types:

    python benchmarks/recompute_plan_bench.py [--out benchmarks/results/DATE-recompute-plans.md]

Writes a markdown result file (date, machine, versions, commands, the chosen schedule, step,
peak memory and the layers each stage recomputes with what they cost) and the rows as JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from large_plan_bench import CASES
from solver_bench import add_output_args, environment, output_path, rerender, write_result

from autopart.planning.plans import Plan

SHAPE = CASES["llama-70b shape, seq 4096, pp=8 x tp=8, auto schedule"]
MESHES = ("pp=8,tp=8", "dp=2,pp=4,tp=8", "dp=4,pp=2,tp=8", "dp=8,tp=8")
RECOMPUTE = ("none", "auto", "full", "selective")
GIB = 1 << 30


def _argv(mesh: str, recompute: str) -> list[str]:
    argv = list(SHAPE)
    argv[argv.index("--mesh") + 1] = mesh
    return [*argv, "--recompute", recompute]


def _run(mesh: str, recompute: str) -> dict[str, Any]:
    argv = _argv(mesh, recompute)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        command = [sys.executable, "-m", "autopart.cli.main", "plan", *argv, "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall_s = time.perf_counter() - start
        plan = Plan.from_json(out.read_text()) if done.returncode == 0 else None
    row: dict[str, Any] = {
        "mesh": mesh,
        "recompute": recompute,
        "command": "autopart plan " + " ".join(argv),
        "wall_s": wall_s,
        "returncode": done.returncode,
    }
    if plan is None:
        row["error"] = " ".join(done.stderr.split())[-400:]  # the end of the error message
        return row
    row.update(
        schedule=plan.schedule,
        micro_batches=plan.micro_batches,
        step_s=plan.step_time_s,
        bubble=plan.bubble_fraction,
        peak_gib=max(s.peak_memory_bytes for s in plan.stages) / GIB,
        recomputed_layers=len(plan.recompute),
        selective_layers=sum(r.selective for r in plan.recompute),
        stages=[
            {
                "stage": s.index,
                "layers": [
                    r.name + (" (selective)" if r.selective else "")
                    for r in plan.recompute
                    if r.stage == s.index
                ],
                "recompute_ms": 1e3 * s.recompute_s,
                "saved_gib": sum(r.saved_bytes for r in plan.recompute if r.stage == s.index) / GIB,
                "peak_gib": s.peak_memory_bytes / GIB,
            }
            for s in plan.stages
        ],
    )
    return row


def render(record: dict[str, Any]) -> str:
    lines = [
        f"# Activation recomputation in the plan: Llama-70B shape, 16 x 4096 tokens, 64 x H100 "
        f"80 GB ({record['date']})",
        "",
        f"- machine: {record['machine']}",
        f"- versions: {record['versions']}",
        f"- command: `{record['command']}`",
        "",
        "| mesh | --recompute | schedule | micro-batches | step | bubble | largest peak (GiB) | "
        "layers recomputed (selectively) | wall (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['mesh']} | {r['recompute']} | no plan: {r['error']} | | | | | | "
                f"{r['wall_s']:.1f} |"
            )
            continue
        lines.append(
            f"| {r['mesh']} | {r['recompute']} | {r['schedule']} | {r['micro_batches']} | "
            f"{r['step_s'] * 1e3:.0f} ms | {r['bubble']:.1%} | {r['peak_gib']:.2f} | "
            f"{r['recomputed_layers']} ({r.get('selective_layers', 0)}) | {r['wall_s']:.1f} |"
        )
    for r in record["rows"]:
        if "error" in r or not r["recomputed_layers"]:
            continue
        lines += [
            "",
            f"## {r['mesh']}, --recompute {r['recompute']}: what each stage recomputes "
            "(per micro-batch)",
            "",
            "| stage | layers recomputed | recompute time | activations not kept | peak (GiB) |",
            "|---:|---|---:|---:|---:|",
        ]
        for s in r["stages"]:
            names = ", ".join(s["layers"]) or "-"
            lines.append(
                f"| {s['stage']} | {names} | {s['recompute_ms']:.2f} ms | "
                f"{s['saved_gib']:.2f} GiB | {s['peak_gib']:.2f} |"
            )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_output_args(parser, "recompute-plans")
    parser.add_argument("--mesh", action="append", help="meshes to plan (default: all four)")
    parser.add_argument(
        "--recompute", action="append", choices=RECOMPUTE, help="choices to plan (default: all)"
    )
    args = parser.parse_args()
    if args.from_json:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    rows = [_run(mesh, r) for mesh in (args.mesh or MESHES) for r in (args.recompute or RECOMPUTE)]
    record = {
        **environment(),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "recompute-plans"), record, render)


if __name__ == "__main__":
    main()
