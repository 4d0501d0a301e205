"""distill_student: distil the teacher into the student; cached on data + teacher + config."""

from __future__ import annotations

from typing import Annotated

from zenml import log_metadata, step
from zenml.logger import get_logger

from kdpipe import plots, recipes, tracking
from kdpipe.bundle import Bundle
from kdpipe.config import DistillConfig, StudentConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from steps.checkpoints import kill_switch, model_identity, run_with_retries, training_checkpoint
from steps.materializers import BundleMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


@step(output_materializers=BundleMaterializer)
def distill_student(
    dataset: DatasetSpec,
    teacher: Bundle,
    student_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    tracking_cfg: TrackingConfig,
) -> Annotated[Bundle, "student"]:
    """Train the student on the teacher's soft targets (:func:`kdpipe.recipes.distill_student`).

    Per-epoch loss parts go to MLflow as ``student/train_ce``, ``student/train_kd``...
    Every epoch is checkpointed (:mod:`steps.checkpoints`): a retry after a transient
    failure, or a re-run after the process was killed, resumes from the last finished
    epoch. Permanent failures are not retried.
    """
    identity = {"dataset": dataset.model_dump(mode="json"),
                "teacher_weights": teacher.spec.weights_sha256,
                "model": model_identity(student_cfg.model),
                "train": student_cfg.train.model_dump(mode="json"),
                "distill": distill_cfg.model_dump(mode="json")}

    def attempt() -> Bundle:
        with mlflow_run(tracking_cfg), training_checkpoint("distill_student", identity) as ckpt:
            log_metadata(metadata=ckpt.metadata())
            bundle = recipes.distill_student(
                dataset, teacher, student_cfg, distill_cfg, checkpoint_dir=ckpt.directory,
                callbacks=[tracking.epoch_logger("student"), *kill_switch("distill_student")])
            tracking.log_metrics(recipes.bundle_metrics(bundle), "student")
            tracking.log_figure(plots.training_curves({"teacher": teacher.spec.extra.get("history", []),
                                                       "student": bundle.spec.extra["history"]}),
                                "plots/student_curves.png")
        return bundle

    bundle = run_with_retries(attempt, step_name="distill_student")
    logger.info("student %s: test accuracy %.4f (teacher %.4f)", student_cfg.model.arch,
                bundle.spec.extra["metrics"]["test_accuracy"],
                recipes.bundle_metrics(teacher).get("test_accuracy", float("nan")))
    return bundle
