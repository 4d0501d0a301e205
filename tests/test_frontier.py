"""The accuracy-vs-latency frontier: the Pareto set on hand-made points, the report's
points, the table and the figure (rendered for real, PNG and SVG)."""

from __future__ import annotations

import pytest

from kdpipe.eval_report import (
    EvaluationReport,
    LatencyStats,
    ModelEvaluation,
    ProductionComparison,
)
from kdpipe.frontier import (
    FrontierPoint,
    _areas,
    frontier_figure,
    frontier_points,
    frontier_table,
    pareto_front,
)
from kdpipe.plots import to_png, to_svg


def P(name: str, accuracy: float, latency: float | None, size: int | None = 1000) -> FrontierPoint:
    return FrontierPoint(name=name, label=name, runtime="onnxruntime", accuracy=accuracy,
                         latency_ms=latency, size_bytes=size)


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    points = [P("fast", 0.80, 0.5), P("mid", 0.90, 1.0), P("best", 0.95, 2.0),
              P("dominated", 0.93, 3.0),          # slower and less accurate than best
              P("same_speed_worse", 0.85, 1.0),   # as fast as mid, less accurate
              P("unmeasured", 0.99, None)]        # no latency: never on the frontier
    assert pareto_front(points) == {"fast", "mid", "best"}


def test_identical_points_are_both_on_the_frontier_and_a_single_point_is_alone() -> None:
    assert pareto_front([P("a", 0.9, 1.0), P("b", 0.9, 1.0)]) == {"a", "b"}
    assert pareto_front([P("a", 0.9, 1.0)]) == {"a"}
    assert pareto_front([]) == set()


def test_marker_area_is_proportional_to_size() -> None:
    areas = _areas([P("big", 0.9, 1.0, 4_000_000), P("small", 0.9, 1.0, 1_000_000)])
    assert areas[0] / areas[1] == pytest.approx(4.0, rel=1e-9)
    # unknown sizes: one default marker area, no division by zero
    assert len(set(_areas([P("a", 0.9, 1.0, None), P("b", 0.9, 1.0, None)]))) == 1


def _ev(name: str, runtime: str, accuracy: float, p50: float | None, size: int) -> ModelEvaluation:
    latency = [] if p50 is None else [LatencyStats(batch_size=1, p50_ms=p50, p95_ms=p50 * 1.2,
                                                   mean_ms=p50),
                                      LatencyStats(batch_size=16, p50_ms=p50 * 8,
                                                   p95_ms=p50 * 9, mean_ms=p50 * 8)]
    return ModelEvaluation(name=name, runtime=runtime, accuracy=accuracy,
                           per_class_accuracy=[accuracy, None], confusion=[[5, 0], [0, 0]],
                           num_samples=5, params=100, macs=1000, size_bytes=size, latency=latency)


def report(production: bool = True) -> EvaluationReport:
    prod = (ProductionComparison(status="evaluated", reason="evaluated", version="7",
                                 evaluation=_ev("production", "onnxruntime", 0.91, 0.4, 300))
            if production else ProductionComparison(status="absent", reason="no production model"))
    return EvaluationReport(
        split="test", classes=["a", "b"], input_shape=(1, 8, 8), dataset_fingerprint="f" * 64,
        models={"teacher": _ev("teacher", "pytorch", 0.97, 2.0, 40_000),
                "student": _ev("student", "pytorch", 0.93, 1.0, 8_000),
                "pruned_student": _ev("pruned_student", "pytorch", 0.92, 0.8, 2_000),
                "onnx": _ev("onnx", "onnxruntime", 0.92, 0.3, 2_100),
                "onnx_int8": _ev("onnx_int8", "onnxruntime", 0.915, 0.2, 700).model_copy(
                    update={"precision": "int8", "agreement": 0.995})},
        parity_max_abs_diff=1e-6, production=prod)


def test_points_come_from_every_model_and_production() -> None:
    points = {p.name: p for p in frontier_points(report(), promoted="onnx")}
    assert set(points) == {"teacher", "student", "pruned_student", "onnx", "onnx_int8",
                           "production"}
    assert points["production"].label == "production (v7)"
    assert points["onnx_int8"].latency_ms == 0.2 and points["onnx_int8"].size_bytes == 700
    # int8 fastest; onnx beats production (faster, more accurate); teacher most accurate
    assert {n for n, p in points.items() if p.on_frontier} == {"onnx_int8", "onnx", "teacher",
                                                                "student"}
    assert [n for n, p in points.items() if p.promoted] == ["onnx"]
    assert "production" not in {p.name for p in frontier_points(report(production=False))}


def test_latency_at_another_batch_size_and_unknown_promoted_name() -> None:
    points = {p.name: p for p in frontier_points(report(), batch_size=16)}
    assert points["onnx"].latency_ms == pytest.approx(2.4)
    assert all(p.latency_ms is None for p in frontier_points(report(), batch_size=64))
    with pytest.raises(ValueError, match="'onnx_fp16' is not in the evaluation report"):
        frontier_points(report(), promoted="onnx_fp16")


def test_table_is_fastest_first_with_frontier_and_promoted_marks() -> None:
    text = frontier_table(frontier_points(report(), promoted="onnx"))
    lines = text.splitlines()
    rows = lines[3:]
    assert [r.split()[0] for r in rows] == ["onnx_int8", "onnx", "production", "pruned_student",
                                            "student", "teacher"]
    onnx = next(r for r in rows if r.startswith("onnx "))
    assert onnx.endswith("yes (promoted)") and "0.9200" in onnx and "0.300" in onnx
    assert not next(r for r in rows if r.startswith("production")).endswith("yes")


def test_figure_renders_with_frontier_and_promoted_ring() -> None:
    fig = frontier_figure(frontier_points(report(), promoted="onnx"), title="t")
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert "promoted" in labels and "frontier (fast and accurate)" in labels
    assert ax.get_xscale() == "log"
    png = to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "<svg" in to_svg(fig)
    # no latency anywhere: still a figure (nothing to draw), no crash
    to_png(frontier_figure([P("a", 0.9, None)]))
