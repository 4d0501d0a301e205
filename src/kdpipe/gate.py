"""The promotion gate: a pure decision from an evaluation report and thresholds.

``decide(report, cfg)`` has no side effects. Every candidate of the report (the FP32 ONNX
student and, when there is one, its INT8 version) gets its own table of the enabled
checks, each with its value, threshold and verdict; a candidate passes when none of its
checks fails. ``gate.prefer`` then chooses one of the passing candidates (:func:`choose`):
``fastest`` (default: the lowest p50 latency at batch 1 among the candidates within
``prefer_tolerance`` of the most accurate passing one), ``smallest`` or ``most_accurate``;
ties go to the FP32 candidate, so INT8 is promoted only when it wins by measurement.
Acting on the decision (moving the production stage and the MLflow alias) is the
promotion step's job.

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
                            (of the FP32 export, also for its INT8 version)
``min_agreement``           INT8 only: argmax agreement with FP32 ONNX      value >= t
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
from kdpipe.eval_report import CANDIDATE, EvaluationReport

__all__ = ["TOLERANCE", "CandidateVerdict", "GateCheck", "GateDecision", "choose", "decide"]

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


class CandidateVerdict(BaseModel):
    """One candidate's table of checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Its key in the evaluation report: ``onnx`` (FP32) or ``onnx_int8``."""
    precision: str
    passed: bool
    checks: list[GateCheck]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.precision.upper()})"

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if c.verdict == "fail"]


class GateDecision(BaseModel):
    """The gate's verdict: ``passed`` is True exactly when a candidate passed every check.

    ``checks`` is the deciding table: the chosen candidate's, or (rejected) the FP32
    candidate's; ``candidates`` holds every candidate's table.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    passed: bool
    checks: list[GateCheck]
    disabled: list[str]
    """Checks switched off in the config (threshold ``None``)."""
    candidates: list[CandidateVerdict] = []
    chosen: str | None = None
    """The candidate to promote (None: rejected, or a decision made before candidates)."""
    prefer: str = "fastest"
    choice: str = ""
    """Why ``chosen`` was picked among the passing candidates (or why none was)."""

    @property
    def promote(self) -> str:
        """The report key of the model to promote (the FP32 candidate unless chosen)."""
        return self.chosen or CANDIDATE

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.verdict == "fail"]

    @property
    def reasons(self) -> list[str]:
        """One line per failed check (empty when the gate passed); per candidate when
        there are several."""
        if self.passed:
            return []
        if len(self.candidates) > 1:
            return [f"{v.name}: {r}" for v in self.candidates for r in v.reasons]
        return [f"{c.name}: {c.reason}" for c in self.failed_checks]

    def summary(self) -> str:
        """A plain-text table for the terminal and the logs: every candidate's checks."""
        lines = [f"gate: {'PASSED' if self.passed else 'REJECTED'}"]
        tables = self.candidates or [CandidateVerdict(name=CANDIDATE, precision="fp32",
                                                      passed=self.passed, checks=self.checks)]
        width = max((len(c.name) for v in tables for c in v.checks), default=0)
        for verdict in tables:
            if len(tables) > 1:
                lines.append(f" candidate {verdict.label}: "
                             f"{'passed' if verdict.passed else 'rejected'}")
            for c in verdict.checks:
                lines.append(f"  [{c.verdict.upper():>7}] {c.name:<{width}}  {c.reason}")
        if self.disabled:
            lines.append(f"  disabled: {', '.join(self.disabled)}")
        if self.choice:
            lines.append(f"  choice ({self.prefer}): {self.choice}")
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
        if self.candidates:
            out |= {"gate_chosen": self.chosen or "none", "gate_prefer": self.prefer,
                    "gate_choice": self.choice}
            out |= {f"gate_{v.name}_passed": int(v.passed) for v in self.candidates}
        return out

    def to_html(self) -> str:
        """A standalone HTML page: per candidate, check, value, threshold, verdict."""
        tables = self.candidates or [CandidateVerdict(name=CANDIDATE, precision="fp32",
                                                      passed=self.passed, checks=self.checks)]
        title = "PASSED: the candidate may be promoted" if self.passed else \
            "REJECTED: the candidate is not promoted"
        if self.chosen:
            title = f"PASSED: promote {self.chosen}"
        disabled = (f"<p>disabled checks: {html.escape(', '.join(self.disabled))}</p>"
                    if self.disabled else "")
        choice = (f"<p>choice ({html.escape(self.prefer)}): {html.escape(self.choice)}</p>"
                  if self.choice else "")
        body = "".join(_html_table(v, heading=len(tables) > 1) for v in tables)
        return (
            "<html><head><meta charset='utf-8'><style>"
            "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
            f"<h3>Gate {html.escape(title)}</h3>{body}{disabled}{choice}</body></html>"
        )


def _html_table(verdict: CandidateVerdict, *, heading: bool) -> str:
    colour = {"pass": "#d7f0d7", "fail": "#f6d3d3", "skipped": "#eeeeee"}
    rows = "".join(
        f"<tr style='background:{colour[c.verdict]}'><td>{html.escape(c.name)}</td>"
        f"<td>{html.escape(c.description)}</td>"
        f"<td>{'–' if c.value is None else f'{c.value:.6g}'}</td>"
        f"<td>{html.escape(c.comparison)} {c.threshold:.6g}</td>"
        f"<td><b>{c.verdict}</b></td><td>{html.escape(c.reason)}</td></tr>"
        for c in verdict.checks
    )
    head = (f"<h4>candidate {html.escape(verdict.label)}: "
            f"{'passed' if verdict.passed else 'rejected'}</h4>" if heading else "")
    return (f"{head}<table><tr><th>check</th><th>measures</th><th>value</th><th>threshold</th>"
            f"<th>verdict</th><th>detail</th></tr>{rows}</table>")


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


def _min_accuracy(report: EvaluationReport, name: str, t: float, cfg: GateConfig) -> GateCheck:
    return _compare("min_accuracy", f"candidate ({name}) accuracy", report.models[name].accuracy,
                    t, ">=", "no candidate accuracy")


def _max_drop_vs_teacher(report: EvaluationReport, name: str, t: float, cfg: GateConfig
                         ) -> GateCheck:
    drop = report.models["teacher"].accuracy - report.models[name].accuracy
    return _compare("max_drop_vs_teacher", "teacher accuracy - candidate accuracy", drop, t,
                    "<=", "no teacher accuracy")


def _min_gain_vs_production(report: EvaluationReport, name: str, t: float, cfg: GateConfig
                            ) -> GateCheck:
    check, desc = "min_gain_vs_production", "candidate accuracy - production accuracy"
    prod = report.production.evaluation
    if prod is None:
        return GateCheck(name=check, description=desc, value=None, threshold=t, comparison=">=",
                         verdict="skipped", reason=f"skipped: {report.production.reason}")
    return _compare(check, desc, report.models[name].accuracy - prod.accuracy, t, ">=", "")


def _max_latency_ms(report: EvaluationReport, name: str, t: float, cfg: GateConfig) -> GateCheck:
    lat = report.models[name].latency_at(1)
    return _compare("max_latency_ms", "ONNX Runtime p50 latency at batch 1 (ms)",
                    None if lat is None else lat.p50_ms, t, "<=",
                    "no batch-1 latency (add 1 to evaluate.latency_batch_sizes)")


def _max_onnx_mb(report: EvaluationReport, name: str, t: float, cfg: GateConfig) -> GateCheck:
    size = report.models[name].size_bytes
    return _compare("max_onnx_mb", "ONNX file size (MB = 10^6 bytes)",
                    None if size is None else size / 1e6, t, "<=", "no ONNX file size")


def _max_parity_error(report: EvaluationReport, name: str, t: float, cfg: GateConfig
                      ) -> GateCheck:
    source = "" if name == CANDIDATE else " (of its FP32 source)"
    return _compare("max_parity_error", f"max |ONNX Runtime - pruned PyTorch| output{source}",
                    report.parity_max_abs_diff, t, "<=", "no parity measurement")


def _min_agreement(report: EvaluationReport, name: str, t: float, cfg: GateConfig
                   ) -> GateCheck | None:
    if name == CANDIDATE:
        return None  # the FP32 model is the reference the others agree with
    return _compare("min_agreement", "fraction of samples with the FP32 model's argmax",
                    report.models[name].agreement, t, ">=", "no agreement with FP32 measured")


def _min_compression(report: EvaluationReport, name: str, t: float, cfg: GateConfig
                     ) -> GateCheck:
    metric = cfg.compression_metric
    return _compare("min_compression", f"teacher / candidate {metric}",
                    report.compression(metric, name), t, ">=",
                    f"{metric} of the teacher or the candidate unknown")


_CHECKS: dict[str, Callable[[EvaluationReport, str, float, GateConfig], GateCheck | None]] = {
    "min_accuracy": _min_accuracy,
    "max_drop_vs_teacher": _max_drop_vs_teacher,
    "min_gain_vs_production": _min_gain_vs_production,
    "max_latency_ms": _max_latency_ms,
    "max_onnx_mb": _max_onnx_mb,
    "max_parity_error": _max_parity_error,
    "min_agreement": _min_agreement,
    "min_compression": _min_compression,
}


def _verdict(report: EvaluationReport, name: str, cfg: GateConfig) -> CandidateVerdict:
    checks = []
    for check_name, check in _CHECKS.items():
        threshold = getattr(cfg, check_name)
        found = None if threshold is None else check(report, name, float(threshold), cfg)
        if found is not None:
            checks.append(found)
    return CandidateVerdict(name=name, precision=report.models[name].precision or "fp32",
                            passed=all(c.verdict != "fail" for c in checks), checks=checks)


def _p50_b1(report: EvaluationReport, name: str) -> float:
    lat = report.models[name].latency_at(1)
    return float("inf") if lat is None else lat.p50_ms


def choose(report: EvaluationReport, passing: list[str], cfg: GateConfig
           ) -> tuple[str | None, str]:
    """The candidate ``cfg.prefer`` picks among ``passing`` (report order = tie-break
    order, FP32 first), and why; ``(None, reason)`` when none passed."""
    if not passing:
        return None, "no candidate passed every check"
    models = report.models
    if len(passing) == 1:
        return passing[0], f"{passing[0]} is the only candidate that passed"
    if cfg.prefer == "most_accurate":
        best = max(passing, key=lambda n: models[n].accuracy)  # max keeps the first of ties
        return best, f"most accurate: {_listing(report, passing, 'accuracy')}"
    if cfg.prefer == "smallest":
        best = min(passing, key=lambda n: models[n].size_bytes or float("inf"))
        return best, f"smallest .onnx file: {_listing(report, passing, 'size')}"
    top = max(models[n].accuracy for n in passing)
    pool = [n for n in passing if models[n].accuracy >= top - cfg.prefer_tolerance - TOLERANCE]
    if any(models[n].latency_at(1) is None for n in pool):
        best = max(pool, key=lambda n: models[n].accuracy)
        return best, ("no batch-1 latency measured (add 1 to evaluate.latency_batch_sizes): "
                      f"the most accurate instead: {_listing(report, pool, 'accuracy')}")
    best = min(pool, key=lambda n: _p50_b1(report, n))
    left = [n for n in passing if n not in pool]
    outside = (f"; outside the tolerance: {_listing(report, left, 'accuracy')}" if left else "")
    return best, (f"fastest p50 at batch 1 among the passing candidates within "
                  f"{cfg.prefer_tolerance:g} of the most accurate ({top:.4f}): "
                  f"{_listing(report, pool, 'latency')}{outside}")


def _listing(report: EvaluationReport, names: list[str], what: str) -> str:
    def one(n: str) -> str:
        ev = report.models[n]
        if what == "latency":
            return f"{n} {_p50_b1(report, n):.3g} ms (accuracy {ev.accuracy:.4f})"
        if what == "size":
            return f"{n} {(ev.size_bytes or 0) / 1e6:.3f} MB"
        return f"{n} {ev.accuracy:.4f}"

    return ", ".join(one(n) for n in names)


def decide(report: EvaluationReport, cfg: GateConfig) -> GateDecision:
    """Run every enabled check on every candidate of ``report`` and choose one.

    Args:
        report: the evaluation of the candidates, the teacher and production.
        cfg: thresholds (a ``None`` threshold disables its check) and ``prefer``.

    Returns:
        The decision: ``passed`` when at least one candidate passed (skipped checks do not
        fail it), ``chosen`` the one ``cfg.prefer`` picks, every candidate's table in
        ``candidates`` and the deciding table (chosen, else FP32) in ``checks``.
    """
    verdicts = [_verdict(report, name, cfg) for name in report.candidates]
    chosen, why = choose(report, [v.name for v in verdicts if v.passed], cfg)
    deciding = next(v for v in verdicts if v.name == (chosen or CANDIDATE))
    disabled = [name for name in _CHECKS if getattr(cfg, name) is None]
    return GateDecision(passed=chosen is not None, checks=deciding.checks, disabled=disabled,
                        candidates=verdicts, chosen=chosen, prefer=cfg.prefer, choice=why)
