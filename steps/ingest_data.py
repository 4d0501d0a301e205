"""ingest_data: describe and fingerprint the dataset; open the run's MLflow run. Never cached."""

from __future__ import annotations

from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.config import PipelineConfig
from kdpipe.data import DatasetSpec, build_dataset_spec
from kdpipe.validate import validate
from steps.materializers import DatasetSpecMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)


@step(enable_cache=False, output_materializers=DatasetSpecMaterializer)
def ingest_data(config: PipelineConfig) -> Annotated[DatasetSpec, "dataset"]:
    """Build the dataset spec (split, normalisation, fingerprint) from ``config.data``.

    Always runs: it re-reads the data, so new or changed data gets a new fingerprint and
    every training step downstream re-runs; unchanged data keeps the same content hash
    and everything downstream is served from cache. It is also the first step of every
    run, so it opens the run's MLflow run and logs the whole configuration as params.
    """
    spec = build_dataset_spec(config.data)
    # The class count is known now: a user model (import path) of the wrong output width
    # fails here, before any training (for built-in sources the CLI's check found it).
    validate(config, num_classes=spec.num_classes)
    with mlflow_run(config.tracking):
        # Split sizes are constants of the run: params, not metrics (a metric is a chart on
        # the MLflow run page, which should open on the training curves).
        tracking.log_params({**tracking.flatten_params(config),
                             **{f"data.{k}_samples": str(v) for k, v in spec.split_sizes.items()}})
        tracking.set_tags({"data.fingerprint": spec.fingerprint})
    logger.info("dataset %s: %s samples per split, %d classes, fingerprint %s",
                config.data.source, spec.split_sizes, spec.num_classes, spec.fingerprint[:12])
    return spec
