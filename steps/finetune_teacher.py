"""finetune_teacher: train (or fine-tune) the teacher; cached on data + config."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import Model, get_step_context, log_metadata, step
from zenml.enums import ModelStages
from zenml.logger import get_logger

from kdpipe import plots, recipes, tracking
from kdpipe.bundle import Bundle, save_bundle
from kdpipe.config import TeacherConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from steps.checkpoints import TRAINING_RETRY, model_identity, training_checkpoint
from steps.materializers import BundleMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


@step(output_materializers=BundleMaterializer, retry=TRAINING_RETRY)
def finetune_teacher(
    dataset: DatasetSpec, teacher_cfg: TeacherConfig, tracking_cfg: TrackingConfig
) -> Annotated[Bundle, "teacher"]:
    """Train the teacher with cross-entropy (:func:`kdpipe.recipes.train_teacher`).

    Per-epoch metrics go to MLflow as ``teacher/<name>``; the final ones as
    ``teacher/test_accuracy`` etc. With ``teacher.init: production`` the weights start
    from the teacher of the model version now in production (when there is one).

    Every epoch is checkpointed (:mod:`steps.checkpoints`): a retry, or a re-run after
    the process was killed, resumes from the last finished epoch.
    """
    teacher_cfg = _with_production_start(teacher_cfg)
    identity = {"dataset": dataset.model_dump(mode="json"),
                "model": model_identity(teacher_cfg.model),
                "train": teacher_cfg.train.model_dump(mode="json")}
    with mlflow_run(tracking_cfg), training_checkpoint("finetune_teacher", identity) as ckpt:
        log_metadata(metadata=ckpt.metadata())
        bundle = recipes.train_teacher(dataset, teacher_cfg, checkpoint_dir=ckpt.directory,
                                       callbacks=[tracking.epoch_logger("teacher")])
        tracking.log_metrics(recipes.bundle_metrics(bundle), "teacher")
        tracking.log_figure(plots.training_curves({"teacher": bundle.spec.extra["history"]}),
                            "plots/teacher_curves.png")
    logger.info("teacher %s: test accuracy %.4f", teacher_cfg.model.arch,
                bundle.spec.extra["metrics"]["test_accuracy"])
    return bundle


def _with_production_start(cfg: TeacherConfig) -> TeacherConfig:
    """Point ``cfg.model.checkpoint`` at the production teacher when ``init: production``.

    Without a production version (the very first run) the teacher starts from scratch,
    which is what the first run of a scheduled retraining needs; the log says so.
    """
    if cfg.init != "production":
        return cfg
    model = get_step_context().model
    try:
        production = Model(name=model.name, version=ModelStages.PRODUCTION)
        teacher: Bundle = production.load_artifact("teacher")
    except (KeyError, RuntimeError) as err:
        logger.warning("teacher.init is 'production' but model %r has no production version "
                       "with a teacher (%s); training the teacher from scratch", model.name, err)
        return cfg
    local = save_bundle(teacher, Path(tempfile.mkdtemp(prefix="kdpipe-prod-teacher-")) / "bundle")
    logger.info("warm-starting the teacher from production model version %s", production.version)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": str(local)})})
