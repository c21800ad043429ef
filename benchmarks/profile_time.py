"""Profiling time of a Llama-7B-shaped model on this machine: every distinct op signature of the
graph measured forward and backward (repeated layers share signatures, so one layer of each kind
is measured), as ``--profile`` does. Usage: python benchmarks/profile_time.py [--seq 128]."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

import autopart
from autopart.cost_models.profiling import ProfileCache, profile_graph
from autopart.passes.annotate import node_cost, op_signature


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-bytes", type=int, default=1 << 30)
    args = ap.parse_args()
    loaded = autopart.load_model(args.model, device="meta", batch=args.batch, seq=args.seq)
    start = time.perf_counter()
    gm = autopart.annotate(
        autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    )
    trace_s = time.perf_counter() - start
    computing = [n for n in gm.graph.nodes if n.op.startswith("call_") and not node_cost(n).is_view]
    signatures = {op_signature(n) for n in computing}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        measured = profile_graph(gm, cache=ProfileCache(f"{tmp}/p.json"), max_bytes=args.max_bytes)
        profile_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "seq": args.seq,
                "nodes": len(computing),
                "signatures": len(signatures),
                "measured_nodes": len(measured),
                "trace_annotate_s": round(trace_s, 2),
                "profile_s": round(profile_s, 2),
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
