"""SVG Gantt chart of a simulated pipeline step: one row per device, one bar per action.

Forward bars are blue, backward bars orange (input gradients alone too), weight gradients run apart
green, darker for earlier micro-batches; the grey row behind
the bars is the device's idle time. Output is deterministic: coordinates are rounded and elements
are written in the timeline's order, so the same timeline gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from autopart.planning.schedule import ActionKind, Event, ScheduleError, Timeline
from autopart.units import format_seconds

__all__ = ["render_comparison", "render_svg"]

_PLOT_PX, _ROW_PX, _BAR_PX, _CHAR_PX = 960, 30, 22, 7
_TOP_PX, _RIGHT_PX = 40, 80
_HUE = {
    ActionKind.FORWARD: 212,
    ActionKind.BACKWARD: 28,
    ActionKind.BACKWARD_INPUT: 28,
    ActionKind.BACKWARD_WEIGHT: 130,
}
_VERB = {
    ActionKind.FORWARD: "forward",
    ActionKind.BACKWARD: "backward",
    ActionKind.BACKWARD_INPUT: "input gradients",
    ActionKind.BACKWARD_WEIGHT: "weight gradients",
}
_IDLE = "#e4e4e4"


def _num(x: float) -> str:
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _lightness(micro_batch: int, micro_batches: int) -> int:
    return 34 + round(36 * micro_batch / max(1, micro_batches - 1))


def _fill(kind: ActionKind, lightness: int) -> str:
    return f"hsl({_HUE[kind]},70%,{lightness}%)"


def _ticks(step_s: float) -> tuple[list[float], float, str]:
    """Tick times at a 1-2-5 step giving about eight ticks, and the unit to label them in."""
    if step_s <= 0:
        return [0.0], 1.0, "s"
    raw = step_s / 8
    magnitude = 10 ** math.floor(math.log10(raw))
    tick = next(k * magnitude for k in (1, 2, 5, 10) if k * magnitude >= raw * (1 - 1e-9))
    unit, scale = ("s", 1.0) if step_s >= 1 else ("ms", 1e-3) if step_s >= 1e-3 else ("µs", 1e-6)
    return [k * tick for k in range(int(step_s / tick + 1e-9) + 1)], scale, unit


def _row_labels(timeline: Timeline, stage_names: Sequence[str] | None) -> list[str]:
    stages = [
        sorted({e.action.stage for e in timeline.events if e.device == d})
        for d in range(timeline.num_devices)
    ]
    if stage_names is None:
        return [f"device {d}" for d in range(timeline.num_devices)]
    if len(stage_names) != len(timeline.max_in_flight):
        raise ScheduleError(
            f"got {len(stage_names)} stage_names for {len(timeline.max_in_flight)} stages: "
            "give one name per stage, in stage order"
        )
    return [f"device {d}: " + ", ".join(stage_names[s] for s in ss) for d, ss in enumerate(stages)]


def _bar(event: Event, x0: float, px_per_s: float, y: float, m: int, multi: bool) -> str:
    action = event.action
    x, width = x0 + event.start_s * px_per_s, (event.end_s - event.start_s) * px_per_s
    light = _lightness(action.micro_batch, m)
    verb = _VERB[action.kind]
    tip = (
        f"{action}: stage {action.stage} {verb} of micro-batch {action.micro_batch}, "
        f"{format_seconds(event.start_s)} to {format_seconds(event.end_s)}"
    )
    out = (
        f'<rect class="action" x="{_num(x)}" y="{_num(y)}" width="{_num(width)}" '
        f'height="{_BAR_PX}" fill="{_fill(action.kind, light)}" stroke="white" '
        f'stroke-width="0.5"><title>{escape(tip)}</title></rect>'
    )
    label = str(action) if multi else f"{action.kind}{action.micro_batch}"
    if width >= _CHAR_PX * len(label) + 4:
        colour = "white" if light < 55 else "black"
        out += (
            f'<text x="{_num(x + width / 2)}" y="{_num(y + _BAR_PX / 2 + 4)}" '
            f'text-anchor="middle" fill="{colour}">{label}</text>'
        )
    return out


def render_svg(
    timeline: Timeline,
    *,
    title: str = "",
    stage_names: Sequence[str] | None = None,
    axis_s: float | None = None,
) -> str:
    """A self-contained SVG document (UTF-8 text) drawing ``timeline``; the time axis spans
    ``axis_s`` (default: the step), so several charts can share one scale."""
    labels = _row_labels(timeline, stage_names)
    p, step_s = timeline.num_devices, timeline.step_time_s
    span_s = max(axis_s or 0.0, step_s)
    x0 = max(len(label) for label in labels) * _CHAR_PX + 16
    px_per_s = _PLOT_PX / span_s if span_s > 0 else 0.0
    m = 1 + max((e.action.micro_batch for e in timeline.events), default=0)
    multi = any(
        len({e.action.stage for e in timeline.events if e.device == d}) > 1 for d in range(p)
    )
    axis_y = _TOP_PX + p * _ROW_PX + 4
    width, height = x0 + _PLOT_PX + _RIGHT_PX, axis_y + 64
    heading = f"{title} · " if title else ""
    heading += f"step {format_seconds(step_s)} · bubble {timeline.bubble_fraction:.1%}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(heading)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{x0}" y="22" font-size="14" font-weight="bold">{escape(heading)}</text>',
    ]
    for d, label in enumerate(labels):
        y = _TOP_PX + d * _ROW_PX
        idle = timeline.idle_s[d] / step_s if step_s > 0 else 0.0
        parts += [
            f'<text x="{x0 - 8}" y="{y + _BAR_PX / 2 + 4:.0f}" text-anchor="end">'
            f"{escape(label)}</text>",
            f'<rect class="idle" x="{x0}" y="{y}" width="{_num(step_s * px_per_s)}" '
            f'height="{_BAR_PX}" '
            f'fill="{_IDLE}"><title>device {d} idle {format_seconds(timeline.idle_s[d])}'
            "</title></rect>",
            f'<text x="{x0 + _PLOT_PX + 8}" y="{y + _BAR_PX / 2 + 4:.0f}">idle {idle:.0%}</text>',
        ]
    parts += [
        _bar(e, x0, px_per_s, _TOP_PX + e.device * _ROW_PX, m, multi) for e in timeline.events
    ]
    ticks, scale, unit = _ticks(span_s)
    parts.append(
        f'<line x1="{x0}" y1="{axis_y}" x2="{x0 + _PLOT_PX}" y2="{axis_y}" stroke="black"/>'
    )
    for t in ticks:
        tick_x = _num(x0 + t * px_per_s)
        parts += [
            f'<line x1="{tick_x}" y1="{axis_y}" x2="{tick_x}" y2="{axis_y + 4}" stroke="black"/>',
            f'<text x="{tick_x}" y="{axis_y + 16}" text-anchor="middle">'
            f"{round(t / scale, 6):g} {unit}</text>",
        ]
    legend_y = axis_y + 34
    for i, (name, fill) in enumerate(
        (
            ("forward", _fill(ActionKind.FORWARD, 45)),
            ("backward", _fill(ActionKind.BACKWARD, 45)),
            ("idle", _IDLE),
        )
    ):
        x = x0 + i * 110
        parts += [
            f'<rect class="legend" x="{x}" y="{legend_y}" width="14" height="14" '
            f"fill={quoteattr(fill)}/>",
            f'<text x="{x + 20}" y="{legend_y + 11}">{name}</text>',
        ]
    example = "2F3 = stage 2's forward" if multi else "F3 = forward"
    parts.append(
        f'<text x="{x0 + 3 * 110}" y="{legend_y + 11}" fill="#555">{example} of micro-batch 3; '
        "darker = earlier micro-batch</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render_comparison(
    predicted: Timeline,
    measured: Timeline,
    *,
    title: str = "",
    stage_names: Sequence[str] | None = None,
) -> str:
    """One SVG document: the predicted timeline above the measured one, on one time scale."""
    axis_s = max(predicted.step_time_s, measured.step_time_s)
    charts = [
        render_svg(tl, title=f"{title} {what}".strip(), stage_names=stage_names, axis_s=axis_s)
        for what, tl in (("predicted", predicted), ("measured", measured))
    ]
    sizes = [_size(chart) for chart in charts]
    width, height = max(w for w, _ in sizes), sum(h for _, h in sizes)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    y = 0
    for chart, (_, h) in zip(charts, sizes):
        parts.append(chart.replace("<svg ", f'<svg y="{y}" ', 1).rstrip("\n"))
        y += h
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _size(chart: str) -> tuple[int, int]:
    """The width and height :func:`render_svg` wrote on its root element."""
    head = chart.split(">", 1)[0]
    width = head.split('width="', 1)[1].split('"', 1)[0]
    height = head.split('height="', 1)[1].split('"', 1)[0]
    return int(width), int(height)
