"""evaluate_models: every model, and the current production student, on the test split.

The production student is this ZenML model's version in stage ``production`` (its
``student_onnx`` artifact). Its evaluation is part of this step's output, so the cache key
includes *which* version is in production (:func:`production_state`): after a promotion
the next run re-evaluates instead of reusing a report that compares against the old one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from zenml import get_step_context, step
from zenml.client import Client
from zenml.config.cache_policy import CachePolicy
from zenml.enums import ModelStages
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.bundle import Bundle
from kdpipe.config import EvalConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from kdpipe.evaluation import INT8_CANDIDATE, EvaluationReport, ProductionCandidate
from kdpipe.evaluation import evaluate_models as evaluate
from kdpipe.export import ExportResult
from kdpipe.quantize_report import QuantizeOutcome
from steps.materializers import EvaluationReportMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)
ONNX_ARTIFACT = "student_onnx"


def production_state() -> str:
    """Cache-key part: the ids of every model version now in production (ZenML store).

    A cache function takes no arguments, so it cannot ask for *this* pipeline's model;
    covering all production versions is a superset: any promotion re-runs the evaluation
    once, nothing else does.
    """
    versions = Client().list_model_versions(stage=ModelStages.PRODUCTION, size=1000)
    return ",".join(sorted(str(v.id) for v in versions.items))


# The cache function is named by its import path: resolving the function object at import
# time would need ZenML's source root, which an interactive session does not have.
@step(output_materializers=EvaluationReportMaterializer,
      cache_policy=CachePolicy(cache_func=f"{__name__}.production_state"))
def evaluate_models(
    dataset: DatasetSpec,
    teacher: Bundle,
    student: Bundle,
    pruned_student: Bundle,
    student_onnx: ExportResult,
    evaluate_cfg: EvalConfig,
    tracking_cfg: TrackingConfig,
    student_onnx_int8: QuantizeOutcome | None = None,
) -> Annotated[EvaluationReport, "evaluation"]:
    """Accuracy, per-class accuracy, confusion, params, MACs, size, latency, parity.

    The INT8 candidate (``student_onnx_int8``, when quantize_onnx produced one) is
    measured like the FP32 one, plus its argmax agreement with it (``onnx_int8``). Also
    evaluates the production student when one exists and is compatible; otherwise the
    report says why not (the gate then skips its production check).
    """
    production, reason = load_production()
    int8 = None if student_onnx_int8 is None else student_onnx_int8.result
    report = evaluate(dataset, teacher, student, pruned_student, student_onnx.path,
                      evaluate_cfg, int8_path=None if int8 is None else int8.path,
                      production=production, production_reason=reason)
    with mlflow_run(tracking_cfg):
        tracking.log_metrics(report.metadata(), "eval")
    logger.info("candidate (ONNX) accuracy %.4f, teacher %.4f, parity %.2g; production: %s",
                report.candidate.accuracy, report.models["teacher"].accuracy,
                report.parity_max_abs_diff, report.production.reason)
    if INT8_CANDIDATE in report.models:
        ev = report.models[INT8_CANDIDATE]
        logger.info("INT8 candidate accuracy %.4f, argmax agreement with FP32 %.4f",
                    ev.accuracy, ev.agreement)
    return report


def load_production() -> tuple[ProductionCandidate | None, str]:
    """The production student of this pipeline's ZenML model, or None and the reason."""
    model = get_step_context().model
    if model is None:
        return None, "the pipeline has no ZenML model configured"
    try:
        version = Client().get_model_version(model.name, ModelStages.PRODUCTION)
    except KeyError:
        return None, "no production model"
    artifact = version.get_artifact(ONNX_ARTIFACT)
    if artifact is None:
        return None, f"production version {version.name} has no {ONNX_ARTIFACT!r} artifact"
    onnx: ExportResult = artifact.load()
    meta = onnx.metadata
    missing = [k for k in ("classes", "input_shape") if k not in meta]
    if missing:
        return None, f"production version {version.name}'s ONNX metadata lacks {missing}"
    return ProductionCandidate(onnx_path=Path(onnx.path), version=str(version.name),
                               classes=list(json.loads(meta["classes"])),
                               input_shape=tuple(json.loads(meta["input_shape"]))), "production"
