"""Figures people would rather look at than read: training curves, confusion matrices,
and accuracy against size / latency.

Built on matplotlib's object-oriented API (``matplotlib.figure.Figure`` with the Agg
canvas), never ``pyplot``: no global backend switch, no GUI, safe in worker processes.
Every function returns a :class:`~matplotlib.figure.Figure`; :func:`to_png` renders it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["ModelPoint", "accuracy_vs_cost", "confusion_matrix_figure", "to_png", "training_curves"]


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach a raster canvas; savefig needs one
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history, start=1):
        v = row.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            xs.append(int(row.get("epoch", i)))
            ys.append(float(v))
    return xs, ys


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
    """Loss parts and validation accuracy per epoch, for one or several stages.

    Args:
        histories: stage name (``teacher``, ``student``, ``recovery``) → the per-epoch
            history of :func:`kdpipe.train.fit` (``train_loss``, ``train_<part>``,
            ``val_loss``, ``val_accuracy``).
        title: figure title.
    """
    fig, (ax_loss, ax_acc) = _figure(10, 3.8, ncols=2)
    for stage, history in histories.items():
        keys = sorted({k for row in history for k in row
                       if k.startswith("train_") or k == "val_loss"})
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                ax_loss.plot(xs, ys, marker=".", label=f"{stage} {key}")
        xs, ys = _series(history, "val_accuracy")
        if xs:
            ax_acc.plot(xs, ys, marker="o", label=stage)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="losses")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str],
                            title: str = "confusion matrix") -> Figure:
    """Row-normalised confusion matrix (rows: true class, columns: prediction), counts in cells
    when there are at most 20 classes."""
    k = len(classes)
    size = min(12.0, 2.5 + 0.45 * k)
    fig, (ax,) = _figure(size, size * 0.85)
    totals = [max(1, sum(row)) for row in confusion]
    normed = [[c / t for c in row] for row, t in zip(confusion, totals, strict=True)]
    im = ax.imshow(normed, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ticks = range(k)
    ax.set_xticks(ticks, labels=classes, rotation=90 if k > 10 else 0, fontsize=7)
    ax.set_yticks(ticks, labels=classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if k <= 20:
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=6,
                            color="white" if normed[i][j] > 0.5 else "black")
    return fig


@dataclass(frozen=True)
class ModelPoint:
    """One model in the accuracy-versus-cost chart."""

    name: str
    accuracy: float
    size_mb: float | None = None
    latency_ms: float | None = None
    params: int | None = None


def accuracy_vs_cost(points: Sequence[ModelPoint], title: str = "") -> Figure:
    """Accuracy against model size (MB) and against latency (ms), one marker per model.

    A panel is drawn only when at least one model has that measurement.
    """
    panels = [(attr, label) for attr, label in (("size_mb", "size (MB)"), ("latency_ms", "latency p50 (ms)"))
              if any(getattr(p, attr) is not None for p in points)]
    if not panels:
        panels = [("params", "parameters")]
    fig, axes = _figure(5 * len(panels), 3.8, ncols=len(panels))
    for ax, (attr, label) in zip(axes, panels, strict=True):
        for p in points:
            x = getattr(p, attr)
            if x is None:
                continue
            ax.scatter([x], [p.accuracy], s=60)
            ax.annotate(p.name, (x, p.accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set(xlabel=label, ylabel="accuracy", title=f"accuracy vs {label.split(' ')[0]}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
