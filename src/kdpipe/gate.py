"""The promotion gate: a pure decision from an evaluation report and thresholds.

``decide(report, cfg)`` has no side effects: it lists every enabled check with its value,
threshold and verdict, and passes only when every enabled check passes. Acting on the
decision (moving the production stage and the MLflow alias) is the promotion step's job.

Checks (a threshold of ``None`` in :class:`~kdpipe.config.GateConfig` disables one):

==========================  ==============================================  ========
check                       value                                           passes if
==========================  ==============================================  ========
``min_accuracy``            candidate (ONNX) accuracy                       value >= t
``max_drop_vs_teacher``     teacher accuracy - candidate accuracy           value <= t
``min_gain_vs_production``  candidate accuracy - production accuracy        value >= t
``max_latency_ms``          ONNX Runtime p50 latency at batch 1 (ms)        value <= t
``max_onnx_mb``             .onnx file size in MB (10^6 bytes)              value <= t
``max_parity_error``        max abs diff ONNX Runtime vs pruned PyTorch     value <= t
``min_compression``         teacher / candidate params (or MACs)            value >= t
==========================  ==============================================  ========

A value equal to its threshold passes (within ``TOLERANCE``, because accuracy
differences such as 0.95 - 0.92 are not exact in floating point). A check whose value
could not be measured fails, except ``min_gain_vs_production``, which is *skipped* with
its reason when there is no comparable production model (the first promotion, or a
production model trained on other classes).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from kdpipe.config import GateConfig
from kdpipe.eval_report import EvaluationReport

__all__ = ["TOLERANCE", "GateCheck", "GateDecision", "decide"]

TOLERANCE = 1e-9
"""Slack on every comparison, so that a value equal to its threshold passes."""

Verdict = Literal["pass", "fail", "skipped"]


class GateCheck(BaseModel):
    """One gate check: what was measured, against what, and the verdict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """The GateConfig field that enables it, e.g. ``min_accuracy``."""
    description: str
    value: float | None
    threshold: float
    comparison: Literal[">=", "<="]
    verdict: Verdict
    reason: str
    """One line a person can read: ``0.9312 >= 0.9000``, or why it was skipped / failed."""


class GateDecision(BaseModel):
    """The gate's verdict: ``passed`` is True exactly when no enabled check failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passed: bool
    checks: list[GateCheck]
    disabled: list[str]
    """Checks switched off in the config (threshold ``None``)."""

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.verdict == "fail"]

    @property
    def reasons(self) -> list[str]:
        """One line per failed check (empty when the gate passed)."""
        return [f"{c.name}: {c.reason}" for c in self.failed_checks]

    def summary(self) -> str:
        """A plain-text table for the terminal and the logs."""
        lines = [f"gate: {'PASSED' if self.passed else 'REJECTED'}"]
        width = max((len(c.name) for c in self.checks), default=0)
        for c in self.checks:
            lines.append(f"  [{c.verdict.upper():>7}] {c.name:<{width}}  {c.reason}")
        if self.disabled:
            lines.append(f"  disabled: {', '.join(self.disabled)}")
        return "\n".join(lines)

    def metadata(self) -> dict[str, float | int | str]:
        """Flat key -> value summary for the ZenML dashboard and MLflow."""
        out: dict[str, float | int | str] = {
            "gate_passed": int(self.passed),
            "gate_verdict": "passed" if self.passed else "rejected",
            "gate_failed": ", ".join(c.name for c in self.failed_checks) or "none",
        }
        for c in self.checks:
            out[f"gate_{c.name}_verdict"] = c.verdict
            out[f"gate_{c.name}_threshold"] = c.threshold
            if c.value is not None:
                out[f"gate_{c.name}_value"] = c.value
        return out

    def to_html(self) -> str:
        """A standalone HTML table: check, value, threshold, verdict."""
        colour = {"pass": "#d7f0d7", "fail": "#f6d3d3", "skipped": "#eeeeee"}
        rows = "".join(
            f"<tr style='background:{colour[c.verdict]}'><td>{html.escape(c.name)}</td>"
            f"<td>{html.escape(c.description)}</td>"
            f"<td>{'–' if c.value is None else f'{c.value:.6g}'}</td>"
            f"<td>{html.escape(c.comparison)} {c.threshold:.6g}</td>"
            f"<td><b>{c.verdict}</b></td><td>{html.escape(c.reason)}</td></tr>"
            for c in self.checks
        )
        title = "PASSED: the candidate may be promoted" if self.passed else \
            "REJECTED: the candidate is not promoted"
        disabled = (f"<p>disabled checks: {html.escape(', '.join(self.disabled))}</p>"
                    if self.disabled else "")
        return (
            "<html><head><meta charset='utf-8'><style>"
            "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
            f"<h3>Gate {html.escape(title)}</h3><table><tr><th>check</th><th>measures</th>"
            f"<th>value</th><th>threshold</th><th>verdict</th><th>detail</th></tr>{rows}"
            f"</table>{disabled}</body></html>"
        )


# ----------------------------------------------------------------------------- checks
def _compare(name: str, description: str, value: float | None, threshold: float,
             comparison: Literal[">=", "<="], missing: str) -> GateCheck:
    """Build a check; an unmeasured value fails with ``missing`` as the reason."""
    if value is None:
        return GateCheck(name=name, description=description, value=None, threshold=threshold,
                         comparison=comparison, verdict="fail", reason=f"not measured: {missing}")
    ok = value >= threshold - TOLERANCE if comparison == ">=" else value <= threshold + TOLERANCE
    op = comparison if ok else {">=": "<", "<=": ">"}[comparison]
    return GateCheck(name=name, description=description, value=value, threshold=threshold,
                     comparison=comparison, verdict="pass" if ok else "fail",
                     reason=f"{value:.6g} {op} {threshold:.6g}")


def _min_accuracy(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    return _compare("min_accuracy", "candidate (ONNX) accuracy", report.candidate.accuracy, t,
                    ">=", "no candidate accuracy")


def _max_drop_vs_teacher(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    drop = report.models["teacher"].accuracy - report.candidate.accuracy
    return _compare("max_drop_vs_teacher", "teacher accuracy - candidate accuracy", drop, t,
                    "<=", "no teacher accuracy")


def _min_gain_vs_production(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    name, desc = "min_gain_vs_production", "candidate accuracy - production accuracy"
    prod = report.production.evaluation
    if prod is None:
        return GateCheck(name=name, description=desc, value=None, threshold=t, comparison=">=",
                         verdict="skipped", reason=f"skipped: {report.production.reason}")
    return _compare(name, desc, report.candidate.accuracy - prod.accuracy, t, ">=", "")


def _max_latency_ms(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    lat = report.candidate.latency_at(1)
    return _compare("max_latency_ms", "ONNX Runtime p50 latency at batch 1 (ms)",
                    None if lat is None else lat.p50_ms, t, "<=",
                    "no batch-1 latency (add 1 to evaluate.latency_batch_sizes)")


def _max_onnx_mb(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    size = report.candidate.size_bytes
    return _compare("max_onnx_mb", "ONNX file size (MB = 10^6 bytes)",
                    None if size is None else size / 1e6, t, "<=", "no ONNX file size")


def _max_parity_error(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    return _compare("max_parity_error", "max |ONNX Runtime - pruned PyTorch| output",
                    report.parity_max_abs_diff, t, "<=", "no parity measurement")


def _min_compression(report: EvaluationReport, t: float, cfg: GateConfig) -> GateCheck:
    metric = cfg.compression_metric
    return _compare("min_compression", f"teacher / candidate {metric}",
                    report.compression(metric), t, ">=",
                    f"{metric} of the teacher or the candidate unknown")


_CHECKS: dict[str, Callable[[EvaluationReport, float, GateConfig], GateCheck]] = {
    "min_accuracy": _min_accuracy,
    "max_drop_vs_teacher": _max_drop_vs_teacher,
    "min_gain_vs_production": _min_gain_vs_production,
    "max_latency_ms": _max_latency_ms,
    "max_onnx_mb": _max_onnx_mb,
    "max_parity_error": _max_parity_error,
    "min_compression": _min_compression,
}


def decide(report: EvaluationReport, cfg: GateConfig) -> GateDecision:
    """Run every enabled check on ``report``.

    Args:
        report: the evaluation of the candidate, the teacher and production.
        cfg: thresholds; a ``None`` threshold disables its check.

    Returns:
        The decision: ``passed`` is True when no enabled check failed (skipped checks do
        not fail the gate), with every enabled check listed in a fixed order.
    """
    checks, disabled = [], []
    for name, check in _CHECKS.items():
        threshold = getattr(cfg, name)
        if threshold is None:
            disabled.append(name)
        else:
            checks.append(check(report, float(threshold), cfg))
    passed = all(c.verdict != "fail" for c in checks)
    return GateDecision(passed=passed, checks=checks, disabled=disabled)
