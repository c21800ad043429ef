"""The fidelity benchmark: how far the plan's predictions are from what ``autopart run`` measures.

Every case is one ``autopart run`` (:func:`autopart.runtime.launch.run_local`: local gloo ranks,
one thread each, checked against one process) of a zoo model on ``pp`` = 2 or 4 ranks, under one
*variant* of planning (:data:`VARIANTS`: keyword arguments of ``run_local``). For each figure the
relative error is ``predicted / measured - 1`` (0.5: the plan predicted 50% more than was
measured): per stage the forward and backward time per micro-batch and the peak memory of the
stage's rank; per step the step time, the bubble and the throughput. :func:`summarize` gives the
median and the worst ``|error|`` of each figure over the rows.

Variants are data, so a planning option is one more entry: ``analytic`` plans on the cost model
with the link and per-action costs measured on the group; ``table`` on the device table alone;
``profile`` on op times measured by rank 0 (``--profile``), with the measured link.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from autopart.errors import AutopartError

__all__ = ["CASES", "FIGURES", "VARIANTS", "fidelity_suite", "summarize"]

CASES = ("mlp", "gpt2-tiny", "llama-tiny", "cnn")
RANKS = (2, 4)
VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "analytic": {"comm": "measured"},
    "table": {"comm": "table"},
    "profile": {"comm": "measured", "profile": True},
}
STAGE_FIGURES = ("forward", "backward", "peak_memory")
STEP_FIGURES = ("step", "bubble", "throughput")
FIGURES = (*STAGE_FIGURES, *STEP_FIGURES)

Progress = Callable[[int, int, str], None]


def fidelity_suite(
    *,
    quick: bool = False,
    cases: Sequence[str] | None = None,
    ranks: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    steps: int = 4,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per (case, ranks, variant); ``quick``: two models on 2 ranks, ``analytic`` only.
    A case that cannot run is a row with its ``error``, not a failed suite."""
    from autopart.runtime.launch import run_local

    cases = cases or (("mlp", "gpt2-tiny") if quick else CASES)
    ranks = ranks or ((2,) if quick else RANKS)
    names = variants or (("analytic",) if quick else tuple(VARIANTS))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise AutopartError(f"unknown fidelity variant(s) {unknown}; known: {list(VARIANTS)}.")
    grid = [(c, r, v) for v in names for r in ranks for c in cases]
    rows = []
    for done, (case, pp, variant) in enumerate(grid):
        if progress is not None:
            progress(done, len(grid), f"{case} pp={pp} {variant}")
        try:
            report = run_local(case, mesh=f"pp={pp}", steps=steps, **VARIANTS[variant])
        except AutopartError as exc:
            rows.append({"case": case, "ranks": pp, "variant": variant, "error": str(exc)})
            continue
        rows.append({"case": case, "ranks": pp, "variant": variant, **errors_of(report)})
    return rows


def errors_of(report: Any) -> dict[str, Any]:
    """A run report's predicted and measured figures and the relative error of each."""
    pairs = {
        "forward": (report.predicted_stage_forward_s, report.stage_forward_s),
        "backward": (report.predicted_stage_backward_s, report.stage_backward_s),
        "peak_memory": (report.predicted_stage_peak_memory_bytes, report.stage_peak_memory_bytes),
        "step": ((report.predicted_step_time_s,), (report.step_time_s,)),
        "bubble": ((report.predicted_bubble_fraction,), (report.bubble_fraction,)),
        "throughput": ((report.predicted_samples_per_s,), (report.samples_per_s,)),
    }
    row: dict[str, Any] = {
        "schedule": report.schedule,
        "micro_batches": report.micro_batches,
        "matches": report.max_param_rel_diff <= 1e-5,
        "pipeline_action_s": report.pipeline_action_s,
    }
    for figure, (predicted, measured) in pairs.items():
        row[f"{figure}_predicted"] = list(predicted)
        row[f"{figure}_measured"] = list(measured)
        row[f"{figure}_error"] = [_error(p, m) for p, m in zip(predicted, measured)]
    return row


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1 if measured > 0 else float("inf")


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant and figure: the median and the worst ``|error|`` over every stage or step of
    the rows that ran, and how many values they are."""
    out: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        ran = [r for r in rows if r["variant"] == variant and "error" not in r]
        for figure in FIGURES:
            values = [abs(e) for r in ran for e in r[f"{figure}_error"]]
            if values:
                out.setdefault(variant, {})[f"{figure}_median"] = statistics.median(values)
                out[variant][f"{figure}_worst"] = max(values)
                out[variant][f"{figure}_count"] = len(values)
    return out
