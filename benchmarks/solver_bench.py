"""Solve time and optimality gap of the stage ILP against the baselines (autopart.bench.solver).

    python benchmarks/solver_bench.py [--quick] [--time-limit 10] [--out benchmarks/results/DATE-solver.md]
    python benchmarks/solver_bench.py --from-json benchmarks/results/DATE-solver.json

Runs :func:`autopart.bench.solver.solver_suite` (zoo models at 2, 4, 8 stages; synthetic chain, skip and
branch graphs of 100 to 20,000 nodes at 2 to 16 stages; about 8 minutes on 2 cores) and writes a
markdown result file with the date, machine, versions, the command and one table each for the zoo
and the synthetic graphs, and the rows as JSON beside it (``--from-json`` re-renders the markdown).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from autopart.bench.solver import NO_SOLUTION, format_rows_markdown, solver_suite


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / (1 << 30)
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def _which(rows: Sequence[dict[str, Any]]) -> str:
    cases = ", ".join(f"{r['case']} at {r['stages']} stages" for r in rows)
    return f" ({cases})" if cases else ""


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    solved = [r for r in rows if r["solver_status"] != NO_SOLUTION]
    optimal = sum(r["solver_status"] == "OPTIMAL" for r in rows)
    lines = [
        f"- {len(rows)} cases: {optimal} OPTIMAL, {len(solved) - optimal} FEASIBLE (time limit "
        f"hit, best plan kept), {len(rows) - len(solved)} without a plan within the time limit"
        + _which([r for r in rows if r not in solved])
        + "."
    ]
    if solved:
        worst_gap = max(solved, key=lambda r: r["gap"])
        beats = sum(
            r["bottleneck_s"] <= min(r["equal_layers_s"], r["equal_params_s"]) * (1 + 1e-9)
            for r in solved
        )
        faster = [r for r in solved if r["speedup_vs_chain_dp"] > 1 + 1e-9]
        slower = [r for r in solved if r["speedup_vs_chain_dp"] < 1 - 1e-9]
        lines += [
            f"- Against the chain DP (the best contiguous split, and the ILP's hint): faster in "
            f"{len(faster)}"
            + _which(faster)
            + f", slower in {len(slower)}"
            + _which(slower)
            + f", equal in {len(solved) - len(faster) - len(slower)} of the {len(solved)} "
            "solved cases.",
        ]
        lines += [
            f"- Largest gap to the node-level lower bound: {worst_gap['gap']:.2%} "
            f"({worst_gap['case']}, {worst_gap['stages']} stages).",
            f"- The ILP's plan is at least as fast as both equal-layers and equal-params in "
            f"{beats} of the {len(solved)} solved cases.",
        ]
    slowest = max(rows, key=lambda r: r["solve_s"])
    slowest_bound = max(rows, key=lambda r: r["lower_bound_time_s"])
    lines += [
        f"- Slowest solve (coarsen + hint + ILP): {slowest['solve_s']:.1f} s "
        f"({slowest['case']}, {slowest['stages']} stages); slowest lower bound: "
        f"{slowest_bound['lower_bound_time_s']:.1f} s ({slowest_bound['case']}, "
        f"{slowest_bound['stages']} stages).",
    ]
    return "\n".join(lines) + "\n"


def _nan_to_null(value: Any) -> Any:
    """``value`` with NaN floats as ``None``, so the JSON is standard (``null``)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value


def environment() -> dict[str, str]:
    """Where and with what the suite runs."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_ram_gib():.1f} GiB RAM "
        f"({platform.system()} {platform.release()})",
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"OR-Tools {_version('ortools')}, autopart at {_git_revision()}",
    }


def render(record: dict[str, Any]) -> str:
    """The result file's markdown, from what :func:`main` records (see ``--from-json``)."""
    env, rows = record["environment"], record["rows"]
    zoo = [r for r in rows if r["kind"] == "zoo"]
    synthetic = [r for r in rows if r["kind"] != "zoo"]
    parts = [
        f"# Solver benchmark, {env['date']}\n",
        "## Set-up\n",
        f"- Command: `{record['command']}`",
        f"- Machine: {env['machine']}",
        f"- Versions: {env['versions']}",
        f"- Total wall time of the suite: {record['wall_s'] / 60:.1f} min",
        f"- Cost model: `h100`; CP-SAT single-threaded, seed 0, {record['time_limit_s']:g} s "
        "time limit per solve, hinted with the block-level chain DP; memory not constrained (the "
        "baselines and the bound ignore it too). Zoo models: default batch and sequence length, "
        "meta device, one sample per micro-batch. Synthetic graphs: "
        "`autopart.bench.solver.synthetic_op_graph`, seed 0. The rows are also in the `.json` file "
        "beside this one.",
        "",
        "Columns: *solve s* = coarsening + chain-DP hint + ILP wall time (what a user waits for), "
        "*ILP s* = building and solving the CP-SAT model, *bound s* = computing the node-level "
        "lower bound; *bottleneck* = the slowest stage's forward + backward + receive time per "
        "micro-batch of the ILP's plan; *gap* = bottleneck / lower bound - 1, the bound taken "
        "over every valid partition of the *nodes* (not only of the blocks); *vs X* = X's "
        "bottleneck / the ILP's (above 1: the ILP is faster); NO_SOLUTION: CP-SAT found no plan "
        "within the time limit.",
        "",
        "## Summary\n",
        _summary(rows),
    ]
    if zoo:
        parts += ["## Zoo models\n", format_rows_markdown(zoo)]
    if synthetic:
        parts += ["## Synthetic graphs\n", format_rows_markdown(synthetic)]
    return "\n".join(parts)


# -- pieces every benchmark script shares (runtime_bench.py and tp_bench.py import them) ---------


def add_output_args(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--out`` and ``--from-json`` for a suite whose dated result is ``<today>-<kind>.md``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"result file (default benchmarks/results/<today>-{kind}.md); the rows go to the "
        "same name with .json",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-render the markdown of an earlier run's .json instead of running the suite",
    )


def output_path(args: argparse.Namespace, kind: str) -> Path:
    return args.out or (
        Path(__file__).resolve().parent / "results" / f"{datetime.date.today()}-{kind}.md"
    )


def rerender(out: Path | None, record_json: Path, render: Callable[[dict[str, Any]], str]) -> None:
    """Write the markdown of an earlier run's ``.json`` (``--from-json``)."""
    out = out or record_json.with_suffix(".md")
    out.write_text(render(json.loads(record_json.read_text())))
    print(f"wrote {out}", file=sys.stderr)


def progress(done: int, total: int, label: str) -> None:
    print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)


def write_result(
    out: Path, record: dict[str, Any], render: Callable[[dict[str, Any]], str]
) -> None:
    """The dated result: ``out`` (markdown) and the record beside it as ``.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_nan_to_null(record), indent=1) + "\n")
    out.write_text(render(record))
    print(f"wrote {out} and its .json ({record['wall_s'] / 60:.1f} min)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per ILP solve")
    add_output_args(parser, "solver")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    out = output_path(args, "solver")

    env = environment()
    start = time.perf_counter()
    rows = solver_suite(quick=args.quick, progress=progress, time_limit_s=args.time_limit)
    record = {
        "environment": env,
        "command": shlex.join(["python", "benchmarks/solver_bench.py", *sys.argv[1:]]),
        "wall_s": time.perf_counter() - start,
        "time_limit_s": args.time_limit,
        "rows": rows,
    }
    write_result(out, record, render)


if __name__ == "__main__":
    main()
