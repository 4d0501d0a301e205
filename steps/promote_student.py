"""promote_student: act on the gate — both registries move, or neither; never cached.

The order, the rollback, the byte-identical no-op, the ``superseded`` rule under the
promotion lock and the ``rejected`` tag are :func:`kdpipe.champion.promote_candidate`'s;
this step supplies the stores (MLflow registered model + alias ``champion``; this run's
ZenML model version, stage ``production``) and logs the outcome. A rejection is a normal
outcome of scheduled retraining: the run succeeds unless ``gate.fail_run_on_reject``.
The file promoted is the candidate the gate chose (``gate_decision.chosen``): the FP32
export, or its INT8 version from ``quantize_onnx``.
"""

from __future__ import annotations

from typing import Annotated

from zenml import get_step_context, step
from zenml.logger import get_logger

from kdpipe.bundle import Bundle
from kdpipe.champion import (
    MlflowChampionStore,
    build_candidate,
    promote_candidate,
    raise_if_rejected,
)
from kdpipe.config import GateConfig, TrackingConfig
from kdpipe.evaluation import INT8_CANDIDATE, EvaluationReport
from kdpipe.export import ExportResult
from kdpipe.gate import GateDecision
from kdpipe.promotion import PromotionError, PromotionResult
from kdpipe.quantize_report import QuantizeOutcome, QuantizeResult
from kdpipe.tracking import log_metrics
from steps.materializers import PromotionResultMaterializer
from steps.tracking_context import mlflow_run
from steps.zenml_stage_store import ZenmlStageStore

logger = get_logger(__name__)


@step(enable_cache=False, output_materializers=PromotionResultMaterializer)
def promote_student(
    gate_decision: GateDecision,
    student_onnx: ExportResult,
    pruned_student: Bundle,
    teacher: Bundle,
    tracking_cfg: TrackingConfig,
    gate_cfg: GateConfig,
    evaluation: EvaluationReport | None = None,
    student_onnx_int8: QuantizeOutcome | None = None,
) -> Annotated[PromotionResult, "promotion"]:
    """Promote this run's student when the gate passed; record the rejection otherwise.

    ``evaluation`` (the report the gate decided on) enables the stale-production check;
    ``student_onnx_int8`` is the INT8 candidate (needed when the gate chose it).
    Raises PromotionError (a registry failed; the message says what was restored) or
    GateRejectedError (rejected and ``gate_cfg.fail_run_on_reject`` is true).
    """
    model = get_step_context().model
    candidate = build_candidate(student_onnx, pruned_student, teacher,
                                lineage_model=model.name, version=str(model.version),
                                int8=chosen_int8(gate_decision, student_onnx_int8))
    with mlflow_run(tracking_cfg) as uri:
        # Thresholds are config constants (already params, as the flattened config): only
        # the measured values and verdicts become metrics.
        log_metrics({k: v for k, v in gate_decision.metadata().items()
                     if not k.endswith("_threshold")}, "gate")
        champions = MlflowChampionStore(tracking_cfg.registered_model, tracking_uri=uri,
                                        experiment=tracking_cfg.experiment)
        result = promote_candidate(candidate, gate_decision, ZenmlStageStore(model.name),
                                   champions, evaluation=evaluation)
        log_metrics(result.metadata(), "promotion")
    # "not promoted: ..." must stand out in the run's log
    (logger.info if result.promoted else logger.warning)(result.summary())
    raise_if_rejected(result, gate_decision, fail_run_on_reject=gate_cfg.fail_run_on_reject)
    return result


def chosen_int8(decision: GateDecision, outcome: QuantizeOutcome | None) -> QuantizeResult | None:
    """The INT8 file to promote when the gate chose the INT8 candidate, else None.

    Raises:
        PromotionError: the gate chose INT8 but this step was given no INT8 model.
    """
    if not decision.passed or decision.promote != INT8_CANDIDATE:
        return None
    if outcome is None or outcome.result is None:
        raise PromotionError(
            "the gate chose the INT8 candidate but promote_student got no INT8 model "
            f"({'no student_onnx_int8 input' if outcome is None else outcome.reason}); "
            "wire quantize_onnx's output into promote_student")
    return outcome.result
