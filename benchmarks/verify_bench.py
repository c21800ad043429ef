"""What ``autopart.compile(..., verify=True)`` costs: the time spent in the TP self-check
(``autopart.runtime.verify.record_values`` + ``verify_tp_stage``, timed by wrapping them), beside the whole
compile and one training step, on 2 spawned gloo ranks (tp=2).

    python benchmarks/verify_bench.py [--repeats 3] [--out benchmarks/results/DATE-verify.md]

For each model, compile runs ``--repeats`` times with ``verify=True``; the result file holds the
medians (rank 0's) of the compile, of the check inside it, and of one training step (4 micro-batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from solver_bench import add_output_args, environment, output_path, rerender, write_result

MODELS = {
    "hf:gpt2": "n_layer=4,n_embd=256,n_head=8,vocab_size=4096,n_positions=128,"
    "resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
    "hf:llama": "num_hidden_layers=4,hidden_size=256,intermediate_size=512,num_attention_heads=8,"
    "num_key_value_heads=4,vocab_size=4096",
}


def _rank(rank: int, store: str, repeats: int, out: str) -> None:
    import dataclasses

    import autopart
    import autopart.runtime.verify as verify_module
    from autopart.cost_models import get_device
    from autopart.models.model_spec import load_model, parse_config_overrides
    from autopart.runtime.launch import training_batch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=600),
    )
    # links nearly free, so the small models really shard (as in the TP tests)
    fast = dataclasses.replace(
        get_device("h100"), name="fast-link", link_bandwidth_bytes_per_s=1e18, link_latency_s=1e-15
    )
    checking: list[float] = []
    for fn_name in ("record_values", "verify_tp_stage"):
        setattr(verify_module, fn_name, _timed(getattr(verify_module, fn_name), checking))
    rows = []
    for name, config in MODELS.items():
        loaded = load_model(
            name, device="cpu", batch=8, seq=64, config=parse_config_overrides(config), seed=0
        )
        target, loss_fn = training_batch(loaded)
        compile_s, verify_s, step_s = [], [], []
        for _ in range(repeats):
            checking.clear()
            dist.barrier()
            start = time.perf_counter()
            program = autopart.compile(
                loaded.model,
                "tp=2",
                example_inputs=loaded.example_inputs,
                example_kwargs=dict(loaded.example_kwargs),
                loss_fn=loss_fn,
                micro_batches=4,
                device=fast,
                verify=True,
            )
            dist.barrier()
            compile_s.append(time.perf_counter() - start)
            verify_s.append(sum(checking))
            start = time.perf_counter()
            program.step(*loaded.example_inputs, target=target, **dict(loaded.example_kwargs))
            dist.barrier()
            step_s.append(time.perf_counter() - start)
        med = statistics.median
        rows.append(
            {
                "model": name,
                "config": config,
                "compile_s": med(compile_s),
                "verify_s": med(verify_s),
                "step_s": med(step_s),
                "verify_per_step": med(verify_s) / med(step_s),
                "verify_share_of_compile": med(verify_s) / med(compile_s),
            }
        )
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _timed(fn: Any, into: list[float]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    return timed


def render(record: dict[str, Any]) -> str:
    lines = [
        f"# verify=True cost ({record['date']})",
        "",
        f"- machine: {record['machine']}",
        f"- versions: {record['versions']}",
        f"- command: `{record['command']}`",
        "",
        "| model | compile with verify (s) | of which verify (s) | share | one step (s) "
        "| verify / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['model']} | {r['compile_s']:.2f} | {r['verify_s']:.3f} | "
            f"{r['verify_share_of_compile']:.0%} | {r['step_s']:.3f} | {r['verify_per_step']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_output_args(parser, "verify")
    args = parser.parse_args()
    if args.from_json:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.pt")
        mp.start_processes(
            _rank,
            args=(str(Path(tmp) / "store"), args.repeats, out),
            nprocs=2,
            start_method="spawn",
        )
        rows = torch.load(out)
    record = {
        **environment(),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "verify"), record, render)


if __name__ == "__main__":
    main()
