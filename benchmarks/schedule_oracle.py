"""Schedule oracle: the measured step of every pipeline schedule on CPU gloo ranks, and whether
``--schedule auto``'s choice is within 5% of the fastest measured.

    python benchmarks/schedule_oracle.py [--quick] [--steps 6] [--out benchmarks/results/DATE-schedule-oracle.md]

For each model (uniform: eight equal Llama layers, vocabulary 256; heavy head: the zoo's
heavy-head, whose 65,536-way head is ~4x the layers' work) and micro-batch count, on 4 gloo ranks
(pp=4, one thread each):

1. ``autopart.plan`` with ``--schedule auto`` (the ``cpu`` cost model, the count fixed) says which
   schedule and stages per rank it would run, and predicts every option's step;
2. every layout is compiled (``autopart.compile`` with that schedule, stages per rank and count) in
   the same 4 processes: gpipe, 1f1b, interleaved (2 per rank), interleaved-zb (1 and 2 per rank),
   zbv and dualpipev (where the count allows), and auto's choice if it is none of these;
3. the programs take turns, one training step each (SGD, a barrier before and after), over 2
   warm-up and ``--steps`` timed rounds; a layout's step is its median.

The result file lists, per case, each layout's measured and predicted step, the fastest
measured, auto's choice and its measured step against the fastest.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from solver_bench import add_output_args, environment, output_path, rerender, write_result

from autopart.bench.runtime import CASES

MODELS = {"uniform": "llama-8l-v256", "heavy head": "heavy-head"}
LAYOUTS = (
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved", 2),
    ("interleaved-zb", 1),
    ("interleaved-zb", 2),
    ("zbv", 2),
    ("dualpipev", 2),
)
RANKS = 4
WITHIN = 0.05


def _target(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    from autopart.runtime.launch import training_batch

    class _Loaded:
        def __init__(self) -> None:
            self.model, self.example_inputs, self.example_kwargs = model, inputs, {}

    return training_batch(_Loaded())


def _auto_plan(case: Any, m: int) -> Any:
    import autopart

    model, inputs = case.build(case.batch, case.seq, 0)
    return autopart.plan(
        model, inputs, mesh=f"pp={RANKS}", device="cpu", micro_batches=m, schedule="auto"
    )


def _layouts(m: int, auto: tuple[str, int]) -> list[tuple[str, int]]:
    from autopart.planning.schedule import ScheduleError, build_schedule

    layouts = []
    for kind, v in (*LAYOUTS, auto):
        try:
            build_schedule(kind, RANKS, m, v)
        except ScheduleError:
            continue
        if (kind, v) not in layouts:
            layouts.append((kind, v))
    return layouts


def _rank_main(
    rank: int,
    store: str,
    case_name: str,
    m: int,
    layouts: list[tuple[str, int]],
    steps: int,
    out: str,
) -> None:
    import torch.distributed as dist

    import autopart

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=RANKS,
        timeout=timedelta(seconds=900),
    )
    try:
        case = CASES[case_name]
        programs = []
        for kind, v in layouts:
            model, inputs = case.build(case.batch, case.seq, 0)
            target, loss_fn = _target(model, inputs)
            program = autopart.compile(
                model,
                f"pp={RANKS}",
                example_inputs=inputs,
                loss_fn=loss_fn,
                micro_batches=m,
                schedule=kind,
                stages_per_rank=v,
            )
            params = list(program.parameters())
            optimizer = torch.optim.SGD(params, lr=1e-3) if params else None
            programs.append((program, optimizer, inputs, target))
        times: list[list[float]] = [[] for _ in programs]
        for i in range(2 + steps):
            order = list(range(len(programs)))
            order = order[i % len(order) :] + order[: i % len(order)]  # each goes first in turn
            for k in order:
                program, optimizer, inputs, target = programs[k]
                if optimizer is not None:
                    optimizer.zero_grad()
                dist.barrier()
                start = time.perf_counter()
                program.step(*inputs, target=target)
                if optimizer is not None:
                    optimizer.step()
                dist.barrier()
                if i >= 2:
                    times[k].append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def run_case(label: str, m: int, steps: int) -> dict[str, Any]:
    from autopart.runtime.launch import spawn_ranks

    case = CASES[MODELS[label]]
    plan = _auto_plan(case, m)
    auto = (plan.schedule, plan.stages_per_device)
    layouts = _layouts(m, auto)
    predicted = {
        (o.schedule, o.stages_per_device): o.step_time_s
        for o in plan.schedule_options
        if o.micro_batches == m and o.fits
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        args = (str(Path(tmp) / "store"), case.name, m, layouts, steps, str(out))
        spawn_ranks(_rank_main, args, RANKS, timeout_s=3600, what="the oracle ranks")
        times = json.loads(out.read_text())
    measured = {f"{k}/{v}": statistics.median(t) for (k, v), t in zip(layouts, times)}
    best = min(measured, key=lambda key: measured[key])
    auto_key = f"{auto[0]}/{auto[1]}"
    return {
        "model": label,
        "case": case.name,
        "micro_batches": m,
        "measured_s": measured,
        "predicted_s": {f"{k}/{v}": predicted.get((k, v)) for k, v in layouts},
        "best": best,
        "auto": auto_key,
        "auto_vs_best": measured[auto_key] / measured[best] - 1,
    }


def render(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        f"# Schedule oracle, {env['date']}",
        "",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- command: `{record['command']}`",
        f"- {RANKS} gloo ranks (pp={RANKS}), one thread each; {record['steps']} timed steps per "
        "layout after 2 warm-up, the layouts taking turns; median step. Predicted: the `cpu` cost "
        "model's simulated step for that layout and count (blank: not in auto's options).",
        "",
    ]
    for row in record["rows"]:
        lines += [
            f"## {row['model']} ({row['case']}), {row['micro_batches']} micro-batches",
            "",
            "| schedule / stages per rank | measured step | vs fastest | predicted step |",
            "|---|---:|---:|---:|",
        ]
        fastest = row["measured_s"][row["best"]]
        for key, seconds in sorted(row["measured_s"].items(), key=lambda kv: kv[1]):
            pred = row["predicted_s"].get(key)
            mark = " (auto)" if key == row["auto"] else ""
            lines.append(
                f"| {key}{mark} | {seconds * 1e3:.1f} ms | {seconds / fastest - 1:+.1%} | "
                f"{'' if pred is None else f'{pred * 1e3:.2f} ms'} |"
            )
        ok = "within" if row["auto_vs_best"] <= WITHIN else "NOT within"
        lines += [
            "",
            f"auto chose {row['auto']}: {row['auto_vs_best']:+.1%} against the fastest measured "
            f"({row['best']}), {ok} {WITHIN:.0%}.",
            "",
        ]
    if record.get("notes"):
        lines += ["## Notes", "", record["notes"], ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the uniform model at 8 only")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the file")
    add_output_args(parser, "schedule-oracle")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    grid = [("uniform", 8)] if args.quick else [(m, c) for m in MODELS for c in (4, 8)]
    start = time.perf_counter()
    rows = []
    for label, m in grid:
        print(f"{label}, {m} micro-batches ...", file=sys.stderr, flush=True)
        rows.append(run_case(label, m, args.steps))
    record = {
        "environment": environment(),
        "command": shlex.join(["python", "benchmarks/schedule_oracle.py", *(argv or sys.argv[1:])]),
        "steps": args.steps,
        "rows": rows,
        "notes": args.notes.read_text() if args.notes else "",
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "schedule-oracle"), record, render)


if __name__ == "__main__":
    main()
