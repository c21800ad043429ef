"""``autopart emit MODEL --out DIR``: a standalone parallel program runnable with torchrun."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from autopart.cli.console import is_quiet, out, print_json, spinner
from autopart.cli.options import (
    add_device,
    add_format,
    add_model,
    add_pipeline,
    plan_request,
)
from autopart.cli.plan_tables import print_plan

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "emit",
        help="write a standalone parallel program runnable with torchrun",
        description="Plan MODEL for MESH (dp, fsdp, pp and tp) and write a standalone program to --out: "
        "one Python file per pipeline stage (each TP rank's shard of it with tp > 1), a launcher "
        "run.py, the weights, a random batch and the plan. Run it with "
        "`torchrun --nproc-per-node N run.py` (only torch needed).",
    )
    add_model(p)
    add_pipeline(p)
    add_device(p, default="cpu", why=": the gloo runtime's")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16-mixed"],
        default="float32",
        help="training precision: float32 (default) or bfloat16-mixed (float32 masters, bfloat16 "
        "compute: FSDP2's MixedPrecisionPolicy in run.py)",
    )
    p.add_argument("--out", required=True, help="folder to write the program into")
    p.add_argument("--steps", type=int, default=10, help="run.py's default steps (default 10)")
    p.add_argument("--lr", type=float, default=0.01, help="run.py's default SGD lr (0.01)")
    add_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.codegen.emitter import emit_model

    request = plan_request(args)  # bad input fails before tracing
    start = time.perf_counter()
    with spinner(f"planning and writing {args.model} for {args.mesh}", is_quiet(args)):
        plan, written = emit_model(
            args.model,
            Path(args.out),
            request,
            batch=args.batch,
            seq=args.seq,
            config=args.config,
            steps=args.steps,
            lr=args.lr,
        )
    files = sorted(p.name for p in written.iterdir() if p.is_file())
    command = f"torchrun --nproc-per-node {math.prod(plan.mesh.values())} run.py"
    if args.format == "json":
        print_json(
            {"out": str(written), "files": files, "command": command, "plan": plan.to_dict()}
        )
        return 0
    print_plan(plan, time.perf_counter() - start)
    out.print(f"wrote {', '.join(files)} to {written}")
    out.print(f"run it with: cd {written} && {command}")
    return 0
