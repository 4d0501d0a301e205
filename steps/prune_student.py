"""prune_student: structural pruning with KD recovery; cached on its inputs + config."""

from __future__ import annotations

from typing import Annotated

from zenml import log_metadata, step
from zenml.logger import get_logger

from kdpipe import plots, recipes, tracking
from kdpipe.bundle import Bundle
from kdpipe.config import DistillConfig, PruneConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from kdpipe.prune_report import PruneReport
from steps.checkpoints import kill_switch, run_with_retries, training_checkpoint
from steps.materializers import BundleMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


@step(output_materializers=BundleMaterializer)
def prune_student(
    dataset: DatasetSpec,
    student: Bundle,
    teacher: Bundle,
    prune_cfg: PruneConfig,
    distill_cfg: DistillConfig,
    tracking_cfg: TrackingConfig,
) -> Annotated[Bundle, "pruned_student"]:
    """Prune the student's channels and distil it back (:func:`kdpipe.recipes.prune_student`).

    Recovery epochs go to MLflow as ``recovery/<name>``; the before/after numbers as
    ``prune/params_ratio``, ``prune/macs_ratio``...

    Every recovery epoch is checkpointed (:mod:`steps.checkpoints`): a retry after a
    transient failure, or a re-run after the process was killed, prunes the same channels
    again (seconds) and resumes the recovery from its last finished epoch. Permanent
    failures are not retried.
    """
    identity = {"dataset": dataset.model_dump(mode="json"),
                "student_weights": student.spec.weights_sha256,
                "teacher_weights": teacher.spec.weights_sha256,
                "prune": prune_cfg.model_dump(mode="json"),
                "distill": distill_cfg.model_dump(mode="json")}

    def attempt() -> tuple[Bundle, PruneReport | None]:
        with mlflow_run(tracking_cfg), training_checkpoint("prune_student", identity) as ckpt:
            log_metadata(metadata=ckpt.metadata())
            bundle, report = recipes.prune_student(
                student, teacher, dataset, prune_cfg, distill_cfg, checkpoint_dir=ckpt.directory,
                callbacks=[tracking.epoch_logger("recovery"), *kill_switch("prune_student")])
            tracking.log_metrics(recipes.bundle_metrics(bundle), "pruned_student")
            if report is not None:
                tracking.log_metrics({"params_ratio": report.params_ratio,
                                      "macs_ratio": report.macs_ratio,
                                      "latency_speedup": report.latency_speedup}, "prune")
                tracking.log_figure(plots.training_curves({"recovery": bundle.spec.extra["history"]}),
                                    "plots/recovery_curves.png")
        return bundle, report

    bundle, report = run_with_retries(attempt, step_name="prune_student")
    if report is None:
        logger.info("pruning disabled: the student is handed on unpruned")
    else:
        logger.info("pruned student: %.2fx fewer params, %.2fx fewer MACs, test accuracy %.4f",
                    report.params_ratio, report.macs_ratio,
                    bundle.spec.extra["metrics"]["test_accuracy"])
    return bundle
