"""Device check: per-layer time and one-stage programs on the local device, against the cost models.

    python benchmarks/device_check.py [--device cuda|cpu] [--models mlp,gpt2-tiny] [--out PATH]

For each zoo model, on the local device (``cuda`` on a GPU machine; ``cpu`` is the dry mode that
runs the same code here, briefly):

1. **Per layer**: every node measured forward (:func:`autopart.cost_models.profiling.profile_graph`,
   the measurement ``--profile`` plans on), summed per module (depth 3), beside the forward time
   the ``h100`` and ``h200`` cost models predict (``cpu`` in the dry mode).
2. **One stage**: the model compiled for ``pp=1`` on a one-rank group (NCCL on CUDA, gloo on CPU),
   trained ``--steps`` SGD steps; measured step time (median after the first) and peak memory
   (:func:`autopart.cost_models.peak_memory.measure_peak`: ``torch.cuda.max_memory_allocated`` on
   CUDA) beside the plan's, planned on the ``h100`` model (``cpu`` in the dry mode).

Two stages on one GPU are not run: the planner gives a one-rank pipeline one stage (gpipe, 1f1b)
and NCCL refuses two ranks on one GPU, so that program does not exist yet (docs/decisions.md).
Writes ``results/<today>-device-check-<device>.md`` and its ``.json``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
from solver_bench import add_output_args, environment, output_path, write_result

MODELS = ("mlp", "gpt2-tiny", "llama-tiny", "cnn", "gpt2")


def per_layer(model: str, device: torch.device, specs: Sequence[str]) -> list[dict[str, Any]]:
    """Per module (depth 3): measured forward seconds and each cost model's prediction."""
    from autopart.capture.tracing import trace
    from autopart.cli.inspection import inspect_rows
    from autopart.cost_models.devices import get_device
    from autopart.cost_models.profiling import profile_graph
    from autopart.models.model_spec import load_model
    from autopart.passes.annotate import annotate

    loaded = load_model(model, device=str(device), seed=0)
    gm = annotate(trace(loaded.model, loaded.example_inputs, dict(loaded.example_kwargs)))
    measured = profile_graph(gm, device=device)
    rows = inspect_rows(gm, by="module", depth=3, measured=measured)
    for name in specs:
        predicted = inspect_rows(gm, by="module", depth=3, device=get_device(name))
        for row, p in zip(rows, predicted):
            row[f"{name}_s"] = p["time_s"]
    return [
        {"module": r["module"], "measured_s": r["measured_s"], **{f"{n}_s": r[f"{n}_s"] for n in specs}}
        for r in rows
    ]  # fmt: skip


def one_stage(model: str, device: torch.device, spec: str, steps: int) -> dict[str, Any]:
    """A one-rank ``pp=1`` program trained ``steps`` steps: step time and peak memory, measured
    and planned."""
    import torch.distributed as dist

    import autopart
    from autopart.cost_models.peak_memory import measure_peak
    from autopart.models.model_spec import load_model
    from autopart.runtime.launch import training_batch

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
            timeout=timedelta(seconds=300),
        )  # fmt: skip
        try:
            loaded = load_model(model, device=str(device), seed=0)
            target, loss_fn = training_batch(loaded)
            program = autopart.compile(
                loaded.model, "pp=1", example_inputs=loaded.example_inputs,
                example_kwargs=dict(loaded.example_kwargs), loss_fn=loss_fn, device=spec,
                request=autopart.PlanRequest(optimizer="sgd"),
            )  # fmt: skip
            optimizer = torch.optim.SGD(list(program.parameters()), lr=0.01)
            held = [t for st in program.local_stages for t in st.module.parameters()]
            times = []
            with measure_peak(device, held) as peak:  # the first step; the profiler slows it
                _train_step(program, optimizer, loaded, target)
            for _ in range(steps):
                start = time.perf_counter()
                _train_step(program, optimizer, loaded, target)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            peak_bytes = peak.peak_bytes
            plan = program.plan
            return {
                "step_measured_s": statistics.median(times),
                "step_predicted_s": plan.step_time_s,
                "peak_measured_bytes": peak_bytes,
                "peak_predicted_bytes": plan.stages[0].peak_memory_bytes,
                "micro_batches": plan.micro_batches,
            }
        finally:
            dist.destroy_process_group()


def _train_step(program: Any, optimizer: Any, loaded: Any, target: Any) -> None:
    optimizer.zero_grad()
    program.step(*loaded.example_inputs, target=target.to(loaded.example_inputs[0].device))
    optimizer.step()


def render(record: dict[str, Any]) -> str:
    env, rows = record["environment"], record["rows"]
    specs = record["specs"]
    parts = [
        f"# Device check ({record['device']}), {env['date']}\n",
        f"- Command: `{record['command']}`",
        f"- Machine: {env['machine']}",
        f"- Versions: {env['versions']}",
        f"- Wall time: {record['wall_s'] / 60:.1f} min",
        "",
    ]
    for r in rows:
        parts.append(f"## {r['model']}\n")
        if "error" in r:
            parts += [f"did not run: {r['error']}", ""]
            continue
        s = r["one_stage"]
        parts += [
            f"One stage ({s['micro_batches']} micro-batches): step {s['step_measured_s'] * 1e3:.2f} ms "
            f"measured / {s['step_predicted_s'] * 1e3:.2f} ms predicted; peak memory "
            f"{s['peak_measured_bytes'] / 2**20:.1f} MiB measured / "
            f"{s['peak_predicted_bytes'] / 2**20:.1f} MiB predicted.",
            "",
            "| module | measured forward | " + " | ".join(f"{n} predicted" for n in specs) + " |",
            "|---" * (len(specs) + 2) + "|",
        ]
        for layer in r["layers"]:
            cells = " | ".join(f"{layer[f'{n}_s'] * 1e6:.1f} µs" for n in specs)
            parts.append(f"| {layer['module']} | {layer['measured_s'] * 1e6:.1f} µs | {cells} |")
        parts.append("")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=4)
    add_output_args(parser, "device-check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for the dry mode")
    specs = ["h100", "h200"] if device.type == "cuda" else ["cpu"]
    out = output_path(args, f"device-check-{args.device}")
    env, start = environment(), time.perf_counter()
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        print(f"device check: {model}", file=sys.stderr, flush=True)
        try:
            layers = per_layer(model, device, specs)
            rows.append({"model": model, "layers": layers,
                         "one_stage": one_stage(model, device, specs[0], args.steps)})  # fmt: skip
        except Exception as exc:  # one model's failure is a row, the check goes on
            rows.append({"model": model, "error": f"{type(exc).__name__}: {exc}"})
    record = {
        "environment": env,
        "device": args.device,
        "specs": specs,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    write_result(out, record, render)


if __name__ == "__main__":
    main()
