"""A picture of a local run: one self-contained HTML file (inline SVG, no scripts, no links).

Two panels drawn from the run's samples (pipeline.local.samples): messages queued per stage, and
vendor calls per second against the limit, with the 429s marked. The time axis counts the
seconds a process was running the run: a resume continues where the stopped process left
off, at a dashed line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from pipeline.local.samples import Sample, read
from pipeline.sinks import manifest_key

CHART_FILE = "chart.html"
# More samples than this (per series) are thinned to every k-th, each process's first and
# last kept: an hour is 3,600 samples, more points than a chart this wide can show.
MAX_POINTS = 1200
WIDTH, PANEL_HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 34, 34
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
DEAD_COLOUR, LIMIT_COLOUR, THROTTLE_COLOUR = "#7f7f7f", "#d62728", "#d62728"


@dataclass
class Series:
    """What the chart draws, in its own units: x in seconds of running."""

    x: list[float] = field(default_factory=list)
    queued: dict[str, list[int]] = field(default_factory=dict)  # per stage, at every x
    dead: list[int] = field(default_factory=list)  # all DLQs, at every x
    rate_x: list[float] = field(default_factory=list)  # calls/s between a sample and the one
    rate: list[float] = field(default_factory=list)  # before it (same process)
    limit: float = 0.0
    throttled: list[tuple[float, int]] = field(default_factory=list)  # (x, 429s since before)
    resumes: list[float] = field(default_factory=list)  # x where a new process took over
    calls: int = 0
    rate_limited: int = 0


def _thinned(samples: Sequence[Sample]) -> list[Sample]:
    stride = max(1, math.ceil(len(samples) / MAX_POINTS))
    if stride == 1:
        return list(samples)
    kept = []
    for i, s in enumerate(samples):
        first = i == 0 or samples[i - 1].started != s.started
        last = i == len(samples) - 1 or samples[i + 1].started != s.started
        if first or last or i % stride == 0:
            kept.append(s)
    return kept


def series_of(samples: Sequence[Sample]) -> Series:
    """The chart's series from a run's samples, oldest first."""
    # The stages in the order the samples name them (the profile's).
    stages = list(dict.fromkeys(name for s in samples for name in (*s.visible, *s.in_flight)))
    out = Series(queued={stage: [] for stage in stages})
    offset = 0.0  # x of the current process's first sample
    previous: Sample | None = None
    for s in _thinned(samples):
        if previous is None or s.started != previous.started:
            if previous is not None:
                offset = out.x[-1]
                out.resumes.append(offset)
                out.calls += previous.calls
                out.rate_limited += previous.rate_limited
            first_at = s.at
            previous = None
        x = offset + s.at - first_at
        out.x.append(x)
        for stage in stages:
            out.queued[stage].append(s.queued(stage))
        out.dead.append(sum(s.dead.values()))
        out.limit = max(out.limit, s.limit)
        if previous is not None and s.at > previous.at:
            out.rate_x.append(x)
            out.rate.append((s.calls - previous.calls) / (s.at - previous.at))
            if s.rate_limited > previous.rate_limited:
                out.throttled.append((x, s.rate_limited - previous.rate_limited))
        previous = s
    if previous is not None:
        out.calls += previous.calls
        out.rate_limited += previous.rate_limited
    return out


def _nice(value: float, steps: Sequence[float] = (1, 2, 5, 10)) -> float:
    """The smallest step × 10^k at least `value` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in steps if m * power >= value)


def _number(v: float) -> str:
    return f"{v:.0f}" if v == int(v) else f"{v:g}"


class _Panel:
    """One plot: axes, ticks, lines; y from 0 to a nice maximum."""

    def __init__(self, title: str, x_max: float, y_max: float) -> None:
        self.x_max = x_max if x_max > 0 else 1.0
        self.y_max = _nice(y_max, (1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, 10))
        self.w = WIDTH - LEFT - RIGHT
        self.h = PANEL_HEIGHT - TOP - BOTTOM
        self.parts = [
            f'<svg width="{WIDTH}" height="{PANEL_HEIGHT}" viewBox="0 0 {WIDTH} {PANEL_HEIGHT}"'
            f' role="img" aria-label="{escape(title)}" data-y-max="{_number(self.y_max)}"'
            f' data-plot="{LEFT} {TOP} {self.w} {self.h}">',
            f'<text x="{LEFT}" y="20" font-weight="600">{escape(title)}</text>',
        ]
        for i in range(5):
            value = self.y_max * i / 4
            y = self.y(value)
            self.parts.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + self.w}" y2="{y:.1f}"'
                ' stroke="#e4e4e4"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_number(value)}</text>"
            )
        step = _nice(self.x_max / 8)
        tick = 0.0
        while tick <= self.x_max + 1e-9:
            x = self.x(tick)
            self.parts.append(
                f'<text x="{x:.1f}" y="{TOP + self.h + 16}" text-anchor="middle">'
                f"{_number(tick)}</text>"
            )
            tick += step
        self.parts.append(
            f'<text x="{LEFT + self.w}" y="{PANEL_HEIGHT - 2}" text-anchor="end">'
            "seconds of running</text>"
        )
        self.legend = 0

    def x(self, seconds: float) -> float:
        return LEFT + self.w * seconds / self.x_max

    def y(self, value: float) -> float:
        return TOP + self.h * (1 - value / self.y_max)

    def line(
        self, name: str, xs: Sequence[float], values: Sequence[float], colour: str, dashed: bool
    ) -> None:
        pairs = zip(xs, values, strict=True)
        points = " ".join(f"{self.x(x):.2f},{self.y(v):.2f}" for x, v in pairs)
        style = ' stroke-dasharray="6 4"' if dashed else ""
        data = " ".join(_number(round(v, 3)) for v in values)
        self.parts.append(
            f'<polyline data-series="{escape(name)}" data-values="{data}" points="{points}"'
            f' fill="none" stroke="{colour}" stroke-width="1.6"{style}>'
            f"<title>{escape(name)}</title></polyline>"
        )
        y = TOP + 8 + 18 * self.legend
        self.legend += 1
        self.parts.append(
            f'<line x1="{LEFT + self.w + 12}" y1="{y}" x2="{LEFT + self.w + 36}" y2="{y}"'
            f' stroke="{colour}" stroke-width="2"{style}/>'
            f'<text x="{LEFT + self.w + 42}" y="{y + 4}">{escape(name)}</text>'
        )

    def marks(self, resumes: Sequence[float]) -> None:
        for x in resumes:
            px = self.x(x)
            self.parts.append(
                f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{TOP + self.h}"'
                ' stroke="#999" stroke-dasharray="3 3"/>'
                f'<text x="{px + 3:.1f}" y="{TOP + 12}" fill="#777">resumed</text>'
            )

    def svg(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def render(samples: Sequence[Sample], title: str) -> str:
    """The chart of a run's samples as one HTML document."""
    s = series_of(samples)
    x_max = s.x[-1] if s.x else 0.0

    queued_max = max([*(max(v, default=0) for v in s.queued.values()), max(s.dead, default=0)])
    depth = _Panel("Messages queued per stage (visible + in flight)", x_max, queued_max)
    for colour, (stage, values) in zip(COLOURS, s.queued.items(), strict=False):
        depth.line(stage, s.x, values, colour, dashed=False)
    if any(s.dead):
        depth.line("dead letters", s.x, s.dead, DEAD_COLOUR, dashed=True)
    depth.marks(s.resumes)

    calls = _Panel(
        "Vendor calls per second against the limit",
        x_max,
        max([*s.rate, s.limit * 1.1]),
    )
    calls.line("calls/s", s.rate_x, s.rate, COLOURS[0], dashed=False)
    if s.x:
        calls.line(f"limit {_number(s.limit)}/s", [0.0, x_max], [s.limit] * 2, LIMIT_COLOUR, True)
    for x, n in s.throttled:
        calls.parts.append(
            f'<circle cx="{calls.x(x):.1f}" cy="{TOP + 6}" r="4" fill="{THROTTLE_COLOUR}"'
            f' class="throttled"><title>{n} × 429</title></circle>'
        )
    calls.marks(s.resumes)

    processes = len(s.resumes) + 1 if s.x else 0
    summary = (
        f"{len(samples)} samples over {x_max:.0f} s of running by {processes}"
        f" process{'es' if processes != 1 else ''}; {s.calls} vendor calls,"
        f" {s.rate_limited} × 429, limit {_number(s.limit)}/s"
    )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title>",
            "<style>",
            "body { font: 14px system-ui, sans-serif; margin: 24px; color: #222 }",
            "svg { display: block; margin: 12px 0 }",
            "svg text { font: 12px system-ui, sans-serif; fill: #333 }",
            "</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<p>{escape(summary)}</p>",
            depth.svg(),
            calls.svg(),
            "</body></html>",
            "",
        ]
    )


def write_chart(samples_path: Path, out: Path, run_id: str) -> Path | None:
    """Write the chart of `run_id` beside its manifest under `out`; None if never sampled."""
    samples = read(samples_path, run_id)
    if not samples:
        return None
    path = (out / manifest_key(run_id)).with_name(CHART_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(render(samples, f"harvest run {run_id}"), encoding="utf-8")
    os.replace(scratch, path)
    return path
