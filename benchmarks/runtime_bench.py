"""Step time of the autopart pipeline against the same model split by hand (autopart.bench.runtime).

    python benchmarks/runtime_bench.py [--quick] [--steps 10] [--out benchmarks/results/DATE-runtime.md]
    python benchmarks/runtime_bench.py --from-json benchmarks/results/DATE-runtime.json [--notes notes.md]

Runs :func:`autopart.bench.runtime.runtime_suite` (five models on 2 and 4 gloo ranks with one
thread each; autopart's program and the equal-layers pipeline built by hand run in the same
processes, alternating steps; about 6 minutes on 2 cores) and writes a markdown result file
with the date, machine, versions, load average, the command and the tables, and the rows as JSON
beside it. The run waits (up to ``--max-wait`` seconds) for the 1-minute load average to drop to
``--max-load`` first, and records the load it saw before and after. ``--notes`` appends a
hand-written analysis to the markdown (kept in the JSON, so ``--from-json`` re-renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from solver_bench import (
    add_output_args,
    environment,
    output_path,
    progress,
    rerender,
    write_result,
)  # the benchmarks/ folder is sys.path[0]

from autopart.bench.runtime import (
    CASES,
    FULL_CASES,
    FULL_RANKS,
    format_runtime_markdown,
    runtime_suite,
)


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(max_load: float, max_wait_s: float) -> tuple[tuple[float, float, float], float]:
    """Wait until the 1-minute load average is at most ``max_load`` (or ``max_wait_s`` passed);
    the load then, and the seconds waited."""
    start = time.monotonic()
    load = _load()
    while load[0] > max_load and time.monotonic() - start < max_wait_s:
        print(
            f"1-minute load {load[0]:.2f} > {max_load}; waiting ({time.monotonic() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(30)
        load = _load()
    return load, time.monotonic() - start


def _fmt_load(load: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def _gain_share(row: dict[str, Any]) -> str:
    """The measured gain over equal layers as a share of the predicted one (``ratio - 1`` over
    ``predicted_ratio - 1``), or ``n/a`` where nothing was predicted to gain."""
    gain = row["predicted_ratio"] - 1
    return f"{(row['ratio'] - 1) / gain:.0%}" if gain > 1e-9 else "n/a"


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for kind, goal in (("heavy head", "goal >= 1.2x on 2 ranks"), ("uniform", "goal: within 3%")):
        picked = [r for r in rows if r["kind"] == kind]
        if not picked:
            continue
        cells = ", ".join(
            f"{r['case']} on {r['ranks']} ranks {r['ratio']:.3f}x "
            f"(predicted {r['predicted_ratio']:.2f}x, measured / predicted "
            f"{r['ratio'] / r['predicted_ratio']:.0%} of the ratio and "
            f"{_gain_share(r)} of the gain"
            + (f"; CPU-time {r['cpu_ratio']:.3f}x)" if "cpu_ratio" in r else ")")
            for r in picked
        )
        lines.append(f"- {kind.capitalize()} models, hand / autopart step time ({goal}): {cells}.")
    eff = ", ".join(
        f"{r['case']}/{r['ranks']}: {r['autopart_efficiency']:.0%} / {r['hand_efficiency']:.0%} "
        f"(closed form {r['closed_form_efficiency']:.0%})"
        for r in rows
    )
    lines.append(f"- Pipeline efficiency, autopart / hand: {eff}.")
    worst = max(rows, key=lambda r: max(r["autopart_spread"], r["hand_spread"]))
    lines.append(
        f"- Largest spread (interquartile range / median) of the step times: "
        f"{max(worst['autopart_spread'], worst['hand_spread']):.1%} ({worst['case']} on "
        f"{worst['ranks']} ranks)."
    )
    return "\n".join(lines) + "\n"


def render(record: dict[str, Any]) -> str:
    """The result file's markdown, from what :func:`main` records (see ``--from-json``)."""
    env, rows = record["environment"], record["rows"]
    names = list(dict.fromkeys(r["case"] for r in rows))
    cases = [
        f"  - `{n}`: {CASES[n].description}; batch {CASES[n].batch}"
        + (f", sequence {CASES[n].seq}" if CASES[n].seq > 1 else "")
        + f", {CASES[n].micro_batches} micro-batches."
        for n in names
    ]
    parts = [
        f"# Runtime benchmark, {env['date']}\n",
        "## Set-up\n",
        f"- Command: `{record['command']}`",
        f"- Machine: {env['machine']}",
        f"- Versions: {env['versions']}",
        f"- Load average (1 / 5 / 15 min) before the run: {_fmt_load(record['load_before'])} "
        f"(waited {record['waited_s']:.0f} s for it to drop to {record['max_load']}); after: "
        f"{_fmt_load(record['load_after'])}. The machine is shared: other processes ran during "
        "the benchmark.",
        f"- Total wall time of the suite: {record['wall_s'] / 60:.1f} min",
        f"- Each rank count is one `torch.multiprocessing` spawn (gloo, file store, "
        f"`torch.set_num_threads(1)` per rank); every case builds both programs in those "
        f"processes from one seeded model (deep-copied, so both start from the same weights), "
        f"runs {record['warmup']} warm-up steps of each and then {record['steps']} measured steps "
        f"of each, in pairs of alternating order (autopart then hand, hand then autopart, ...). Schedule: `{rows[0]['schedule']}` for both. "
        "A step is forward + loss + backward over all micro-batches (gradients cleared before, "
        "no optimizer), between two barriers; its time is the slowest rank's; the tables give "
        "medians.",
        "- autopart: `autopart.compile(model, 'pp=N', example_inputs=..., loss_fn=..., "
        "micro_batches=m, schedule=...)` "
        + (
            "with `profile=True`: planned on op times measured here, so *predicted* is the "
            "speed-up over equal layers that the measured costs allow (the best split's)."
            if rows[0].get("profile")
            else "with its default cost model (`cpu`)."
        ),
        "- hand: torchtitan / Megatron-LM's default split, equal numbers of layers per stage "
        "(embedding on the first stage, norm and head on the last), each stage an eager module "
        "holding the model's own layers, in `torch.distributed.pipelining.PipelineStage` and "
        "the same schedule class with the same micro-batch count.",
        "- Models:",
        *cases,
        "- The rows are also in the `.json` file beside this one.",
        "",
        "Columns: *ratio* = hand step time / autopart step time (above 1: autopart is faster); "
        "*paired* = the median of the same ratio taken step by step (neighbouring steps, so a "
        "drift of the machine's load cancels); *CPU-time ratio* = the same ratio predicted from "
        "each rank's CPU time (its own thread) in forward, backward and loss, t per micro-batch, "
        "as (m - 1) max t + sum t: what the splits give with a free core per rank and free "
        "communication, unaffected by time spent waiting for a core on this shared host; "
        "*predicted ratio* = the same ratio as autopart's cost model predicts it (the plan's "
        "equal-layers baseline over the plan); *spread* = interquartile range / median of the "
        "measured steps; *efficiency* = sum over ranks of the time spent in forward, backward "
        "and loss / (ranks x step time); *closed form* = m / (m + p - 1), the efficiency of "
        "GPipe and 1F1B on equal stages with free communication; *bound* = the same schedule's "
        "efficiency with the measured (unequal) stage times, (m x sum t) / (p x ((m - 1) max t "
        "+ sum t)) with t the per-micro-batch busy time of a stage: efficiency below the bound "
        "is communication and scheduling, bound below the closed form is imbalance; *layers per "
        "stage* counts the repeated layers with parameters on each stage (a layer that autopart "
        "cuts in two counts on both stages).",
        "",
        "## Summary\n",
        _summary(rows),
        "## Results\n",
        format_runtime_markdown(rows),
    ]
    if record.get("notes"):
        parts += [record["notes"].rstrip() + "\n"]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small models on 2 ranks")
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--ranks", default=None, help=f"comma-separated (default {FULL_RANKS})")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per program")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per program")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="autopart plans on op times measured here (its predicted ratio is then the best "
        "split's over equal layers by the measured costs)",
    )
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for this 1-min load")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait at most")
    add_output_args(parser, "runtime")
    parser.add_argument("--notes", type=Path, default=None, help="markdown to append (analysis)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        record = json.loads(args.from_json.read_text())
        if args.notes is not None:
            record["notes"] = args.notes.read_text()
            args.from_json.write_text(json.dumps(record, indent=1) + "\n")
        rerender(args.out, args.from_json, render)
        return
    out = output_path(args, "runtime")
    cases = args.cases.split(",") if args.cases else (None if args.quick else list(FULL_CASES))
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None

    load_before, waited_s = wait_for_quiet(args.max_load, args.max_wait)
    env = environment()
    start = time.perf_counter()
    rows = runtime_suite(
        quick=args.quick,
        cases=cases,
        ranks=ranks,
        steps=args.steps,
        warmup=args.warmup,
        schedule=args.schedule,
        profile=args.profile,
        progress=progress,
    )
    record = {
        "environment": env,
        "command": shlex.join(["python", "benchmarks/runtime_bench.py", *sys.argv[1:]]),
        "wall_s": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": _load(),
        "waited_s": waited_s,
        "max_load": args.max_load,
        "steps": rows[0]["steps"],
        "warmup": rows[0]["warmup"],
        "notes": args.notes.read_text() if args.notes is not None else "",
        "rows": rows,
    }
    write_result(out, record, render)


if __name__ == "__main__":
    main()
