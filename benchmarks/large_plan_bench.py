"""Wall time of planning the two large shapes of issue 10, each as the ``autopart plan`` command a
user types (a fresh process: import, trace on the meta device, annotate, solve):

- a Llama-405B shape searched over 16,384 H100s (``--mesh auto``), which used to die with an
  AssertionError after 35 s and must now end with a plan or a clear error within 60 s;
- Llama-70B at sequence 4096 on ``pp=8,tp=8`` with the default (auto) schedule, which used to
  reject a plan that fits.

    python benchmarks/large_plan_bench.py [--out benchmarks/results/DATE-large-plans.md]

Writes a markdown result file (date, machine, versions, commands, wall times, the last line of
each command's output) and the rows as JSON beside it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from typing import Any

from solver_bench import add_output_args, environment, output_path, rerender, write_result

LLAMA = "hf:llama"
CASES = {
    "llama-405b shape, --mesh auto over 16384 devices": [
        LLAMA,
        "--config",
        "num_hidden_layers=126,hidden_size=16384,intermediate_size=53248,num_attention_heads=128,"
        "num_key_value_heads=8,vocab_size=128256,max_position_embeddings=8192",
        "--batch", "2048", "--seq", "8192", "--mesh", "auto", "--devices", "16384",
        "--device", "h100", "--memory", "80GiB", "--dtype", "bfloat16",
    ],
    "llama-70b shape, seq 4096, pp=8 x tp=8, auto schedule": [
        LLAMA,
        "--config",
        "num_hidden_layers=80,hidden_size=8192,intermediate_size=28672,num_attention_heads=64,"
        "num_key_value_heads=8,vocab_size=128256,max_position_embeddings=4096",
        "--batch", "16", "--seq", "4096", "--mesh", "pp=8,tp=8",
        "--device", "h100", "--memory", "80GiB", "--dtype", "bfloat16",
    ],
}  # fmt: skip


def _run(case: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "autopart.cli.main", "plan", *argv]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - start
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    # the plan's header (mesh, schedule, micro-batches) and the search's verdict, or the error
    summary = [
        ln for ln in lines if ln.startswith(("chose ", "bottleneck ")) or " stages on " in ln
    ]
    if done.returncode != 0:
        summary = done.stderr.strip().splitlines()[-1:]
    return {
        "case": case,
        "command": "autopart plan " + " ".join(argv),
        "wall_s": wall_s,
        "returncode": done.returncode,
        "summary": " / ".join(summary),
        "peak_gib": max(
            (float(x) for x in re.findall(r"│\s*([\d.]+) GiB\s*│\s*\d+%", done.stdout)),
            default=None,
        ),
    }


def render(record: dict[str, Any]) -> str:
    lines = [
        f"# Planning the large shapes of issue 10 ({record['date']})",
        "",
        f"- machine: {record['machine']}",
        f"- versions: {record['versions']}",
        f"- command: `{record['command']}`",
        "",
        "| case | wall (s) | exit | largest stage peak (GiB) | what the command printed |",
        "|---|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['wall_s']:.1f} | {r['returncode']} | {peak} | {r['summary']} |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_output_args(parser, "large-plans")
    args = parser.parse_args()
    if args.from_json:
        rerender(args.out, args.from_json, render)
        return
    start = time.perf_counter()
    rows = [_run(case, argv) for case, argv in CASES.items()]
    record = {
        **environment(),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    write_result(output_path(args, "large-plans"), record, render)


if __name__ == "__main__":
    main()
