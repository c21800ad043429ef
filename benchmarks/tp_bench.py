"""The TP ILP against Megatron-LM's sharding, and the joint mesh search (autopart.bench.tp,
autopart.planning.mesh_search).

    python benchmarks/tp_bench.py [--quick] [--out benchmarks/results/DATE-tp.md]
    python benchmarks/tp_bench.py --from-json benchmarks/results/DATE-tp.json

Runs :func:`autopart.bench.tp.tp_suite` (GPT-2, Llama-7B and Llama-70B shapes in bf16 on the meta
device at TP degrees 2, 4 and 8: TP solve time, forward all-reduces per block, communication volume
and predicted step times beside Megatron's plan), then times the Llama-70B cases of issue 5 (an
explicit ``pp=8,tp=8`` plan and ``--mesh auto --devices 64``, each from loading the model), and
writes a markdown result file with the date, machine, versions and the command, and the rows as
JSON beside it (``--from-json`` re-renders the markdown).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from solver_bench import (
    add_output_args,
    environment,
    output_path,
    progress,
    rerender,
    write_result,
)  # the benchmarks/ folder is sys.path[0]

from autopart.bench.tp import format_tp_rows_markdown, tp_suite
from autopart.units import format_bytes, format_seconds


def llama_70b_cases() -> dict[str, Any]:
    """Wall time (load + trace + annotate + plan, in this process) of the explicit pp=8 x tp=8 plan
    and of the search over 64 devices, and what they found."""
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model
    from autopart.passes.annotate import annotate
    from autopart.planning.mesh_search import search_mesh
    from autopart.planning.planner import plan_graph

    def traced() -> Any:
        loaded = load_model("llama-70b", device="meta", batch=8, seq=2048, dtype=torch.bfloat16)
        return annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))

    start = time.perf_counter()
    gm = traced()
    traced_s = time.perf_counter() - start
    plan = plan_graph(
        gm,
        batch=8,
        mesh="pp=8,tp=8",
        device="h100",
        memory="80GiB",
        name="llama-70b",
    )
    explicit_s = time.perf_counter() - start
    start = time.perf_counter()
    gm = traced()
    search = search_mesh(gm, batch=8, devices=64, device="h100", memory="80GiB", name="llama-70b")
    auto_s = time.perf_counter() - start
    assert plan.tp is not None
    return {
        "trace_s": traced_s,
        "explicit_s": explicit_s,
        "explicit_gap": plan.gap,
        "explicit_step_s": plan.step_time_s,
        "explicit_peak_bytes": max(s.peak_memory_bytes for s in plan.stages),
        "explicit_schedule": f"{plan.schedule} x {plan.micro_batches}",
        "explicit_all_reduces_per_block": plan.tp.forward_all_reduces_per_block,
        "auto_s": auto_s,
        "auto_mesh": dict(search.plan.mesh),
        "auto_reason": search.reason,
        "auto_tp_solve_s": dict(search.tp_solve_s),
        "auto_candidates": [c.to_dict() for c in search.candidates],
    }


def _candidates_markdown(candidates: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| mesh | status | step | estimate | bound | memory / device | schedule | note |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for c in candidates:
        mesh = ",".join(f"{k}={v}" for k, v in c["mesh"].items())
        cells = [
            mesh,
            c["status"],
            format_seconds(c["step_time_s"]) if c["step_time_s"] is not None else "",
            format_seconds(c["estimate_s"]) if c["estimate_s"] is not None else "",
            f"≥ {format_seconds(c['step_bound_s'])}" if c["step_bound_s"] is not None else "",
            format_bytes(c["memory_bytes"]) if c["memory_bytes"] else "",
            f"{c['schedule']} x {c['micro_batches']}" if c["schedule"] else "",
            c["note"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(record: dict[str, Any]) -> str:
    """The result file's markdown, from what :func:`main` records (see ``--from-json``)."""
    env, rows = record["environment"], record["rows"]
    parts = [
        f"# Tensor-parallelism benchmark, {env['date']}\n",
        "## Set-up\n",
        f"- Command: `{record['command']}`",
        f"- Machine: {env['machine']}",
        f"- Versions: {env['versions']}",
        f"- Total wall time: {record['wall_s']:.0f} s",
        "- Cost model `h100` (8 GPUs per node: TP collectives on NVLink, pipeline sends and dp "
        "all-reduces on the network once they leave a node); Adam; bf16 weights and activations; "
        "batch 8 (GPT-2: sequence 1024; Llama: 2048); memory limited to 80 GiB per device. "
        "CP-SAT single-threaded, seed 0, 10 s time limit per solve. The rows are also in the "
        "`.json` file beside this one.",
        "",
        "Columns: *TP solve* = wall time of `solve_tp` (strategies, ILP, CP-SAT; both layer "
        "groupings); *fwd all-reduces / block* = forward all-reduces in the repeated layer with the "
        "most (Megatron's in brackets); *comm* = bytes each rank sends per step in TP collectives, "
        "forward and backward, for the whole model on one TP group; *TP step* = the TP ILP's own "
        "prediction of one rank's compute + collectives per step, whole model (kernel launch "
        "overhead per micro-batch); *plan step* = the predicted step of the pipeline plan of pp "
        "stages, each sharded tp ways, on these TP costs (the pipeline planner scales costs "
        "linearly per micro-batch, so it differs from *TP step*); *—* = no plan fits 80 GiB. "
        "Megatron's plan pins Megatron-LM's col/row assignment of every repeated layer's matmuls "
        "and leaves the rest to the same ILP, so the two are costed alike.",
        "",
        "## TP ILP against Megatron-LM\n",
        format_tp_rows_markdown(rows),
    ]
    big = record.get("llama_70b")
    if big:
        parts += [
            "## Llama-70B on 64 devices\n",
            f"- `pp=8,tp=8` (explicit): {big['explicit_s']:.1f} s from loading the model "
            f"({big['trace_s']:.1f} s of it loading, tracing and annotating), in one process "
            "(the `autopart plan` command adds Python start-up and imports); "
            f"gap {big['explicit_gap']:.2%}, "
            f"predicted step {format_seconds(big['explicit_step_s'])} ({big['explicit_schedule']}), "
            f"peak {format_bytes(big['explicit_peak_bytes'])} per device, "
            f"{big['explicit_all_reduces_per_block']} forward all-reduces per block.",
            f"- `--mesh auto --devices 64`: {big['auto_s']:.1f} s from loading the model; "
            f"TP solves {', '.join(f'{k} {v:.2f} s' for k, v in big['auto_tp_solve_s'].items())}.",
            f"- {big['auto_reason']}",
            "",
            _candidates_markdown(big["auto_candidates"]),
        ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 and Llama-7B only, no 70B")
    add_output_args(parser, "tp")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    out = output_path(args, "tp")

    env = environment()
    start = time.perf_counter()
    rows = tp_suite(quick=args.quick, progress=progress)
    record: dict[str, Any] = {
        "environment": env,
        "command": shlex.join(["python", "benchmarks/tp_bench.py", *sys.argv[1:]]),
        "rows": rows,
    }
    if not args.quick:
        print("[llama-70b] pp=8,tp=8 and --mesh auto --devices 64", file=sys.stderr, flush=True)
        record["llama_70b"] = llama_70b_cases()
    record["wall_s"] = time.perf_counter() - start
    write_result(out, record, render)


if __name__ == "__main__":
    main()
