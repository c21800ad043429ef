"""A plan as tables on stdout, for ``autopart plan`` and ``autopart emit``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from autopart.cli.console import out
from autopart.planning.plans import format_mesh
from autopart.units import format_bytes, format_seconds

__all__ = ["compress_modules", "print_plan", "schedule_reason", "schedule_table"]


def print_plan(plan: Any, elapsed_s: float) -> None:
    """The stages, the solver's summary, the TP sharding and the baselines of ``plan``."""
    out.print(_stage_table(plan))
    out.print(
        f"bottleneck {format_seconds(plan.bottleneck_s)} per micro-batch, lower bound "
        f"{format_seconds(plan.lower_bound_s)}, gap {plan.gap:.2%}; step {format_seconds(plan.step_time_s)}, "
        f"bubble {plan.bubble_fraction:.1%}; solver {plan.solver.status} on {plan.solver.blocks} blocks; "
        f"planned in {elapsed_s:.2f} s"
    )
    if plan.profile_s is not None:
        out.print(
            f"planned on measured times: the graph's ops were profiled on this machine in "
            f"{plan.profile_s:.2f} s (cached by op signature, dtype and device)"
        )
    if plan.experts:
        out.print(f"experts: {plan.experts}")
    if plan.tp is not None:
        _print_tp(plan.tp)
    if plan.recompute:
        out.print(_recompute_table(plan))
    out.print(_baseline_table(plan))
    if len(plan.schedule_options) > 1:
        out.print(schedule_table(plan))
        out.print(schedule_reason(plan))


def _best_per_layout(plan: Any) -> list[Any]:
    """The best option of each (schedule, stages per rank): the fastest that fits, else the
    leanest; fitting ones first, fastest first."""
    best: dict[tuple[str, int], Any] = {}
    for o in plan.schedule_options:  # fastest fitting first, then leanest
        best.setdefault((o.schedule, o.stages_per_device), o)
    return list(best.values())


def schedule_table(plan: Any) -> Table:
    """The schedules compared: for each schedule and stages per rank, its best micro-batch count
    (the plan's JSON ``schedule_options`` lists every count)."""
    table = Table(
        title="schedules compared (simulated; the best micro-batch count of each; split: the "
        "stage ILP's, or the best contiguous one for a layout the search did not solve, its "
        "estimate too far behind)",
        title_justify="left",
    )
    for col in (
        "schedule",
        "stages / rank",
        "micro-batches",
        "step",
        "vs chosen",
        "peak memory",
        "split",
    ):
        table.add_column(col, justify="left" if col in ("schedule", "split") else "right")
    for o in _best_per_layout(plan):
        chosen = (o.schedule, o.stages_per_device, o.micro_batches) == (
            plan.schedule,
            plan.stages_per_device,
            plan.micro_batches,
        )
        ratio = o.step_time_s / plan.step_time_s - 1 if plan.step_time_s and o.fits else None
        table.add_row(
            o.schedule + (" (chosen)" if chosen else ""),
            str(o.stages_per_device),
            str(o.micro_batches),
            format_seconds(o.step_time_s) if o.fits else "",
            f"{ratio:+.1%}" if ratio is not None else "does not fit",
            format_bytes(o.peak_memory_bytes)
            if o.step_time_s
            else f">= {format_bytes(o.peak_memory_bytes)}",
            "contiguous" if o.estimate else "stage ILP",
        )
    return table


def schedule_reason(plan: Any) -> str:
    """Why the plan's schedule won, in a sentence."""
    rows = _best_per_layout(plan)
    others = [o for o in rows if o.fits and o.schedule != plan.schedule]
    misses = [o for o in rows if not o.fits]
    limit = format_bytes(plan.memory_limit_bytes) if plan.memory_limit_bytes else "the memory"
    text = (
        f"chose {plan.schedule} ({plan.stages_per_device} stage(s) per rank, "
        f"{plan.micro_batches} micro-batches): its predicted step, "
        f"{format_seconds(plan.step_time_s)}, is the fastest that fits {limit} per device"
    )
    if others:
        o = others[0]
        text += (
            f"; the next best schedule, {o.schedule} ({o.stages_per_device} per rank, "
            f"{o.micro_batches} micro-batches), takes {format_seconds(o.step_time_s)} "
            f"({o.step_time_s / plan.step_time_s - 1:+.1%})"
        )
    if misses:
        text += f"; {len(misses)} schedule layout(s) do not fit memory"
    return text + "."


def _stage_table(plan: Any) -> Table:
    title = (
        f"{plan.model}: {plan.num_stages} stages on {plan.device}, mesh {format_mesh(plan.mesh)}, "
        f"{plan.schedule}, {plan.micro_batches} micro-batches"
    )
    if plan.precision != "model":  # e.g. bf16-mixed: float32 masters, bfloat16 compute
        title += f", {plan.precision}"
    if plan.reshard_after_forward:
        title += ", layers resharded after forward"
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


def _recompute_table(plan: Any) -> Table:
    """The layers each stage recomputes and what that costs and saves per micro-batch."""
    table = Table(
        title="recomputed in backward (torch.utils.checkpoint; per micro-batch: the forward "
        "again, the activations not kept)",
        title_justify="left",
    )
    for col in ("stage", "layers", "blocks", "recompute time", "activations saved"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for st in plan.stages:
        mine = [r for r in plan.recompute if r.stage == st.index]
        if not mine:
            continue
        table.add_row(
            str(st.index),
            compress_modules(list(dict.fromkeys(r.name for r in mine if not r.selective)))
            + _selectively(mine),
            str(len(mine)),
            format_seconds(sum(r.recompute_s for r in mine)),
            format_bytes(sum(r.saved_bytes for r in mine)),
        )
    return table


def _selectively(mine: list[Any]) -> str:
    """The layers that recompute only their ops that read no weight, after those in full."""
    some = compress_modules(list(dict.fromkeys(r.name for r in mine if r.selective)))
    whole = any(not r.selective for r in mine)
    return f"{'; ' if whole else ''}selective: {some}" if some else ""


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
