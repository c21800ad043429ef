"""Planning a DeepSeek-V3-shaped mixture of experts on ``pp=16``: wall time of each step and the
plan's per-stage memory (issue 16).

The model is ``transformers``' ``DeepseekV3ForCausalLM`` at DeepSeek-V3's published shape (61
layers, the first 3 dense; hidden 7168; 256 routed experts of width 2048, top-8 in 8 groups of
which 4 are kept, one shared expert; MLA with q_lora_rank 1536 and kv_lora_rank 512; vocab 129,280)
built on the meta device (no weights allocated), in bfloat16. Its experts are stacked 3-D
parameters multiplied by grouped matmuls, so the graph holds a few nodes per MoE layer whatever the
expert count; the experts are costed for all ``T * k`` routed rows.

    python benchmarks/moe_plan_bench.py [--out benchmarks/results/DATE-moe-plan.md] [--memory 4TiB]

Writes a markdown result file (date, machine, versions, the steps' wall times, each stage's layers
and peak memory) and the record as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from solver_bench import add_output_args, environment, output_path, rerender, write_result

DEEPSEEK_V3 = (
    "num_hidden_layers=61,hidden_size=7168,intermediate_size=18432,moe_intermediate_size=2048,"
    "n_routed_experts=256,num_experts_per_tok=8,n_group=8,topk_group=4,n_shared_experts=1,"
    "first_k_dense_replace=3,num_attention_heads=128,num_key_value_heads=128,q_lora_rank=1536,"
    "kv_lora_rank=512,qk_rope_head_dim=64,qk_nope_head_dim=128,v_head_dim=128,vocab_size=129280,"
    "max_position_embeddings=4096"
)


def plan_deepseek(batch: int, seq: int, memory: str, device: str) -> dict[str, Any]:
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate
    from autopart.passes.routing import routing_of
    from autopart.planning.planner import plan_graph
    from autopart.units import format_bytes

    times: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(
        "hf:deepseek_v3",
        device="meta",
        batch=batch,
        seq=seq,
        dtype=torch.bfloat16,
        config=parse_config_overrides(DEEPSEEK_V3),
    )
    times["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    gm = trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    times["trace_s"] = time.perf_counter() - start
    start = time.perf_counter()
    annotate(gm)
    times["annotate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = plan_graph(gm, mesh="pp=16", device=device, memory=memory, batch=batch)
    times["plan_s"] = time.perf_counter() - start
    routing = routing_of(gm)
    return {
        **times,
        "params": gm.meta["autopart_totals"].params,
        "nodes": len(gm.graph.nodes),
        "experts": routing.describe() if routing is not None else "",
        "schedule": str(plan.schedule),
        "micro_batches": plan.micro_batches,
        "bottleneck_s": plan.bottleneck_s,
        "gap": plan.gap,
        "stages": [
            {
                "index": s.index,
                "modules": f"{s.modules[0]} .. {s.modules[-1]}" if s.modules else "",
                "param_bytes": s.param_bytes,
                "peak_memory_bytes": s.peak_memory_bytes,
                "peak": format_bytes(s.peak_memory_bytes),
            }
            for s in plan.stages
        ],
    }


def render(record: dict[str, Any]) -> str:
    r = record["result"]
    lines = [
        f"# Planning a DeepSeek-V3-shaped MoE on pp=16 ({record['date']})",
        "",
        f"- machine: {record['machine']}",
        f"- versions: {record['versions']}",
        f"- command: `{record['command']}`",
        f"- model: {r['params']:,} parameters, {r['nodes']:,} graph nodes; experts: {r['experts']}",
        f"- wall: build {r['build_s']:.1f} s, trace {r['trace_s']:.1f} s, annotate "
        f"{r['annotate_s']:.1f} s, plan (stage ILP, schedules) {r['plan_s']:.1f} s",
        f"- plan: {r['schedule']}, {r['micro_batches']} micro-batches, bottleneck "
        f"{r['bottleneck_s'] * 1e3:.1f} ms, gap {r['gap']:.2%}",
        "",
        "| stage | modules | parameters (GiB) | peak memory |",
        "|---:|---|---:|---:|",
    ]
    for s in r["stages"]:
        lines.append(
            f"| {s['index']} | {s['modules']} | {s['param_bytes'] / 2**30:.1f} | {s['peak']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_output_args(parser, "moe-plan")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--memory", default="4TiB", help="per device (no EP: see the note)")
    parser.add_argument("--device", default="h200")
    args = parser.parse_args()
    if args.from_json:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    result = plan_deepseek(args.batch, args.seq, args.memory, args.device)
    record = {
        **environment(),
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - start,
        "result": result,
    }
    write_result(output_path(args, "moe-plan"), record, render)


if __name__ == "__main__":
    main()
