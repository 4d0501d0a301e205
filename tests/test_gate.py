"""The gate is a pure function: every check's pass, fail and boundary, and the whole."""

from __future__ import annotations

import json

import pytest

from kdpipe.config import GateConfig
from kdpipe.evaluation import (
    EvaluationReport,
    LatencyStats,
    ModelEvaluation,
    ProductionComparison,
)
from kdpipe.gate import GateDecision, decide

ALL_OFF = {k: None for k in ("min_accuracy", "max_drop_vs_teacher", "min_gain_vs_production",
                             "max_latency_ms", "max_onnx_mb", "max_parity_error",
                             "min_compression")}


def _model(name: str, accuracy: float, *, params: int = 1000, macs: int = 10_000,
           size_bytes: int | None = None, p50_b1: float | None = None) -> ModelEvaluation:
    latency = [] if p50_b1 is None else [
        LatencyStats(batch_size=1, p50_ms=p50_b1, p95_ms=p50_b1 * 1.5, mean_ms=p50_b1),
        LatencyStats(batch_size=64, p50_ms=p50_b1 * 20, p95_ms=p50_b1 * 30, mean_ms=p50_b1 * 20),
    ]
    return ModelEvaluation(name=name, runtime="onnxruntime" if name in {"onnx", "production"}
                           else "pytorch", accuracy=accuracy, per_class_accuracy=[accuracy] * 2,
                           confusion=[[1, 0], [0, 1]], num_samples=100, params=params,
                           macs=macs, size_bytes=size_bytes, latency=latency)


def make_report(*, candidate: float = 0.92, teacher: float = 0.95,
                production: float | None = None, production_reason: str = "no production model",
                teacher_params: int = 10_000, candidate_params: int = 1_000,
                teacher_macs: int = 1_000_000, candidate_macs: int = 250_000,
                onnx_bytes: int | None = 2_000_000, p50_b1: float | None = 1.5,
                parity: float = 1e-5) -> EvaluationReport:
    """A report with the given headline numbers (everything else consistent and dull)."""
    prod = (ProductionComparison(status="absent", reason=production_reason)
            if production is None else
            ProductionComparison(status="evaluated", reason="evaluated", version="3",
                                 evaluation=_model("production", production)))
    return EvaluationReport(
        split="test", classes=["a", "b"], input_shape=(1, 8, 8), dataset_fingerprint="f" * 64,
        models={
            "teacher": _model("teacher", teacher, params=teacher_params, macs=teacher_macs),
            "student": _model("student", candidate, params=candidate_params * 2,
                              macs=candidate_macs * 2),
            "pruned_student": _model("pruned_student", candidate, params=candidate_params,
                                     macs=candidate_macs),
            "onnx": _model("onnx", candidate, params=candidate_params, macs=candidate_macs,
                           size_bytes=onnx_bytes, p50_b1=p50_b1),
        },
        parity_max_abs_diff=parity, production=prod)


def only(**enabled: object) -> GateConfig:
    """A config with every check off except the given ones."""
    return GateConfig(**{**ALL_OFF, **enabled})


def check(decision: GateDecision, name: str):
    (found,) = [c for c in decision.checks if c.name == name]
    return found


# ------------------------------------------------------------------ each check
# (name, config, report kwargs, expected verdict, expected value)
CASES = [
    # min_accuracy: candidate accuracy >= threshold
    ("min_accuracy", {"min_accuracy": 0.9}, {"candidate": 0.93}, "pass", 0.93),
    ("min_accuracy", {"min_accuracy": 0.9}, {"candidate": 0.89}, "fail", 0.89),
    ("min_accuracy", {"min_accuracy": 0.9}, {"candidate": 0.9}, "pass", 0.9),
    # max_drop_vs_teacher: teacher - candidate <= threshold
    ("max_drop_vs_teacher", {"max_drop_vs_teacher": 0.03}, {"teacher": 0.95, "candidate": 0.94},
     "pass", 0.01),
    ("max_drop_vs_teacher", {"max_drop_vs_teacher": 0.03}, {"teacher": 0.95, "candidate": 0.91},
     "fail", 0.04),
    # 0.93 - 0.90 = 0.030000000000000027 in floating point: still a boundary pass
    ("max_drop_vs_teacher", {"max_drop_vs_teacher": 0.03}, {"teacher": 0.93, "candidate": 0.90},
     "pass", 0.03),
    # a candidate better than its teacher has a negative drop
    ("max_drop_vs_teacher", {"max_drop_vs_teacher": 0.0}, {"teacher": 0.90, "candidate": 0.92},
     "pass", -0.02),
    # min_gain_vs_production: candidate - production >= threshold (negative = tolerance)
    ("min_gain_vs_production", {"min_gain_vs_production": -0.005},
     {"candidate": 0.92, "production": 0.921}, "pass", -0.001),
    ("min_gain_vs_production", {"min_gain_vs_production": -0.005},
     {"candidate": 0.91, "production": 0.92}, "fail", -0.01),
    ("min_gain_vs_production", {"min_gain_vs_production": 0.01},
     {"candidate": 0.93, "production": 0.92}, "pass", 0.01),
    ("min_gain_vs_production", {"min_gain_vs_production": 0.01},
     {"candidate": 0.925, "production": 0.92}, "fail", 0.005),
    # 0.94 - 0.93 = 0.009999999999999898: a boundary pass thanks to the tolerance
    ("min_gain_vs_production", {"min_gain_vs_production": 0.01},
     {"candidate": 0.94, "production": 0.93}, "pass", 0.01),
    # max_latency_ms: ONNX p50 at batch 1 <= threshold
    ("max_latency_ms", {"max_latency_ms": 2.0}, {"p50_b1": 1.5}, "pass", 1.5),
    ("max_latency_ms", {"max_latency_ms": 2.0}, {"p50_b1": 2.5}, "fail", 2.5),
    ("max_latency_ms", {"max_latency_ms": 2.0}, {"p50_b1": 2.0}, "pass", 2.0),
    # max_onnx_mb: file size / 1e6 <= threshold
    ("max_onnx_mb", {"max_onnx_mb": 2.0}, {"onnx_bytes": 1_500_000}, "pass", 1.5),
    ("max_onnx_mb", {"max_onnx_mb": 2.0}, {"onnx_bytes": 2_000_001}, "fail", 2.000001),
    ("max_onnx_mb", {"max_onnx_mb": 2.0}, {"onnx_bytes": 2_000_000}, "pass", 2.0),
    # max_parity_error: max abs diff <= threshold
    ("max_parity_error", {"max_parity_error": 1e-3}, {"parity": 2e-6}, "pass", 2e-6),
    ("max_parity_error", {"max_parity_error": 1e-3}, {"parity": 5e-3}, "fail", 5e-3),
    ("max_parity_error", {"max_parity_error": 1e-3}, {"parity": 1e-3}, "pass", 1e-3),
    # min_compression on params: teacher / candidate params >= threshold
    ("min_compression", {"min_compression": 5.0}, {"teacher_params": 10_000,
                                                   "candidate_params": 1_000}, "pass", 10.0),
    ("min_compression", {"min_compression": 5.0}, {"teacher_params": 10_000,
                                                   "candidate_params": 2_500}, "fail", 4.0),
    ("min_compression", {"min_compression": 5.0}, {"teacher_params": 10_000,
                                                   "candidate_params": 2_000}, "pass", 5.0),
    # min_compression on MACs
    ("min_compression", {"min_compression": 4.0, "compression_metric": "macs"},
     {"teacher_macs": 1_000_000, "candidate_macs": 250_000}, "pass", 4.0),
    ("min_compression", {"min_compression": 4.0, "compression_metric": "macs"},
     {"teacher_macs": 1_000_000, "candidate_macs": 400_000}, "fail", 2.5),
]


@pytest.mark.parametrize(("name", "cfg", "report_kwargs", "verdict", "value"), CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_each_check(name: str, cfg: dict, report_kwargs: dict, verdict: str, value: float) -> None:
    decision = decide(make_report(**report_kwargs), only(**cfg))
    c = check(decision, name)
    assert c.verdict == verdict, c.reason
    assert c.value == pytest.approx(value, abs=1e-9)
    assert c.threshold == pytest.approx(cfg[name])
    # with one check enabled, the whole gate follows it
    assert decision.passed is (verdict == "pass")
    assert [x.name for x in decision.checks] == [name]


def test_boundary_reason_reads_as_a_comparison() -> None:
    c = check(decide(make_report(candidate=0.89), only(min_accuracy=0.9)), "min_accuracy")
    assert c.reason == "0.89 < 0.9"
    c = check(decide(make_report(parity=1e-3), only(max_parity_error=1e-3)), "max_parity_error")
    assert c.reason == "0.001 <= 0.001"


def test_production_check_is_skipped_with_its_reason_when_no_production() -> None:
    decision = decide(make_report(production=None,
                                  production_reason="classes differ: ['a'] vs ['a', 'b']"),
                      only(min_gain_vs_production=0.0))
    c = check(decision, "min_gain_vs_production")
    assert c.verdict == "skipped"
    assert c.value is None
    assert c.reason == "skipped: classes differ: ['a'] vs ['a', 'b']"
    assert decision.passed is True  # a skipped check does not block the first promotion


def test_unmeasured_latency_fails_and_says_how_to_measure_it() -> None:
    c = check(decide(make_report(p50_b1=None), only(max_latency_ms=5.0)), "max_latency_ms")
    assert c.verdict == "fail"
    assert "latency_batch_sizes" in c.reason


def test_unknown_params_fail_compression() -> None:
    report = make_report()
    onnx = report.models["onnx"].model_copy(update={"params": None})
    report = report.model_copy(update={"models": {**report.models, "onnx": onnx}})
    c = check(decide(report, only(min_compression=2.0)), "min_compression")
    assert c.verdict == "fail"
    assert c.reason.startswith("not measured")


def test_disabled_checks_are_listed_and_not_evaluated() -> None:
    decision = decide(make_report(candidate=0.1), only(max_parity_error=1e-3))
    assert decision.passed is True
    assert decision.disabled == ["min_accuracy", "max_drop_vs_teacher", "min_gain_vs_production",
                                 "max_latency_ms", "max_onnx_mb", "min_compression"]


def test_default_config_passes_a_good_candidate_and_lists_every_enabled_check() -> None:
    decision = decide(make_report(candidate=0.93, teacher=0.95, production=0.93), GateConfig())
    assert decision.passed is True, decision.summary()
    assert [c.name for c in decision.checks] == ["min_accuracy", "max_drop_vs_teacher",
                                                 "min_gain_vs_production", "max_parity_error",
                                                 "min_compression"]
    assert decision.disabled == ["max_latency_ms", "max_onnx_mb"]
    assert decision.reasons == []


def test_one_failing_check_rejects_and_is_named_in_the_reasons() -> None:
    decision = decide(make_report(candidate=0.93, teacher=0.95, parity=0.5), GateConfig())
    assert decision.passed is False
    assert decision.reasons == ["max_parity_error: 0.5 > 0.001"]
    assert [c.name for c in decision.failed_checks] == ["max_parity_error"]


def test_summary_metadata_and_html_show_every_check() -> None:
    decision = decide(make_report(candidate=0.85), GateConfig())
    text = decision.summary()
    assert text.splitlines()[0] == "gate: REJECTED"
    assert "[   FAIL] min_accuracy" in text
    assert "[SKIPPED] min_gain_vs_production" in text
    meta = decision.metadata()
    assert meta["gate_passed"] == 0
    assert meta["gate_failed"] == "min_accuracy, max_drop_vs_teacher"
    assert meta["gate_min_accuracy_value"] == pytest.approx(0.85)
    assert meta["gate_min_accuracy_threshold"] == pytest.approx(0.9)
    assert "gate_min_gain_vs_production_value" not in meta
    page = decision.to_html()
    for c in decision.checks:
        assert f"<td>{c.name}</td>" in page
    assert "REJECTED" in page


def test_decision_round_trips_through_json() -> None:
    decision = decide(make_report(), GateConfig())
    again = GateDecision.model_validate(json.loads(decision.model_dump_json()))
    assert again == decision


def test_report_metadata_and_html() -> None:
    report = make_report(production=0.9)
    meta = report.metadata()
    assert meta["onnx_accuracy"] == pytest.approx(0.92)
    assert meta["compression_params"] == pytest.approx(10.0)
    assert meta["compression_macs"] == pytest.approx(4.0)
    assert meta["onnx_p50_ms_b1"] == pytest.approx(1.5)
    assert meta["production_accuracy"] == pytest.approx(0.9)
    assert meta["production_status"] == "evaluated"
    page = report.to_html()
    assert page.count("<tr>") >= 5 + 1 + 3  # header + 5 models; confusion header + 2 rows
    assert "Confusion matrix" in page


# ------------------------------------------------------- candidates: FP32 and INT8
def with_int8(report: EvaluationReport, *, accuracy: float, p50_b1: float | None,
              size_bytes: int = 600_000, agreement: float | None = 0.998) -> EvaluationReport:
    """``report`` plus an INT8 candidate of the same model with the given numbers."""
    fp32 = report.models["onnx"]
    int8 = _model("onnx_int8", accuracy, params=fp32.params or 0, macs=fp32.macs or 0,
                  size_bytes=size_bytes, p50_b1=p50_b1).model_copy(
        update={"runtime": "onnxruntime", "precision": "int8", "agreement": agreement})
    fp32 = fp32.model_copy(update={"precision": "fp32"})
    return report.model_copy(update={"models": {**report.models, "onnx": fp32,
                                                "onnx_int8": int8}})


def test_fastest_promotes_a_faster_int8_within_the_tolerance() -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=1.5), accuracy=0.928, p50_b1=0.7)
    decision = decide(report, GateConfig(min_gain_vs_production=None))
    assert decision.passed and decision.chosen == "onnx_int8" == decision.promote
    assert [v.name for v in decision.candidates] == ["onnx", "onnx_int8"]
    assert all(v.passed for v in decision.candidates)
    assert "min_agreement" in [c.name for c in decision.checks]  # the INT8 table decides
    assert "onnx_int8 0.7 ms" in decision.choice and "onnx 1.5 ms" in decision.choice


def test_a_slower_int8_is_not_promoted_because_it_is_int8() -> None:
    # The default student's case: smaller and as accurate, but slower at batch 1.
    report = with_int8(make_report(candidate=0.93, p50_b1=0.20), accuracy=0.93, p50_b1=0.27)
    decision = decide(report, GateConfig(min_gain_vs_production=None))
    assert decision.chosen == "onnx"
    assert [c.name for c in decision.checks] == ["min_accuracy", "max_drop_vs_teacher",
                                                 "max_parity_error", "min_compression"]


def test_a_faster_int8_outside_the_tolerance_loses_to_the_more_accurate_fp32() -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=1.5), accuracy=0.926, p50_b1=0.5)
    decision = decide(report, GateConfig(min_gain_vs_production=None))  # 0.4 points > 0.3
    assert decision.chosen == "onnx"
    assert "outside the tolerance: onnx_int8 0.9260" in decision.choice
    wider = decide(report, GateConfig(min_gain_vs_production=None, prefer_tolerance=0.005))
    assert wider.chosen == "onnx_int8"


@pytest.mark.parametrize(("prefer", "int8_accuracy", "chosen"), [
    ("smallest", 0.925, "onnx_int8"),      # 0.6 MB vs 2 MB, whatever it costs in speed
    ("most_accurate", 0.93, "onnx"),       # a tie goes to FP32
    ("most_accurate", 0.931, "onnx_int8"),
])
def test_prefer_smallest_and_most_accurate(prefer: str, int8_accuracy: float, chosen: str) -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=1.0), accuracy=int8_accuracy,
                       p50_b1=3.0)
    decision = decide(report, GateConfig(min_gain_vs_production=None, prefer=prefer))
    assert decision.chosen == chosen, decision.choice
    assert decision.metadata()["gate_chosen"] == chosen


def test_an_int8_that_disagrees_with_fp32_fails_its_own_table_only() -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=1.5), accuracy=0.93, p50_b1=0.5,
                       agreement=0.95)
    decision = decide(report, GateConfig(min_gain_vs_production=None))
    fp32, int8 = decision.candidates
    assert fp32.passed and not int8.passed
    assert int8.reasons == ["min_agreement: 0.95 < 0.99"]
    assert decision.chosen == "onnx" and decision.passed


def test_no_passing_candidate_rejects_with_every_candidates_reasons() -> None:
    report = with_int8(make_report(candidate=0.85, p50_b1=1.5), accuracy=0.84, p50_b1=0.5)
    decision = decide(report, only(min_accuracy=0.9))
    assert not decision.passed and decision.chosen is None
    assert decision.reasons == ["onnx: min_accuracy: 0.85 < 0.9",
                                "onnx_int8: min_accuracy: 0.84 < 0.9"]
    assert decision.checks == decision.candidates[0].checks  # FP32's table when rejected


def test_summary_and_html_show_both_candidates_and_the_choice() -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=1.5), accuracy=0.93, p50_b1=0.6)
    decision = decide(report, GateConfig(min_gain_vs_production=None))
    text = decision.summary()
    assert text.splitlines()[0] == "gate: PASSED"
    assert " candidate onnx (FP32): passed" in text
    assert " candidate onnx_int8 (INT8): passed" in text
    assert "choice (fastest): fastest p50 at batch 1" in text
    page = decision.to_html()
    assert "candidate onnx_int8 (INT8)" in page and "promote onnx_int8" in page
    assert GateDecision.model_validate_json(decision.model_dump_json()) == decision


def test_fastest_without_a_batch_1_latency_takes_the_most_accurate() -> None:
    report = with_int8(make_report(candidate=0.93, p50_b1=None), accuracy=0.931, p50_b1=None)
    decision = decide(report, GateConfig(min_gain_vs_production=None))
    assert decision.chosen == "onnx_int8"
    assert decision.choice.startswith("no batch-1 latency measured")
