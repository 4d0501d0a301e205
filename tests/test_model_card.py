"""The model card's facts and renderings on a hand-made run (no training, no ZenML):
the numbers it prints are the report's, Markdown and HTML say the same, text is escaped,
bad input is refused, and the MLflow side fails with a message naming the fix."""

from __future__ import annotations

import re

import pytest

from kdpipe.card_doc import Table, to_html, to_markdown
from kdpipe.config import (
    DataConfig,
    DistillConfig,
    GateConfig,
    PruneConfig,
    QuantizeConfig,
    StudentConfig,
    TeacherConfig,
)
from kdpipe.cpu import CpuFeatures
from kdpipe.data import DatasetSpec
from kdpipe.gate import decide
from kdpipe.model_card import (
    NOT_STATED,
    CpuFacts,
    IntendedUse,
    ModelCard,
    build_card,
    build_lineage,
)
from kdpipe.model_card_view import card_html, card_markdown
from kdpipe.promotion import PromotionResult
from tests.test_frontier import report

CLASSES = ["zero", "a|b <tag>"]  # a pipe and markup: must be escaped, not rendered
CPU = CpuFacts.of(CpuFeatures(machine="x86_64", model_name="Test CPU 9000",
                              flags=frozenset({"avx512f", "avx512_vnni"})),
                  logical_cpus=2, torch_threads=2)


def dataset(fingerprint: str = "f" * 64) -> DatasetSpec:
    return DatasetSpec(config=DataConfig(source="digits"), classes=CLASSES, input_shape=(1, 8, 8),
                       mean=(0.3,), std=(0.2,), split_sizes={"train": 900, "val": 200, "test": 5},
                       fingerprint=fingerprint)


def promotion(promoted: bool) -> PromotionResult:
    if promoted:
        return PromotionResult(promoted=True, model_version="4", registered_model="reg",
                               mlflow_version="2", reasons=["the gate passed"])
    return PromotionResult(promoted=False, model_version="4", registered_model="reg",
                           reasons=["min_accuracy: 0.92 < 0.99"])


def card(*, promoted: bool = True, use: IntendedUse | None = None,
         quantize: QuantizeConfig | None = None) -> ModelCard:
    rep = report().model_copy(update={"classes": CLASSES})
    gate = GateConfig(min_accuracy=0.9 if promoted else 0.99, max_drop_vs_teacher=0.1,
                      max_parity_error=1e-3,
                      min_compression=None)
    lineage = build_lineage(
        teacher=TeacherConfig(), student=StudentConfig(), prune=PruneConfig(round_to=16),
        distill=DistillConfig(assistants=(StudentConfig(),)), quantize=quantize, report=rep,
        ids={"zenml_pipeline_run": "run-1", "mlflow_run_id": "abc123"})
    return build_card(model_name="kdpipe-x", version="4", report=rep, dataset=dataset(),
                      decision=decide(rep, gate), promotion=promotion(promoted),
                      lineage=lineage, cpu=CPU,
                      intended_use=use or IntendedUse(license="Apache-2.0",
                                                      use_cases="digit reading",
                                                      limitations="8x8 digits only"))


def test_the_card_states_the_reports_numbers_and_the_lineage() -> None:
    c = card()
    md = card_markdown(c)
    rep = report()
    assert f"{rep.models['onnx'].accuracy:.4f}" in md  # 0.9200
    assert f"{rep.models['teacher'].accuracy:.4f}" in md
    assert "| onnx (candidate) | onnxruntime | 0.9200 | 100 | 1,000 | 0.002 | 0.3 / 0.36 |" in md
    assert "distilled from cnn_large through teacher assistant(s) cnn_small on digits" in md
    assert "**teacher assistants**: cnn_small" in md
    assert "pruned (l2, ratio 0.5, round_to 16, 100 → 100 params)" in md
    assert "FP32, not quantised" in md
    assert "pipeline run run-1" in md and "run abc123" in md
    assert "reg version 2 (alias champion)" in md
    assert "Test CPU 9000 (x86_64), 2 logical CPUs" in md and "AVX-512 yes, VNNI yes" in md
    assert "**license**: Apache-2.0" in md and "**limitations**: 8x8 digits only" in md
    assert "![accuracy vs latency](frontier.png)" in md
    assert "onnx_int8" in md  # another candidate's row appears without being named in code
    # per-class: one row per class, None shown as a dash
    assert re.search(r"\| a\\\|b &lt;tag> \| – \| – \| – \| – \| – \|", md), md
    assert "<tag>" not in md  # text, not HTML, for a Markdown renderer


def test_summary_paragraph_for_promoted_and_rejected() -> None:
    s = card().summary()
    assert s.startswith("kdpipe-x version 4: a cnn_small student (onnx;")
    assert "92.00% accuracy on the 5 test samples (teacher 97.00%)" in s
    assert "0.3 ms p50 at batch 1 in onnxruntime" in s and "Test CPU 9000" in s
    assert s.endswith("promoted (MLflow version 2 of reg, alias champion).")
    rejected = card(promoted=False)
    assert "Not promoted: not promoted: model version 4 (min_accuracy: 0.92 < 0.99)" \
        in rejected.summary()
    assert rejected.lineage.mlflow_version is None
    assert "NOT PROMOTED" in card_markdown(rejected) and "REJECTED" in card_markdown(rejected)
    assert not any(p.promoted for p in rejected.frontier)


def test_gate_table_has_one_row_per_enabled_check() -> None:
    md = card_markdown(card(promoted=False))
    gate = md.split("## Gate", 1)[1]
    assert "| min_accuracy | candidate (onnx) accuracy | 0.92 | >= 0.99 | fail |" in gate
    assert "| max_parity_error |" in gate and "Disabled checks: " in gate
    assert "min_compression" in gate.split("Disabled checks: ", 1)[1]


def test_html_matches_markdown_escapes_and_embeds_the_figure() -> None:
    page = card_html(card())
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<?xml" not in page
    assert "a|b &lt;tag&gt;" in page and "<tag>" not in page
    assert "0.9200" in page and "Apache-2.0" in page and "Test CPU 9000" in page
    assert "tr class='fail'" not in page and "<tr class='pass'>" in page


def test_missing_intended_use_is_said_not_invented() -> None:
    md = card_markdown(card(use=IntendedUse()))
    assert md.count(NOT_STATED) == 3


def test_quantisation_settings_are_stated_when_enabled() -> None:
    md = card_markdown(card(quantize=QuantizeConfig(enabled=True, per_channel=False)))
    assert "INT8 candidate(s) onnx_int8: auto, activations auto, weights auto, per-tensor, " \
           "minmax calibration on 512 samples" in md


def test_card_round_trips_through_json() -> None:
    c = card()
    assert ModelCard.model_validate_json(c.model_dump_json()) == c


def test_bad_input_is_refused_naming_the_problem() -> None:
    rep = report()
    kwargs = dict(model_name="m", version="1", report=rep, decision=decide(rep, GateConfig()),
                  promotion=promotion(False), cpu=CPU, intended_use=IntendedUse(),
                  lineage=build_lineage(teacher=TeacherConfig(), student=StudentConfig(),
                                        distill=DistillConfig(), prune=PruneConfig(),
                                        quantize=None, report=rep, ids={}))
    with pytest.raises(ValueError, match="candidate 'onnx_fp16' is not in the evaluation report"):
        build_card(dataset=dataset(), candidate="onnx_fp16", **kwargs)
    with pytest.raises(ValueError, match="report is of data ffffffffffff but the dataset is "
                                         "000000000000"):
        build_card(dataset=dataset("0" * 64), **kwargs)
    with pytest.raises(ValueError, match="mlflow_run"):  # a misspelt id is not dropped
        build_lineage(teacher=TeacherConfig(), student=StudentConfig(), distill=DistillConfig(),
                      prune=PruneConfig(), quantize=None, report=rep, ids={"mlflow_run": "x"})


def test_document_renderers_escape_each_format() -> None:
    t = Table(("a", "b"), (("x|y", "<b>"),), right=frozenset({1}), row_classes=("fail",))
    assert "| x\\|y | &lt;b> |" in to_markdown([t]) and "|---|---:|" in to_markdown([t])
    page = to_html([t], title="<t>")
    assert "<title>&lt;t&gt;</title>" in page and "<td class='r'>&lt;b&gt;</td>" in page
    assert "<tr class='fail'>" in page


def test_mlflow_side_needs_a_run_and_names_a_missing_version() -> None:
    from kdpipe.card_publish import describe_version, log_card
    from kdpipe.tracking import TrackingError

    with pytest.raises(TrackingError, match="inside `with pipeline_run"):
        log_card(card())
    with pytest.raises(TrackingError, match="could not describe version 9 of registered model "
                                            "'no-such-model'"):
        describe_version("no-such-model", "9", "text")


def test_card_of_the_chosen_int8_candidate_shows_both_tables_and_the_choice() -> None:
    from tests.test_gate import with_int8

    base = report().model_copy(update={"classes": CLASSES})
    fp32 = base.models["onnx"]
    rep = with_int8(base, accuracy=fp32.accuracy, p50_b1=0.001, size_bytes=10)
    decision = decide(rep, GateConfig(min_accuracy=0.5, max_drop_vs_teacher=None,
                                      max_parity_error=None, min_compression=None,
                                      min_gain_vs_production=None, min_agreement=None))
    assert decision.chosen == "onnx_int8"
    lineage = build_lineage(teacher=TeacherConfig(), student=StudentConfig(),
                            prune=PruneConfig(), distill=DistillConfig(), quantize=QuantizeConfig(),
                            report=rep, ids={})
    built = build_card(model_name="m", version="1", report=rep, dataset=dataset(),
                       decision=decision, promotion=promotion(True), lineage=lineage, cpu=CPU,
                       intended_use=IntendedUse())
    assert built.candidate == "onnx_int8"
    assert list(built.other_candidates) == ["onnx (FP32)"]
    gate = card_markdown(built).split("## Gate", 1)[1]
    assert "Choice among candidates: " in gate and "onnx_int8" in gate
    assert gate.count("| check | measures |") == 2  # the chosen table and the FP32 one
