"""Figures people would rather look at than read: training curves and confusion matrices
(the accuracy-versus-latency frontier, built on :func:`new_figure`, is in :mod:`kdpipe.frontier`).

Built on matplotlib's object-oriented API (``matplotlib.figure.Figure`` with the Agg
canvas), never ``pyplot``: no global backend switch, no GUI, safe in worker processes.
Every function returns a :class:`~matplotlib.figure.Figure`; :func:`to_png` renders it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["confusion_matrix_figure", "new_figure", "to_png", "to_svg", "training_curves"]


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    """A constrained-layout figure on an Agg canvas and its ``ncols`` axes (a row)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach a raster canvas; savefig needs one
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def to_svg(fig: Figure) -> str:
    """Render a figure to SVG text (text kept as glyph paths: it looks the same anywhere)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
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
    fig, (ax_loss, ax_acc) = new_figure(10, 3.8, ncols=2)
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
    fig, (ax,) = new_figure(size, size * 0.85)
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
