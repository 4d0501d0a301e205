"""The accuracy-versus-latency frontier of one run: which models are fast *and* accurate.

Every model of an :class:`~kdpipe.eval_report.EvaluationReport` (teacher, student, pruned
student, each ONNX candidate, and production's model when it could be compared) becomes a
:class:`FrontierPoint`: test accuracy against p50 latency at batch 1. A point is on the
Pareto frontier when no other point is at least as fast *and* at least as accurate, and
strictly better in one of the two. The figure draws marker area proportional to the
model's size, the frontier as a staircase, and rings the promoted model; the same data is
a plain-text table for the terminal (:func:`frontier_table`).

Core code: matplotlib through :mod:`kdpipe.plots` (Agg canvas, never pyplot), no zenml.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from kdpipe.eval_report import EvaluationReport, ModelEvaluation
from kdpipe.plots import new_figure

__all__ = ["PRODUCTION", "FrontierPoint", "frontier_figure", "frontier_points", "frontier_table",
           "pareto_front"]

PRODUCTION = "production"
"""Point name of the production model (with its version in the label)."""
_MIN_AREA, _MAX_AREA = 40.0, 900.0  # marker area range in points^2


@dataclass(frozen=True)
class FrontierPoint:
    """One model on the chart.

    Attributes:
        name: the key in ``report.models`` (``teacher``, ``onnx``, ``onnx_int8``...) or
            ``production``.
        label: what the chart and the table print (``production (v3)``).
        runtime: ``pytorch`` or ``onnxruntime``.
        accuracy: on the report's split.
        latency_ms: p50 at the frontier's batch size; None when not measured (such a
            point is listed but neither drawn nor on the frontier).
        size_bytes: serialized weights or the .onnx file's size (None: unknown).
        on_frontier: no other point is as fast and as accurate (see :func:`pareto_front`).
        promoted: the model this run promoted.
    """

    name: str
    label: str
    runtime: str
    accuracy: float
    latency_ms: float | None
    size_bytes: int | None
    on_frontier: bool = False
    promoted: bool = False


def _point(name: str, label: str, ev: ModelEvaluation, batch_size: int) -> FrontierPoint:
    lat = ev.latency_at(batch_size)
    return FrontierPoint(name=name, label=label, runtime=ev.runtime, accuracy=ev.accuracy,
                         latency_ms=None if lat is None else lat.p50_ms, size_bytes=ev.size_bytes)


def frontier_points(report: EvaluationReport, *, promoted: str | None = None,
                    batch_size: int = 1) -> list[FrontierPoint]:
    """Every model of ``report`` (and production's, when evaluated) as a frontier point.

    Args:
        report: the run's evaluation.
        promoted: the ``report.models`` key of the promoted model (None: nothing promoted).
        batch_size: the batch size whose p50 latency is the x axis.

    Raises:
        ValueError: ``promoted`` names no model of the report.
    """
    if promoted is not None and promoted not in report.models:
        raise ValueError(f"promoted model {promoted!r} is not in the evaluation report "
                         f"(models: {', '.join(report.models)})")
    points = [_point(name, name, ev, batch_size) for name, ev in report.models.items()]
    prod = report.production
    if prod.evaluation is not None:
        label = f"{PRODUCTION} (v{prod.version})" if prod.version else PRODUCTION
        points.append(_point(PRODUCTION, label, prod.evaluation, batch_size))
    front = pareto_front(points)
    return [replace(p, on_frontier=p.name in front, promoted=p.name == promoted) for p in points]


def _dominates(a: FrontierPoint, b: FrontierPoint) -> bool:
    """``a`` is at least as fast and as accurate as ``b``, and strictly better in one."""
    assert a.latency_ms is not None and b.latency_ms is not None
    return (a.latency_ms <= b.latency_ms and a.accuracy >= b.accuracy
            and (a.latency_ms < b.latency_ms or a.accuracy > b.accuracy))


def pareto_front(points: Sequence[FrontierPoint]) -> set[str]:
    """Names of the points no other point dominates (latency down, accuracy up).

    Points without a latency are never on the frontier; two identical points both are.
    """
    timed = [p for p in points if p.latency_ms is not None and math.isfinite(p.latency_ms)]
    return {p.name for p in timed if not any(_dominates(q, p) for q in timed if q is not p)}


def _areas(points: Sequence[FrontierPoint]) -> list[float]:
    """Marker areas proportional to size, scaled so the largest model gets ``_MAX_AREA``."""
    largest = max((p.size_bytes or 0 for p in points), default=0)
    if largest <= 0:
        return [_MIN_AREA * 3] * len(points)
    return [max(_MIN_AREA, _MAX_AREA * (p.size_bytes or 0) / largest) for p in points]


def _minor_label(value: float, _pos: int) -> str:
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2.0, 3.0, 5.0) else ""


def frontier_figure(points: Sequence[FrontierPoint], title: str = "",
                    batch_size: int = 1) -> Figure:
    """Accuracy against p50 latency: marker area ∝ size, frontier drawn, promoted ringed."""
    fig, (ax,) = new_figure(7.5, 4.8)
    timed = [p for p in points if p.latency_ms is not None]
    colours = {"pytorch": "#4c72b0", "onnxruntime": "#dd8452"}
    for p, area in zip(timed, _areas(timed), strict=True):
        ax.scatter([p.latency_ms], [p.accuracy], s=area, alpha=0.55,
                   color=colours.get(p.runtime, "#777777"),
                   edgecolors="black" if p.on_frontier else "none", linewidths=0.8)
        if p.promoted:
            ax.scatter([p.latency_ms], [p.accuracy], s=area * 2.2 + 120, facecolors="none",
                       edgecolors="#2ca02c", linewidths=2.2, label="promoted")
        ax.annotate(p.label, (p.latency_ms, p.accuracy), textcoords="offset points",
                    xytext=(7, 5), fontsize=8)
    front = sorted((p for p in timed if p.on_frontier), key=lambda p: p.latency_ms or 0.0)
    if front:
        xs, ys = [p.latency_ms for p in front], [p.accuracy for p in front]
        ax.step(xs, ys, where="post", color="#555555", linestyle="--", linewidth=1,
                label="frontier (fast and accurate)")
    for runtime, colour in colours.items():
        if any(p.runtime == runtime for p in timed):
            ax.scatter([], [], s=60, color=colour, alpha=0.55, label=runtime)
    if any(p.latency_ms and p.latency_ms > 0 for p in timed):
        ax.set_xscale("log")
        # 0.2, 0.3, 1, 2 rather than 2x10^-1; minor ticks labelled at 2, 3 and 5 only
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.18, y=0.12)  # room for the labels right of the outermost points
    ax.set(xlabel=f"p50 latency at batch {batch_size} (ms, log scale)", ylabel="accuracy",
           title=title or "accuracy vs latency (marker area ∝ model size)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def frontier_table(points: Sequence[FrontierPoint], batch_size: int = 1) -> str:
    """The frontier as a fixed-width table, fastest first (unmeasured latency last)."""
    order = sorted(points, key=lambda p: (p.latency_ms is None, p.latency_ms or 0.0, -p.accuracy))
    head = ["model", "runtime", "accuracy", f"p50 b{batch_size} (ms)", "size (MB)", "frontier"]
    rows = [head]
    for p in order:
        size = None if p.size_bytes is None else p.size_bytes / 1e6
        mark = ("yes" if p.on_frontier else "") + (" (promoted)" if p.promoted else "")
        rows.append([p.label, p.runtime, f"{p.accuracy:.4f}", _fmt(p.latency_ms, ".3f"),
                     _fmt(size, ".3f"), mark.strip()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "Accuracy vs latency (frontier: no other model is both faster and more accurate)\n" \
        + "\n".join(lines)
