"""gate_student: the pure gate decision, printed as a table; never cached."""

from __future__ import annotations

from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from kdpipe.config import GateConfig
from kdpipe.evaluation import EvaluationReport
from kdpipe.gate import GateDecision, decide
from steps.materializers import GateDecisionMaterializer

logger = get_logger(__name__)


@step(enable_cache=False, output_materializers=GateDecisionMaterializer)
def gate_student(
    evaluation: EvaluationReport, gate_cfg: GateConfig
) -> Annotated[GateDecision, "gate_decision"]:
    """Decide which candidate, if any, may be promoted (see :mod:`kdpipe.gate`): every
    candidate (FP32, and INT8 when quantize_onnx ran) gets its own table of checks, and
    ``gate_cfg.prefer`` chooses among those that pass.

    Never cached: the thresholds are cheap to re-check and a decision is an event of
    this run. MLflow logging of the decision happens in ``promote_student``, which has
    the tracking configuration.
    """
    decision = decide(evaluation, gate_cfg)
    logger.info("\n%s", decision.summary())
    return decision
