"""The TP benchmark: the TP ILP against Megatron-LM's hand-written sharding on GPT-2, Llama-7B and
Llama-70B shapes (meta device, bf16) at TP degrees 2, 4 and 8.

Each case traces the model once, then for each degree solves the TP ILP
(:func:`~autopart.solver.tp_ilp.solve_tp`) and Megatron's plan
(:func:`~autopart.solver.tp_ilp.megatron_plan`: Megatron's matmul assignment pinned in every
repeated layer, the rest left to the same ILP, so both are costed alike) at the micro-batch count
the pipeline planner would use, and plans the pipeline on each one's TP-adjusted costs
(:func:`autopart.planning.planner.plan_mesh`, memory limited to the device's). Reported per row: the TP
solve's wall time, forward all-reduces per block, bytes each rank sends per step in TP collectives
(whole model, one TP group), the TP plan's own predicted compute + collective seconds per step, and
the pipeline plan's predicted step time, all beside Megatron's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autopart.errors import AutopartError
from autopart.planning.graph import OpGraph
from autopart.planning.mesh_plan import (
    PlanningSetup,
    TPCostsOf,
    micro_batch_options,
    plan_mesh,
    planning_setup,
)
from autopart.planning.request import PlanRequest
from autopart.solver.tp_costs import tp_costs
from autopart.solver.tp_ilp import TPPlan, megatron_plan, megatron_sharding, solve_tp

__all__ = ["TP_CASES", "TP_DEGREES", "TP_ROW_KEYS", "format_tp_rows_markdown", "tp_suite"]

TP_CASES: tuple[tuple[str, int, int, int], ...] = (
    # model, batch, sequence length, pipeline stages of the plan
    ("gpt2", 8, 1024, 1),
    ("llama-7b", 8, 2048, 1),
    ("llama-70b", 8, 2048, 8),
)
QUICK_CASES = TP_CASES[:2]
TP_DEGREES = (2, 4, 8)

TP_ROW_KEYS: tuple[str, ...] = (
    "case",
    "tp",
    "pp",
    "nodes",
    "solve_s",
    "status",
    "megatron_solve_s",
    "all_reduces_per_block",
    "megatron_all_reduces_per_block",
    "comm_bytes",
    "megatron_comm_bytes",
    "comm_vs_megatron",
    "tp_step_s",
    "megatron_tp_step_s",
    "fallbacks",
    "matches_megatron",
    "plan_step_s",
    "megatron_plan_step_s",
    "plan_gap",
    "plan_peak_bytes",
)
"""Keys of every row, in order.

- ``solve_s`` / ``megatron_solve_s``: wall seconds of ``solve_tp`` / ``megatron_plan`` (strategies,
  ILP data, CP-SAT); ``status``: CP-SAT's for ``solve_tp``.
- ``comm_bytes`` / ``megatron_comm_bytes``: bytes each rank sends per step in TP collectives
  (forward and backward, the whole model on one TP group); ``comm_vs_megatron`` their ratio.
- ``tp_step_s`` / ``megatron_tp_step_s``: the TP plan's predicted compute + collective seconds of
  one step on one rank (the whole model, no pipeline).
- ``fallbacks``: nodes the degree leaves unsplit; ``matches_megatron``: whether the ILP's sharding
  of the repeated layers' matmuls is Megatron's.
- ``plan_step_s`` / ``megatron_plan_step_s``: predicted step time of the pipeline plan (``pp``
  stages, each sharded over ``tp`` ranks) on the ILP's / Megatron's TP costs; NaN where no plan
  fits the device's memory. ``plan_gap``, ``plan_peak_bytes``: the ILP plan's gap to its lower
  bound and peak memory per device.
"""

Progress = Callable[[int, int, str], None]


def tp_suite(
    *,
    quick: bool = False,
    progress: Progress | None = None,
    cases: Sequence[tuple[str, int, int, int]] | None = None,
    degrees: Sequence[int] = TP_DEGREES,
    device: str = "h100",
    time_limit_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Rows (see :data:`TP_ROW_KEYS`) for every case and degree (``quick``: GPT-2 and Llama-7B)."""
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model
    from autopart.passes.annotate import annotate

    chosen = list(cases if cases is not None else (QUICK_CASES if quick else TP_CASES))
    total = len(chosen) * len(degrees)
    say = progress or (lambda _done, _total, _label: None)
    rows: list[dict[str, Any]] = []
    for model, batch, seq, pp in chosen:
        say(len(rows), total, f"tracing {model}")
        loaded = load_model(model, device="meta", batch=batch, seq=seq, dtype=torch.bfloat16)
        gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
        for degree in degrees:
            say(len(rows), total, f"{model}, tp={degree}")
            rows.append(
                tp_case(
                    gm, model, degree, batch=batch, pp=pp, device=device, time_limit_s=time_limit_s
                )
            )
    say(total, total, "done")
    return rows


def tp_case(
    gm: torch.fx.GraphModule,
    case: str,
    degree: int,
    *,
    batch: int,
    pp: int,
    device: str = "h100",
    time_limit_s: float = 10.0,
) -> dict[str, Any]:
    """One row: the TP ILP and Megatron's plan of ``gm`` on ``degree`` ranks, and the pipeline
    plans of ``pp`` stages on each."""
    request = PlanRequest(mesh=f"pp={pp}", device=device, time_limit_s=time_limit_s, name=case)
    setup = planning_setup(request, pp=pp)
    options = micro_batch_options(batch, 1, pp, None, setup.kinds)
    m = max(counts[0] for counts in options.values())
    start = time.perf_counter()
    ours = solve_tp(gm, degree, device=setup.spec, micro_batches=m, time_limit_s=time_limit_s)
    solved = time.perf_counter()
    theirs = megatron_plan(
        gm, degree, device=setup.spec, micro_batches=m, time_limit_s=time_limit_s
    )
    megatron_s = time.perf_counter() - solved
    og = OpGraph.from_graph_module(gm, setup.spec)
    plans = [_plan(gm, og, tp, setup, batch, pp, options, m) for tp in (ours, theirs)]
    expected = megatron_sharding(gm)
    nan = float("nan")
    row: dict[str, Any] = {
        "case": case,
        "tp": degree,
        "pp": pp,
        "nodes": len(gm.graph.nodes),
        "solve_s": solved - start,
        "status": ours.status,
        "megatron_solve_s": megatron_s,
        "all_reduces_per_block": ours.forward_all_reduces_per_block,
        "megatron_all_reduces_per_block": theirs.forward_all_reduces_per_block,
        "comm_bytes": ours.comm_bytes_per_step,
        "megatron_comm_bytes": theirs.comm_bytes_per_step,
        "comm_vs_megatron": (
            ours.comm_bytes_per_step / theirs.comm_bytes_per_step
            if theirs.comm_bytes_per_step
            else nan
        ),
        "tp_step_s": ours.total_s,
        "megatron_tp_step_s": theirs.total_s,
        "fallbacks": len(ours.fallbacks),
        "matches_megatron": all(ours.sharding.get(n) == s for n, s in expected.items()),
        "plan_step_s": plans[0][0],
        "megatron_plan_step_s": plans[1][0],
        "plan_gap": plans[0][1],
        "plan_peak_bytes": plans[0][2],
    }
    assert tuple(row) == TP_ROW_KEYS
    return row


def _plan(
    gm: torch.fx.GraphModule,
    og: OpGraph,
    tp: TPPlan,
    setup: PlanningSetup,
    batch: int,
    pp: int,
    options: dict[str, list[int]],
    m: int,
) -> tuple[float, float, int | None]:
    """(step time, gap, peak bytes per device) of the pipeline plan on ``tp``'s costs; NaN and
    ``None`` where no plan fits memory."""
    costs = TPCostsOf(tp, tp_costs(og, gm, tp, micro_batches=m))
    try:
        plan = plan_mesh(og, costs, setup, batch=batch, dp=1, pp=pp, options=options)
    except AutopartError:
        return math.nan, math.nan, None
    return plan.step_time_s, plan.gap, max(s.peak_memory_bytes for s in plan.stages)


# ---------------------------------------------------------------------------------------------
# output


def format_tp_rows_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (a NaN shows as a dash)."""
    from autopart.units import format_bytes, format_seconds

    head = (
        "| model | tp | pp | nodes | TP solve | status | Megatron solve | fwd all-reduces / block "
        "(Megatron) | comm / rank / step | Megatron comm | comm vs Megatron | TP step (compute + "
        "comm) | Megatron TP step | fallbacks | Megatron's sharding | plan step | Megatron plan "
        "step | plan gap | plan peak / device |"
    )
    lines = [
        head,
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]

    def missing(value: float | None) -> bool:  # NaN here, null in the JSON file
        return value is None or math.isnan(value)

    def secs(value: float | None) -> str:
        return "—" if value is None or missing(value) else format_seconds(value)

    for r in rows:
        cells = [
            r["case"],
            str(r["tp"]),
            str(r["pp"]),
            f"{r['nodes']:,}",
            f"{r['solve_s']:.2f} s",
            r["status"],
            f"{r['megatron_solve_s']:.2f} s",
            f"{r['all_reduces_per_block']} ({r['megatron_all_reduces_per_block']})",
            format_bytes(r["comm_bytes"]),
            format_bytes(r["megatron_comm_bytes"]),
            "—" if missing(r["comm_vs_megatron"]) else f"{r['comm_vs_megatron']:.3f}x",
            secs(r["tp_step_s"]),
            secs(r["megatron_tp_step_s"]),
            str(r["fallbacks"]),
            "found" if r["matches_megatron"] else "differs",
            secs(r["plan_step_s"]),
            secs(r["megatron_plan_step_s"]),
            "—" if missing(r["plan_gap"]) else f"{max(r['plan_gap'], 0.0):.2%}",
            "—" if r["plan_peak_bytes"] is None else format_bytes(r["plan_peak_bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
