"""The model card of one run's candidate: typed facts, and their one-paragraph summary.

Every run writes one, for a promoted candidate and for a rejected one alike: what data it
learned from (source, fingerprint, split sizes, classes), where it came from (teacher,
teacher assistants, pruning, quantisation, the ZenML run and model version, the MLflow
run and registered version), how it did (accuracy overall and per class, size, latency,
and the CPU the latency was measured on), what the gate said, and what it is for (the
``license``, ``use_cases`` and ``limitations`` of the run config's ZenML ``model:``
section). :func:`build_card` collects the facts; :mod:`kdpipe.model_card_view` renders
them as Markdown and HTML. Core code: no zenml (the step passes ZenML's names in).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from kdpipe import __version__ as KDPIPE_VERSION
from kdpipe.config import DistillConfig, PruneConfig, QuantizeConfig, StudentConfig, TeacherConfig
from kdpipe.cpu import CpuFeatures, cpu_features
from kdpipe.eval_report import CANDIDATE, EvaluationReport, ModelEvaluation
from kdpipe.frontier import FrontierPoint, frontier_points

if TYPE_CHECKING:
    from kdpipe.data import DatasetSpec
    from kdpipe.gate import GateDecision
    from kdpipe.promotion import PromotionResult

__all__ = ["CpuFacts", "DataFacts", "GateRow", "IntendedUse", "Lineage", "ModelCard",
           "build_card", "build_lineage"]

NOT_STATED = "not stated in the run config's `model:` section"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuFacts(_Frozen):
    """The machine the latencies were measured on (the evaluation step's host)."""

    model_name: str
    machine: str
    logical_cpus: int
    torch_threads: int
    """PyTorch's intra-op threads; ONNX Runtime used its default (one per physical core)."""
    vnni: bool
    avx512: bool

    @classmethod
    def of(cls, features: CpuFeatures, *, logical_cpus: int, torch_threads: int) -> CpuFacts:
        return cls(model_name=features.model_name or "unknown CPU", machine=features.machine,
                   logical_cpus=logical_cpus, torch_threads=torch_threads,
                   vnni=features.has_vnni, avx512="avx512f" in features.flags)

    @classmethod
    def here(cls) -> CpuFacts:
        """This process's CPU, CPU count (affinity) and PyTorch thread count."""
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return cls.of(cpu_features(), logical_cpus=cpus or 1, torch_threads=torch.get_num_threads())

    def describe(self) -> str:
        isa = ", ".join(f"{name} {'yes' if ok else 'no'}"
                        for name, ok in (("AVX-512", self.avx512), ("VNNI", self.vnni)))
        return (f"{self.model_name} ({self.machine}), {self.logical_cpus} logical CPUs, "
                f"PyTorch {self.torch_threads} threads, ONNX Runtime default threads; {isa}")


class DataFacts(_Frozen):
    source: str
    fingerprint: str
    split_sizes: dict[str, int]
    classes: list[str]
    input_shape: tuple[int, int, int]

    @classmethod
    def of(cls, spec: DatasetSpec) -> DataFacts:
        return cls(source=spec.config.source, fingerprint=spec.fingerprint,
                   split_sizes=dict(spec.split_sizes), classes=list(spec.classes),
                   input_shape=tuple(spec.input_shape))


class Lineage(_Frozen):
    """Where the candidate came from; None: not known in this run."""

    teacher: str
    assistants: list[str] = []
    student: str
    pruning: str
    quantization: str
    zenml_pipeline_run: str | None = None
    zenml_model: str | None = None
    zenml_model_version: str | None = None
    mlflow_experiment: str | None = None
    mlflow_run_id: str | None = None
    registered_model: str | None = None
    mlflow_version: str | None = None
    """The registered version (only when promoted)."""


class IntendedUse(_Frozen):
    """ZenML ``Model`` fields of the run config's ``model:`` section."""

    license: str | None = None
    use_cases: str | None = None
    limitations: str | None = None


class GateRow(_Frozen):
    check: str
    description: str
    value: float | None
    threshold: float
    comparison: str
    verdict: str
    reason: str


class ModelCard(_Frozen):
    """Everything the card says; JSON-serialisable (the ``model_card`` artifact)."""

    model_name: str
    version: str | None
    candidate: str
    """The ``report.models`` key of the model the gate judged."""
    promoted: bool
    outcome: str
    """The promotion's one-line summary."""
    split: str
    data: DataFacts
    lineage: Lineage
    models: dict[str, ModelEvaluation]
    frontier: list[FrontierPoint]
    gate_passed: bool
    gate: list[GateRow]
    """The judged candidate's checks."""
    other_candidates: dict[str, list[GateRow]] = {}
    """Every other candidate's checks (e.g. the INT8 model beside FP32), by label."""
    choice: str = ""
    """Why the gate chose the judged candidate among those that passed."""
    gate_disabled: list[str] = []
    cpu: CpuFacts
    intended_use: IntendedUse
    kdpipe_version: str = KDPIPE_VERSION

    @property
    def candidate_eval(self) -> ModelEvaluation:
        return self.models[self.candidate]

    def summary(self) -> str:
        """One paragraph: what it is, what it learned from, how it does, what happened."""
        ev, lin = self.candidate_eval, self.lineage
        who = f"{self.model_name}" + (f" version {self.version}" if self.version else "")
        chain = lin.teacher + (f" through teacher assistant(s) {' → '.join(lin.assistants)}"
                               if lin.assistants else "")
        teacher = self.models.get("teacher")
        vs = f" (teacher {teacher.accuracy:.2%})" if teacher is not None else ""
        lat = ev.latency_at(1)
        speed = (f", {lat.p50_ms:.3g} ms p50 at batch 1 in {ev.runtime}" if lat else "")
        size = f", {ev.size_bytes / 1e6:.3g} MB" if ev.size_bytes is not None else ""
        verdict = ("The gate passed and it was promoted"
                   + (f" (MLflow version {lin.mlflow_version} of {lin.registered_model}, "
                      "alias champion)" if lin.mlflow_version else "")
                   if self.promoted else f"Not promoted: {self.outcome}")
        return (f"{who}: a {lin.student} student ({self.candidate}; {lin.pruning}; "
                f"{lin.quantization}) distilled from {chain} on {self.data.source} "
                f"({len(self.data.classes)} classes, data fingerprint "
                f"{self.data.fingerprint[:12]}). {ev.accuracy:.2%} accuracy on the "
                f"{ev.num_samples} {self.split} samples{vs}{speed}{size}, measured on "
                f"{self.cpu.model_name}. {verdict}.")


# ------------------------------------------------------------------------- builders
def _model_text(student: StudentConfig) -> str:
    return student.model.arch + (f" {student.model.kwargs}" if student.model.kwargs else "")


def _teacher_text(teacher: TeacherConfig) -> str:
    if teacher.onnx:
        return f"ONNX teacher {os.path.basename(teacher.onnx)}"
    return teacher.model.arch + (f" {teacher.model.kwargs}" if teacher.model.kwargs else "")


def _pruning_text(prune: PruneConfig, report: EvaluationReport) -> str:
    if not prune.enabled:
        return "not pruned"
    before, after = report.models.get("student"), report.models.get("pruned_student")
    counts = ""
    if before and after and before.params and after.params:
        counts = f", {before.params:,} → {after.params:,} params"
    rounding = f", round_to {prune.round_to}" if prune.round_to else ""
    return f"pruned ({prune.importance}, ratio {prune.ratio}{rounding}{counts})"


def _quantization_text(quantize: QuantizeConfig | None, report: EvaluationReport) -> str:
    int8 = [k for k, ev in report.models.items() if ev.runtime == "onnxruntime" and k != CANDIDATE]
    if quantize is None or not quantize.enabled:
        return "FP32, not quantised"
    return (f"INT8 candidate(s) {', '.join(int8) or 'none evaluated'}: {quantize.format}, "
            f"activations {quantize.activation_type}, weights {quantize.weight_type}, "
            f"{'per-channel' if quantize.per_channel else 'per-tensor'}, "
            f"{quantize.calibration_method} calibration on {quantize.calibration_size} samples")


def build_lineage(*, teacher: TeacherConfig, student: StudentConfig, distill: DistillConfig,
                  prune: PruneConfig, quantize: QuantizeConfig | None,
                  report: EvaluationReport, ids: Mapping[str, str | None]) -> Lineage:
    """The lineage from the run's config sections and ``ids`` (Lineage's id fields:
    ``zenml_pipeline_run``, ``mlflow_run_id``, ...; unknown keys are an error)."""
    return Lineage(teacher=_teacher_text(teacher),
                   assistants=[_model_text(a) for a in distill.assistants],
                   student=_model_text(student), pruning=_pruning_text(prune, report),
                   quantization=_quantization_text(quantize, report), **ids)


def build_card(*, model_name: str, version: str | None, report: EvaluationReport,
               dataset: DatasetSpec, decision: GateDecision, promotion: PromotionResult,
               lineage: Lineage, intended_use: IntendedUse, cpu: CpuFacts | None = None,
               candidate: str | None = None) -> ModelCard:
    """The card of ``candidate`` (a ``report.models`` key; default: the one the gate decided
    on, ``decision.promote``), promoted or not.

    Raises:
        ValueError: ``candidate`` is not in the report, or the report was made on other
            data than ``dataset`` (fingerprints differ).
    """
    candidate = candidate or decision.promote
    if candidate not in report.models:
        raise ValueError(f"candidate {candidate!r} is not in the evaluation report "
                         f"(models: {', '.join(report.models)})")
    if report.dataset_fingerprint != dataset.fingerprint:
        raise ValueError(f"the evaluation report is of data {report.dataset_fingerprint[:12]} "
                         f"but the dataset is {dataset.fingerprint[:12]}: pass this run's own")
    if promotion.promoted:
        lineage = lineage.model_copy(update={"mlflow_version": promotion.mlflow_version,
                                             "registered_model": promotion.registered_model})
    rows = _gate_rows(decision.checks)
    others = {v.label: _gate_rows(v.checks) for v in decision.candidates if v.name != candidate}
    return ModelCard(
        model_name=model_name, version=version, candidate=candidate,
        promoted=promotion.promoted, outcome=promotion.summary(), split=report.split,
        data=DataFacts.of(dataset), lineage=lineage, models=dict(report.models),
        frontier=frontier_points(report, promoted=candidate if promotion.promoted else None),
        gate_passed=decision.passed, gate=rows, other_candidates=others, choice=decision.choice,
        gate_disabled=list(decision.disabled),
        cpu=cpu or CpuFacts.here(), intended_use=intended_use)


def _gate_rows(checks: Sequence[Any]) -> list[GateRow]:
    """A gate table as the card's rows."""
    return [GateRow(check=c.name, description=c.description, value=c.value,
                    threshold=c.threshold, comparison=c.comparison, verdict=c.verdict,
                    reason=c.reason) for c in checks]
