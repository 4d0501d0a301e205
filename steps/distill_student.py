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
    return distil_and_track("student", dataset, teacher, student_cfg, distill_cfg, tracking_cfg)


def distil_and_track(name: str, dataset: DatasetSpec, teacher: Bundle, cfg: StudentConfig,
                     distill_cfg: DistillConfig, tracking_cfg: TrackingConfig) -> Bundle:
    """The body of the student and assistant steps: checkpointed, retried, tracked as ``name``.

    The checkpoint identity holds everything that decides the trained weights (data,
    teacher weights, architecture, training, ``init``, distillation), so a resume never
    continues another configuration's run.
    """
    step_name = "distill_student" if name == "student" else name
    identity = {"dataset": dataset.model_dump(mode="json"),
                "teacher_weights": teacher.spec.weights_sha256,
                "model": model_identity(cfg.model),
                "train": cfg.train.model_dump(mode="json"),
                "init": [cfg.init, cfg.init_target, cfg.init_metric],
                "distill": distill_cfg.model_dump(mode="json")}

    def attempt() -> Bundle:
        with mlflow_run(tracking_cfg), training_checkpoint(step_name, identity) as ckpt:
            log_metadata(metadata=ckpt.metadata())
            bundle = recipes.distill_student(
                dataset, teacher, cfg, distill_cfg, checkpoint_dir=ckpt.directory,
                callbacks=[tracking.epoch_logger(name), *kill_switch(step_name)], role=name)
            tracking.log_metrics(recipes.bundle_metrics(bundle), name)
            tracking.log_figure(plots.training_curves({"teacher": teacher.spec.extra.get("history", []),
                                                       name: bundle.spec.extra["history"]}),
                                f"plots/{name}_curves.png")
        return bundle

    bundle = run_with_retries(attempt, step_name=step_name)
    logger.info("%s %s: test accuracy %.4f (its teacher %.4f)", name, cfg.model.arch,
                bundle.spec.extra["metrics"]["test_accuracy"],
                recipes.bundle_metrics(teacher).get("test_accuracy", float("nan")))
    return bundle
