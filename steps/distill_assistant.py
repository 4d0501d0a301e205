"""distill_assistant: one teacher assistant of ``distill.assistants``; cached like the student.

The pipeline calls it once per assistant, ``index`` 1, 2, ...: each learns from the model
before it (the teacher, then the previous assistant) and is its own named artifact
(``assistant_<index>``) with its own MLflow curves (``assistant_<index>/...``).
"""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step
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
def distill_assistant(
    dataset: DatasetSpec,
    teacher: Bundle,
    assistant_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    tracking_cfg: TrackingConfig,
    index: int,
) -> Annotated[Bundle, ArtifactConfig(name="assistant_{index}")]:
    """Distil ``teacher`` (the model before it in the chain) into assistant ``index``."""
    name = f"assistant_{index}"
    identity = {"dataset": dataset.model_dump(mode="json"),
                "teacher_weights": teacher.spec.weights_sha256,
                "model": model_identity(assistant_cfg.model),
                "train": assistant_cfg.train.model_dump(mode="json"),
                "distill": distill_cfg.model_dump(mode="json"), "index": index}

    def attempt() -> Bundle:
        with mlflow_run(tracking_cfg), training_checkpoint(name, identity) as ckpt:
            log_metadata(metadata=ckpt.metadata())
            bundle = recipes.distill_student(
                dataset, teacher, assistant_cfg, distill_cfg, checkpoint_dir=ckpt.directory,
                callbacks=[tracking.epoch_logger(name), *kill_switch(name)], role=name)
            tracking.log_metrics(recipes.bundle_metrics(bundle), name)
            tracking.log_figure(plots.training_curves({name: bundle.spec.extra["history"]}),
                                f"plots/{name}_curves.png")
        return bundle

    bundle = run_with_retries(attempt, step_name=name)
    logger.info("%s %s: test accuracy %.4f", name, assistant_cfg.model.arch,
                bundle.spec.extra["metrics"]["test_accuracy"])
    return bundle
