"""Build, trace and annotate the MODEL a command names, with progress on stderr."""

from __future__ import annotations

import argparse
import time
from typing import Any

from autopart.cli.console import bar, is_quiet, spinner

__all__ = ["load_and_trace"]


def load_and_trace(args: argparse.Namespace, *, device: str = "meta") -> tuple[Any, Any, float]:
    """``(loaded model, annotated GraphModule, seconds taken)`` for the options of
    :func:`autopart.cli.options.add_model` (which declares ``--expert-imbalance``) and
    :func:`~autopart.cli.options.add_tracing`."""
    import torch

    from autopart.capture.tracing import trace
    from autopart.cli.options import DTYPES
    from autopart.models.model_spec import load_model, parse_config_overrides
    from autopart.passes.annotate import annotate
    from autopart.passes.routing import check_imbalance
    from autopart.precision import as_precision, traced_as_computed

    check_imbalance(args.expert_imbalance)  # a bad factor fails before building the model
    overrides = parse_config_overrides(args.config) if args.config else None
    built_in, precision = DTYPES[args.dtype]
    start = time.perf_counter()
    quiet = is_quiet(args)
    with spinner(f"building {args.model}", quiet):
        loaded = load_model(
            args.model,
            batch=args.batch,
            seq=args.seq,
            config=overrides,
            device=device,
            dtype=getattr(torch, built_in),
        )
    # traced and costed as it computes: bf16-mixed casts the parameters and inputs to bfloat16
    dtype = as_precision(precision).compute_dtype
    computed = traced_as_computed(dtype, loaded.model, loaded.example_inputs, loaded.example_kwargs)
    with computed as (inputs, kwargs):
        with spinner(f"tracing {loaded.name} ({args.trace_method})", quiet):
            gm = trace(
                loaded.model,
                inputs,
                kwargs,
                method=args.trace_method,
                repeat="off" if args.no_repeat else "auto",
            )
        with bar(quiet) as progress:
            task = progress.add_task("annotating", total=len(gm.graph.nodes))
            annotate(
                gm,
                progress=lambda done, _total: progress.update(task, completed=done),
                expert_imbalance=args.expert_imbalance,
            )
    return loaded, gm, time.perf_counter() - start
