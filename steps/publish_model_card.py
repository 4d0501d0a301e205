"""publish_model_card: the model card of this run's candidate, promoted or rejected; never cached.

Runs after ``promote_student``. The card (:mod:`kdpipe.model_card`) goes to the MLflow run
(Markdown, HTML, the frontier figure); when the candidate was promoted, its summary
paragraph becomes the registered version's description. The ``model_card`` artifact's
ZenML visualisation is the HTML card. Intended use and limitations come from the ZenML
``model:`` section of the run config (``license``, ``use_cases``, ``limitations``).
"""

from __future__ import annotations

from typing import Annotated, Any

import mlflow
from zenml import get_step_context, step
from zenml.logger import get_logger

from kdpipe.card_publish import describe_version, log_card
from kdpipe.config import (
    DistillConfig,
    PruneConfig,
    QuantizeConfig,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from kdpipe.data import DatasetSpec
from kdpipe.evaluation import EvaluationReport
from kdpipe.gate import GateDecision
from kdpipe.model_card import IntendedUse, ModelCard, build_card, build_lineage
from kdpipe.promotion import PromotionResult
from steps.materializers import ModelCardMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


def _intended_use(model: Any) -> IntendedUse:
    """The ZenML Model's own fields (None when the pipeline has no model)."""
    if model is None:
        return IntendedUse()
    return IntendedUse(license=model.license, use_cases=model.use_cases,
                       limitations=model.limitations)



@step(enable_cache=False, output_materializers=ModelCardMaterializer)
def publish_model_card(
    dataset: DatasetSpec,
    evaluation: EvaluationReport,
    gate_decision: GateDecision,
    promotion: PromotionResult,
    teacher_cfg: TeacherConfig,
    student_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    prune_cfg: PruneConfig,
    tracking_cfg: TrackingConfig,
    quantize_cfg: QuantizeConfig | None = None,
) -> Annotated[ModelCard, "model_card"]:
    """Build the card, log it to MLflow, describe the registered version when promoted."""
    ctx = get_step_context()
    model = ctx.model
    with mlflow_run(tracking_cfg) as uri:
        run_id = mlflow.active_run().info.run_id
        ids = {"zenml_pipeline_run": ctx.pipeline_run.name, "zenml_model": model.name,
               "zenml_model_version": str(model.version),
               "mlflow_experiment": tracking_cfg.experiment, "mlflow_run_id": run_id,
               "registered_model": tracking_cfg.registered_model}
        lineage = build_lineage(teacher=teacher_cfg, student=student_cfg, distill=distill_cfg,
                                prune=prune_cfg, quantize=quantize_cfg, report=evaluation,
                                ids=ids)
        card = build_card(model_name=model.name, version=str(model.version), report=evaluation,
                          dataset=dataset, decision=gate_decision, promotion=promotion,
                          lineage=lineage, intended_use=_intended_use(model))
        card_uri = log_card(card)
        if promotion.promoted and promotion.mlflow_version:
            describe_version(promotion.registered_model, promotion.mlflow_version,
                             card.summary(), card_uri=card_uri, tracking_uri=uri)
    logger.info("model card: %s", card.summary())
    return card
