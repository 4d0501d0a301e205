"""finetune_teacher: train (or fine-tune) the teacher; cached on data + config."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Annotated
from uuid import UUID

from zenml import get_pipeline_context, get_step_context, log_metadata, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger
from zenml.models import ModelVersionFilter

from kdpipe import plots, recipes, tracking
from kdpipe.bundle import Bundle, save_bundle
from kdpipe.config import TeacherConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from steps.checkpoints import kill_switch, model_identity, run_with_retries, training_checkpoint
from steps.materializers import BundleMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


@step(output_materializers=BundleMaterializer)
def finetune_teacher(
    dataset: DatasetSpec,
    teacher_cfg: TeacherConfig,
    tracking_cfg: TrackingConfig,
    warm_start_version: str | None = None,
    onnx_sha256: str | None = None,
) -> Annotated[Bundle, "teacher"]:
    """Train the teacher with cross-entropy (:func:`kdpipe.recipes.train_teacher`).

    Per-epoch metrics go to MLflow as ``teacher/<name>``; the final ones as
    ``teacher/test_accuracy`` etc. With ``teacher.init: production`` the weights start
    from the teacher of the model version that was in production when the run was
    compiled: the pipeline passes its id as ``warm_start_version``
    (:func:`production_teacher_version`), which pins the weights for this run and makes
    a newly promoted version part of the cache key (a cached teacher is not reused after
    a promotion; unchanged data and production are still served from the cache).

    Every epoch is checkpointed (:mod:`steps.checkpoints`): a retry after a transient
    failure, or a re-run after the process was killed, resumes from the last finished
    epoch. Permanent failures are not retried.

    With ``teacher.onnx`` nothing is trained: the file is checked against the dataset and
    evaluated (:func:`kdpipe.onnx_teacher.onnx_teacher_for`). The pipeline passes the
    file's sha256 as ``onnx_sha256`` (:func:`onnx_teacher_digest`), so a changed file at
    the same path is not served from the cache.
    """
    if teacher_cfg.onnx is not None:
        return _onnx_teacher(dataset, teacher_cfg, tracking_cfg, onnx_sha256)
    teacher_cfg = _with_production_start(teacher_cfg, warm_start_version)
    identity = {"dataset": dataset.model_dump(mode="json"),
                "model": model_identity(teacher_cfg.model),
                "train": teacher_cfg.train.model_dump(mode="json")}

    def attempt() -> Bundle:
        with mlflow_run(tracking_cfg), training_checkpoint("finetune_teacher", identity) as ckpt:
            log_metadata(metadata=ckpt.metadata())
            bundle = recipes.train_teacher(
                dataset, teacher_cfg, checkpoint_dir=ckpt.directory,
                callbacks=[tracking.epoch_logger("teacher"), *kill_switch("finetune_teacher")])
            tracking.log_metrics(recipes.bundle_metrics(bundle), "teacher")
            tracking.log_figure(plots.training_curves({"teacher": bundle.spec.extra["history"]}),
                                "plots/teacher_curves.png")
        return bundle

    bundle = run_with_retries(attempt, step_name="finetune_teacher")
    logger.info("teacher %s: test accuracy %.4f", teacher_cfg.model.arch,
                bundle.spec.extra["metrics"]["test_accuracy"])
    return bundle


def _onnx_teacher(dataset: DatasetSpec, teacher_cfg: TeacherConfig, tracking_cfg: TrackingConfig,
                  onnx_sha256: str | None) -> Bundle:
    """Validate and evaluate the ONNX teacher (no training, no checkpoint)."""
    with mlflow_run(tracking_cfg):
        bundle = recipes.train_teacher(dataset, teacher_cfg)
        tracking.log_metrics(recipes.bundle_metrics(bundle), "teacher")
    if onnx_sha256 is not None and onnx_sha256 != bundle.spec.weights_sha256:
        raise RuntimeError(f"{teacher_cfg.onnx} changed while the run started (sha256 "
                           f"{bundle.spec.weights_sha256}, {onnx_sha256} at compile time); "
                           "run the pipeline again")
    log_metadata(metadata={"onnx_teacher": teacher_cfg.onnx,
                           "onnx_sha256": bundle.spec.weights_sha256})
    logger.info("ONNX teacher %s: test accuracy %.4f (not trained: evaluated only)",
                teacher_cfg.onnx, bundle.spec.extra["metrics"]["test_accuracy"])
    return bundle


def onnx_teacher_digest(teacher_cfg: TeacherConfig) -> str | None:
    """sha256 of the ``teacher.onnx`` file, read when the pipeline is compiled (a step
    input, so the cache key follows the file's content); None without an ONNX teacher."""
    if teacher_cfg.onnx is None or not Path(teacher_cfg.onnx).expanduser().is_file():
        return None  # a missing file is the step's (and preflight's) error
    return hashlib.sha256(Path(teacher_cfg.onnx).expanduser().read_bytes()).hexdigest()


def production_teacher_version(teacher_cfg: TeacherConfig) -> str | None:
    """Id of the pipeline model's production version, when ``teacher.init: production``.

    Called in the pipeline function (at compile time), so the id becomes a step input:
    None for ``init: scratch`` (production changes must not retrain such a teacher) and
    when there is no production version yet.
    """
    if teacher_cfg.init != "production":
        return None
    model = get_pipeline_context().model
    if model is None:
        return None
    # Client methods called while a pipeline is being composed return lazy placeholders
    # that ZenML resolves only when the step runs, too late for the cache key: ask the
    # store directly, now.
    client = Client()
    try:
        versions = client.zen_store.list_model_versions(
            model_version_filter_model=ModelVersionFilter(
                model=model.name, stage=ModelStages.PRODUCTION.value,
                project=client.active_project.id)).items
    except KeyError:  # the model does not exist yet
        return None
    return str(versions[0].id) if versions else None


def _with_production_start(cfg: TeacherConfig, version_id: str | None) -> TeacherConfig:
    """Point ``cfg.model.checkpoint`` at the production teacher when ``init: production``.

    Without a production version (the very first run) the teacher starts from scratch,
    which is what the first run of a scheduled retraining needs; the log and the step
    metadata (``warm_start``) say so.
    """
    if cfg.init != "production":
        return cfg
    if version_id is None:
        logger.warning("teacher.init is 'production' but model %r had no production version "
                       "when this run started; training the teacher from scratch",
                       get_step_context().model.name)
        log_metadata(metadata={"warm_start": "none: no production version"})
        return cfg
    version = Client().get_model_version(get_step_context().model.name, UUID(version_id))
    try:
        teacher: Bundle = version.get_artifact("teacher").load()
    except (AttributeError, KeyError, RuntimeError) as err:
        raise RuntimeError(
            f"teacher.init is 'production' but production version {version.number} of model "
            f"{version.model.name!r} has no loadable 'teacher' artifact ({err}); set "
            "teacher.init: scratch, or promote a version made by this pipeline") from err
    local = save_bundle(teacher, Path(tempfile.mkdtemp(prefix="kdpipe-prod-teacher-")) / "bundle")
    logger.info("warm-starting the teacher from production model version %s", version.number)
    log_metadata(metadata={"warm_start": {"model_version": version.number,
                                          "model_version_id": str(version.id),
                                          "teacher_weights_sha256": teacher.spec.weights_sha256}})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": str(local)})})
