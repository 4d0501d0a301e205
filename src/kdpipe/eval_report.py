"""What an evaluation found: :class:`EvaluationReport` and its parts, and their views.

Computed by :mod:`kdpipe.evaluation` (which re-exports these names); read by the gate,
the steps and the dashboards without importing the evaluation machinery.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["CANDIDATE", "CANDIDATES", "INT8_CANDIDATE", "PYTORCH_MODELS", "EvaluationError",
           "EvaluationReport", "LatencyStats", "ModelEvaluation", "ProductionComparison"]

CANDIDATE = "onnx"
"""Key of the FP32 candidate: the exported ONNX student (always evaluated)."""
INT8_CANDIDATE = "onnx_int8"
"""Key of the INT8 candidate (``quantize.enabled`` and the quantiser succeeded)."""
CANDIDATES = (CANDIDATE, INT8_CANDIDATE)
"""Every model that may be promoted, in the gate's tie-break order (FP32 first)."""
PYTORCH_MODELS = ("teacher", "student", "pruned_student")


class EvaluationError(RuntimeError):
    """An evaluation could not be carried out (unreadable model, wrong output shape...)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- report
class LatencyStats(_Frozen):
    """Wall-clock latency of one forward pass at a given batch size."""

    batch_size: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


class ModelEvaluation(_Frozen):
    """What one model achieved on the evaluation split."""

    name: str
    runtime: Literal["pytorch", "onnxruntime"]
    accuracy: float
    per_class_accuracy: list[float | None]
    """Recall per class, in the order of :attr:`EvaluationReport.classes`; ``None`` for a
    class without samples in the split (JSON has no NaN)."""
    confusion: list[list[int]]
    """``confusion[true][predicted]`` counts."""
    num_samples: int
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    """Serialized weights (PyTorch) or the .onnx file's size."""
    latency: list[LatencyStats] = []
    precision: Literal["fp32", "int8"] | None = None
    """Numeric precision of a candidate's ONNX file (None for the PyTorch models)."""
    agreement: float | None = None
    """INT8 candidate: fraction of samples whose argmax equals the FP32 ONNX model's."""

    def latency_at(self, batch_size: int) -> LatencyStats | None:
        """The latency measured at ``batch_size``, or None when not measured."""
        return next((s for s in self.latency if s.batch_size == batch_size), None)


class ProductionComparison(_Frozen):
    """Whether the current production student could be compared, and how it did."""

    status: Literal["evaluated", "absent", "incompatible", "unreadable"]
    reason: str
    """Human-readable: ``no production model``, ``classes differ: ...``, ..."""
    version: str | None = None
    evaluation: ModelEvaluation | None = None


class EvaluationReport(_Frozen):
    """Every model's numbers on one split: the ``evaluation`` artifact."""

    split: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    dataset_fingerprint: str
    models: dict[str, ModelEvaluation]
    """Keys: ``teacher``, ``student``, ``pruned_student`` (PyTorch), ``onnx`` and, when
    there is an INT8 candidate, ``onnx_int8``."""
    parity_max_abs_diff: float
    """max |ONNX Runtime output - pruned PyTorch output| over the whole split."""
    production: ProductionComparison

    @property
    def candidate(self) -> ModelEvaluation:
        """The FP32 candidate (the ONNX export of the pruned student)."""
        return self.models[CANDIDATE]

    @property
    def candidates(self) -> list[str]:
        """Keys of the models that may be promoted, FP32 first."""
        return [name for name in CANDIDATES if name in self.models]

    def compression(self, metric: Literal["params", "macs"], name: str = CANDIDATE
                    ) -> float | None:
        """Teacher / candidate ratio of ``params`` or ``macs`` (None when unmeasured)."""
        teacher = getattr(self.models["teacher"], metric)
        candidate = getattr(self.models[name], metric)
        if not teacher or not candidate:
            return None
        return teacher / candidate

    def metadata(self) -> dict[str, float | int | str]:
        """Flat key -> value summary for the ZenML dashboard and MLflow."""
        out: dict[str, float | int | str] = {
            "split": self.split,
            "num_samples": self.candidate.num_samples,
            "dataset_fingerprint": self.dataset_fingerprint,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "production_status": self.production.status,
            "production_reason": self.production.reason,
        }
        for name, ev in self.models.items():
            out[f"{name}_accuracy"] = ev.accuracy
            if ev.agreement is not None:
                out[f"{name}_agreement"] = ev.agreement
            for key in ("params", "macs", "size_bytes"):
                if getattr(ev, key) is not None:
                    out[f"{name}_{key}"] = getattr(ev, key)
            for lat in ev.latency:
                out[f"{name}_p50_ms_b{lat.batch_size}"] = lat.p50_ms
                out[f"{name}_p95_ms_b{lat.batch_size}"] = lat.p95_ms
        for metric in ("params", "macs"):
            ratio = self.compression(metric)
            if ratio is not None:
                out[f"compression_{metric}"] = ratio
        if self.production.evaluation is not None:
            out["production_accuracy"] = self.production.evaluation.accuracy
            out["production_version"] = self.production.version or ""
        return out

    def to_html(self) -> str:
        """A standalone HTML page: one row per model, then the candidate's confusion matrix."""
        rows = [*self.models.values()]
        if self.production.evaluation is not None:
            rows.append(self.production.evaluation)
        head = ("<tr><th>model</th><th>runtime</th><th>accuracy</th><th>params</th>"
                "<th>MACs</th><th>size (MB)</th><th>latency p50 / p95 (ms)</th></tr>")
        body = "".join(_model_row(ev) for ev in rows)
        prod = html.escape(f"production: {self.production.status} ({self.production.reason})")
        return (
            f"<html><head><meta charset='utf-8'><style>{_CSS}</style></head><body>"
            f"<h3>Evaluation on the {html.escape(self.split)} split "
            f"({self.candidate.num_samples} samples)</h3>"
            f"<table>{head}{body}</table>"
            f"<p>ONNX Runtime vs pruned PyTorch: max |diff| = {self.parity_max_abs_diff:.3g}</p>"
            f"<p>{prod}</p>"
            f"<h3>Confusion matrix of the candidate (rows: true, columns: predicted)</h3>"
            f"{_confusion_table(self.classes, self.candidate)}</body></html>"
        )


_CSS = ("table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}.hit{background:#d7f0d7}")


def _fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _model_row(ev: ModelEvaluation) -> str:
    lat = "; ".join(f"b{s.batch_size}: {s.p50_ms:.3g} / {s.p95_ms:.3g}" for s in ev.latency)
    size_mb = None if ev.size_bytes is None else ev.size_bytes / 1e6
    cells = [html.escape(ev.name), ev.runtime, f"{ev.accuracy:.4f}", _fmt(ev.params, ","),
             _fmt(ev.macs, ","), _fmt(size_mb, ".3f"), lat or "–"]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _confusion_table(classes: Sequence[str], ev: ModelEvaluation) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>"
    rows = []
    for i, (name, counts) in enumerate(zip(classes, ev.confusion, strict=True)):
        cells = "".join(f"<td class='{'hit' if i == j else ''}'>{n}</td>"
                        for j, n in enumerate(counts))
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"
