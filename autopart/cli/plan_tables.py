"""A plan as tables on stdout, for ``autopart plan`` and ``autopart emit``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from autopart.cli.console import out
from autopart.planning.plans import format_mesh
from autopart.units import format_bytes, format_seconds

__all__ = ["compress_modules", "print_plan"]


def print_plan(plan: Any, elapsed_s: float) -> None:
    """The stages, the solver's summary, the TP sharding and the baselines of ``plan``."""
    out.print(_stage_table(plan))
    out.print(
        f"bottleneck {format_seconds(plan.bottleneck_s)} per micro-batch, lower bound "
        f"{format_seconds(plan.lower_bound_s)}, gap {plan.gap:.2%}; step {format_seconds(plan.step_time_s)}, "
        f"bubble {plan.bubble_fraction:.1%}; solver {plan.solver.status} on {plan.solver.blocks} blocks; "
        f"planned in {elapsed_s:.2f} s"
    )
    if plan.tp is not None:
        _print_tp(plan.tp)
    out.print(_baseline_table(plan))


def _stage_table(plan: Any) -> Table:
    title = (
        f"{plan.model}: {plan.num_stages} stages on {plan.device}, mesh {format_mesh(plan.mesh)}, "
        f"{plan.schedule}, {plan.micro_batches} micro-batches"
    )
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("stage", "right"),
        ("modules", "left"),
        ("nodes", "right"),
        ("fwd+bwd / micro-batch", "right"),
        ("params", "right"),
        ("peak memory", "right"),
        ("utilisation", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for st in plan.stages:
        busy_s = st.predicted_s * plan.micro_batches
        table.add_row(
            str(st.index),
            compress_modules(st.modules),
            str(st.node_count),
            format_seconds(st.predicted_s),
            format_bytes(st.param_bytes),
            format_bytes(st.peak_memory_bytes),
            f"{min(1.0, busy_s / plan.step_time_s):.0%}" if plan.step_time_s else "",
        )
    return table


def _baseline_table(plan: Any) -> Table:
    table = Table(
        title="against the baselines (same cost model, same schedule)", title_justify="left"
    )
    for col in ("split", "bottleneck", "step time", "autopart speed-up"):
        table.add_column(col, justify="right" if col != "split" else "left")
    table.add_row(
        f"autopart ({plan.solver.status.lower()})",
        format_seconds(plan.bottleneck_s),
        format_seconds(plan.step_time_s),
        "1.00x",
    )
    for label, b in plan.baselines.items():
        ratio = b.step_time_s / plan.step_time_s if plan.step_time_s else 0.0
        table.add_row(
            label.replace("_", " "),
            format_seconds(b.bottleneck_s),
            format_seconds(b.step_time_s),
            f"{ratio:.2f}x",
        )
    return table


def _print_tp(tp: Any) -> None:
    counts = Counter(tp.sharding.values())
    split = ", ".join(f"{counts[k]} {k}" for k in ("col", "row", "replicate") if counts[k])
    out.print(
        f"tensor parallel over {tp.degree} ranks: weight matmuls {split or 'none'}; "
        f"{tp.forward_all_reduces_per_block} forward all-reduces per block; "
        f"{format_bytes(tp.comm_bytes_per_step)} sent per rank per step in TP collectives; "
        f"{len(tp.fallbacks)} nodes left unsplit (the degree does not divide a size they need split)"
    )


def compress_modules(modules: Sequence[str]) -> str:
    """``a.h.0, a.h.1, a.h.2`` -> ``a.h.0-2``."""
    out_parts: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            prefix, first = run[0]
            last = run[-1][1]
            out_parts.append(f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}")
            run.clear()

    for mod in modules:
        prefix, _, tail = mod.rpartition(".")
        if tail.isdigit() and prefix:
            if run and (run[-1][0] != prefix or run[-1][1] + 1 != int(tail)):
                flush()
            run.append((prefix, int(tail)))
        else:
            flush()
            out_parts.append(mod)
    flush()
    return ", ".join(out_parts)
