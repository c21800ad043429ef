"""Fidelity benchmark: the plan's predictions against ``autopart run``'s measurements, dated.

    python benchmarks/fidelity_bench.py [--quick] [--variants analytic,table] [--out PATH]

Runs :func:`autopart.bench.fidelity.fidelity_suite` (the zoo on 2 and 4 gloo ranks, one
``autopart run`` per case and planning variant) and writes ``results/<today>-fidelity.md`` and its
``.json``: the median and worst |predicted / measured - 1| of each figure, every row, and the
issue's table of the code before measured costs, for comparison.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from solver_bench import add_output_args, environment, output_path, progress, write_result

from autopart.bench.fidelity import FIGURES, fidelity_suite, summarize

BEFORE = """Before (issue 13, the code before measured costs; measured / predicted, 6 steps each):

| model, mesh | per-stage forward and backward | step | bubble measured / predicted |
|---|---|---|---|
| mlp, pp=2 | 7.2x - 14.5x | 16.2x | 35% / 16% |
| mlp, pp=4 | 9.6x - 16.8x | 20.3x | 69% / 55% |
| gpt2-tiny, pp=2 | 2.7x - 3.5x | 4.8x | 50% / 21% |
| llama-tiny, pp=2 | 3.4x - 4.6x | 7.6x | 57% / 17% |
| cnn, pp=2 | 1.4x - 2.0x | 2.4x | 34% / 16% |

Median error over all 24 stage figures: 487%; peak memory was predicted but not measured.
"""


def render(record: dict[str, Any]) -> str:
    env, rows = record["environment"], record["rows"]
    summary = summarize(rows)
    head = "| variant | " + " | ".join(FIGURES) + " |"
    lines = [head, "|---" * (len(FIGURES) + 1) + "|"]
    for variant, figures in summary.items():
        cells = [
            f"{figures[f + '_median']:.0%} ({figures[f + '_worst']:.0%}, n={figures[f + '_count']:.0f})"
            if f + "_median" in figures
            else "-"
            for f in FIGURES
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    per_case = ["| case | ranks | variant | schedule, m | step measured / predicted | bubble "
                "measured / predicted | stage forward, backward, memory: predicted / measured |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            per_case.append(f"| {r['case']} | {r['ranks']} | {r['variant']} | did not run: "
                            f"{r['error'].splitlines()[0]} | | | |")  # fmt: skip
            continue
        ratios = ", ".join(
            "/".join(f"{1 + e:.2f}x" for e in r[f"{f}_error"]) for f in ("forward", "backward", "peak_memory")
        )  # fmt: skip
        per_case.append(
            f"| {r['case']} | {r['ranks']} | {r['variant']} | {r['schedule']}, {r['micro_batches']} "
            f"| {r['step_measured'][0] * 1e3:.1f} ms / {r['step_predicted'][0] * 1e3:.1f} ms "
            f"| {r['bubble_measured'][0]:.0%} / {r['bubble_predicted'][0]:.0%} | {ratios} |"
        )
    return "\n".join(
        [
            f"# Fidelity benchmark, {env['date']}\n",
            "## Set-up\n",
            f"- Command: `{record['command']}`",
            f"- Machine: {env['machine']}",
            f"- Versions: {env['versions']}",
            f"- Total wall time: {record['wall_s'] / 60:.1f} min",
            "- Each case is one `autopart run MODEL --mesh pp=N --steps "
            f"{record['steps']}` (gloo, one thread per rank, default batch; the first step measures "
            "memory and is left out of the timings). Variants: `analytic` = the cost model with "
            "the link and the pipeline's per-action cost measured on the group; `table` = the "
            "device table's `cpu` figures. Error = predicted / measured - 1.",
            "",
            "## Summary: |error|, median (worst, count)\n",
            *lines,
            "",
            "## Rows (ratios are predicted / measured, per stage)\n",
            *per_case,
            "",
            "## Before\n",
            BEFORE,
            *([record["notes"]] if record.get("notes") else []),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models on 2 ranks")
    parser.add_argument("--variants", default=None, help="comma-separated planning variants")
    parser.add_argument("--cases", default=None, help="comma-separated zoo models")
    parser.add_argument("--steps", type=int, default=4)
    add_output_args(parser, "fidelity")
    args = parser.parse_args(argv)
    out = output_path(args, "fidelity")
    env, start = environment(), time.perf_counter()
    rows = fidelity_suite(
        quick=args.quick,
        cases=args.cases.split(",") if args.cases else None,
        variants=args.variants.split(",") if args.variants else None,
        steps=args.steps,
        progress=progress,
    )
    record = {
        "environment": env,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "steps": args.steps,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    write_result(out, record, render)


if __name__ == "__main__":
    main()
